"""Validation of a `Config`: every problem found, each naming its flag and the fix, in one
ConfigError.

Two rounds. First each section on its own (`_check_<section>`: ranges, flags that need
another flag of the section); then, only when those pass (they divide by the sizes checked
first), what the sizes must divide: heads and MLP by TP, the world by TP x PP, the global
batch by micro-batch x DP, and what the data source needs.

    validate(cfg, world_size=4)      # raises ConfigError naming the flag and the fix
"""

from __future__ import annotations

import os

from megavit.config.fields import ConfigError
from megavit.config.model import ATTENTION_TYPES, ModelConfig
from megavit.config.parallel import ParallelConfig
from megavit.config.run import (CheckpointConfig, Config, DataConfig, LoggingConfig,
                                PrecisionConfig, TrainingConfig)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks. Raises ConfigError listing every problem, each naming its flag
    and the fix; returns None when the configuration can run on `world_size` processes."""
    m, p = cfg.model, cfg.parallel
    problems = (_check_model(m) + _check_parallel(p, m) + _check_training(cfg.training)
                + _check_precision(cfg.precision) + _check_data(cfg.data)
                + _check_logging(cfg.logging) + _check_checkpoint(cfg.checkpoint)
                + _check_probe(cfg))
    if not problems:  # the checks below divide by the sizes checked above
        problems = (_check_model_shape(m) + _check_layout(cfg, world_size)
                    + _check_data_source(cfg.data, m) + _check_backend(p))
    if problems:
        raise ConfigError(_join(problems))


def _at_least_1(values: dict[str, int | None]) -> list[str]:
    return [f"{flag} must be at least 1 (got {value})" for flag, value in values.items()
            if value is not None and value < 1]


def _non_negative(values: dict[str, float]) -> list[str]:
    return [f"{flag} must be 0 or more (got {value})" for flag, value in values.items()
            if value < 0]


def _fraction(values: dict[str, float]) -> list[str]:
    return [f"{flag} must be in [0, 1) (got {value})" for flag, value in values.items()
            if not 0.0 <= value < 1.0]


def _check_model(model: ModelConfig) -> list[str]:
    problems = _at_least_1({
        "--num-layers": model.num_layers, "--hidden-size": model.hidden_size,
        "--num-attention-heads": model.num_attention_heads,
        "--ffn-hidden-size": model.ffn_hidden_size,
        "--patch-dim": model.patch_dim, "--img-h": model.img_h, "--img-w": model.img_w,
        "--num-channels": model.num_channels})
    problems += _non_negative({"--num-classes": model.num_classes or 0,
                               "--num-registers": model.num_registers})
    if model.distillation_token:
        problems.append("--distillation-token: the token and its second head are trained "
                        "by python -m megavit.distill --distill-loss token, which sets it")
    if model.norm_epsilon <= 0:
        problems.append(f"--norm-epsilon must be positive (got {model.norm_epsilon})")
    if model.normalization == "rmsnorm" and model.norm_bias:
        problems.append("--norm-bias: an RMSNorm has no bias; drop --norm-bias or use "
                        "--normalization layernorm")
    if model.init_method_std <= 0:
        problems.append(f"--init-method-std must be positive (got {model.init_method_std})")
    problems += _fraction({"--hidden-dropout": model.hidden_dropout,
                           "--attention-dropout": model.attention_dropout,
                           "--drop-path-rate": model.drop_path_rate})
    if model.drop_path_rate > 0 and model.num_layers == 1:
        problems.append("--drop-path-rate has no effect with --num-layers 1 (the rate grows "
                        "from 0 at block 0); use more layers or leave it at 0")
    return (problems + _check_attention(model) + _check_merges(model)
            + _check_feature_layers(model))


def _block_indices(flag: str, parse, num_layers: int) -> tuple[list[int], list[str]]:
    """(the indices `parse()` gives, problems): not integers, or outside 0..num_layers-1."""
    try:
        layers = parse()
    except ValueError:
        return [], [f"{flag!r}: expected block indices separated by commas, e.g. 1,3"]
    if bad := [i for i in layers if not 0 <= i < num_layers]:
        return [], [f"{flag}: block(s) {', '.join(map(str, bad))} outside "
                    f"0..{num_layers - 1}"]
    return layers, []


def _check_feature_layers(model: ModelConfig) -> list[str]:
    """--feature-layers: block indices."""
    return _block_indices(f"--feature-layers {model.feature_layers}",
                          model.feature_layer_list, model.num_layers)[1]


def _check_merges(model: ModelConfig) -> list[str]:
    """--patch-merge-layers: block indices, each merging an even grid."""
    flag = f"--patch-merge-layers {model.patch_merge_layers}"
    layers, problems = _block_indices(flag, model.merge_layers, model.num_layers)
    for layer in layers:
        gh, gw = model.grid_at(layer)
        if gh % 2 or gw % 2 or gh < 2 or gw < 2:
            problems.append(f"{flag}: the grid after block {layer} is {gh}x{gw}; merging 2x2 "
                            "groups needs both sides even (change --img-h/--img-w, "
                            "--patch-dim or the merge layers)")
    return problems


def _check_attention(model: ModelConfig) -> list[str]:
    """--attention-type, --attention-type-per-layer, --window-size and
    --global-attention-layers together."""
    try:
        layers = model.global_layers()
    except ValueError:
        return [f"--global-attention-layers {model.global_attention_layers!r}: expected block "
                "indices separated by commas, e.g. 2,5,8,11"]
    problems = []
    if pattern := model.attention_pattern():
        if unknown := sorted(set(pattern) - set(ATTENTION_TYPES)):
            problems.append(f"--attention-type-per-layer {model.attention_type_per_layer}: "
                            f"{', '.join(unknown)} is not one of {', '.join(ATTENTION_TYPES)}")
        if model.attention_type != "full" or layers:
            problems.append("--attention-type-per-layer replaces --attention-type and "
                            "--global-attention-layers; give one or the other")
    elif layers and model.attention_type == "full":
        problems.append("--global-attention-layers applies to --attention-type window or "
                        "linear (got --attention-type full)")
    if bad := sorted(i for i in layers if not 0 <= i < model.num_layers):
        problems.append(f"--global-attention-layers {model.global_attention_layers}: "
                        f"block(s) {', '.join(map(str, bad))} outside 0..{model.num_layers - 1}")
    if problems:
        return problems
    gh, gw = model.grid
    if not model.uses_attention("window"):
        if model.window_size is not None:
            problems.append("--window-size applies to window attention (no block uses it)")
    elif model.window_size is None:
        problems.append("--attention-type window needs --window-size (patches per window "
                        f"side; the grid is {gh}x{gw})")
    elif not 1 <= model.window_size <= max(gh, gw):
        problems.append(f"--window-size {model.window_size} must be in 1..{max(gh, gw)}: the "
                        f"patch grid is {gh}x{gw} (--img-h/--img-w / --patch-dim)")
    if model.window_shift and (not model.uses_attention("window")
                               or (model.window_size or 0) < 2):
        problems.append("--window-shift shifts windows by --window-size // 2: it needs window "
                        "blocks with --window-size 2 or more")
    if model.uses_attention("linear") and model.attention_dropout > 0:
        problems.append("--attention-dropout: linear attention has no attention probabilities "
                        "to drop; set it to 0 or keep those blocks full")
    return problems


def _check_parallel(p: ParallelConfig, m: ModelConfig) -> list[str]:
    problems = _at_least_1({"--tensor-model-parallel-size": p.tensor_model_parallel_size,
                            "--pipeline-model-parallel-size": p.pipeline_model_parallel_size})
    if p.distributed_timeout_minutes <= 0:
        problems.append(
            f"--distributed-timeout-minutes must be positive (got {p.distributed_timeout_minutes})"
        )
    problems += _check_recompute(p, m.num_layers)
    if p.sequence_parallel_regather and not p.sequence_parallel:
        problems.append("--sequence-parallel-regather needs --sequence-parallel")
    virtual = p.num_layers_per_virtual_pipeline_stage is not None
    if p.pipeline_schedule == "zb-h1" and virtual:
        problems.append("--pipeline-schedule zb-h1 runs one chunk per stage: drop "
                        "--num-layers-per-virtual-pipeline-stage")
    if p.pipeline_schedule == "interleaved" and not virtual:
        problems.append("--pipeline-schedule interleaved needs "
                        "--num-layers-per-virtual-pipeline-stage")
    if p.pipeline_schedule == "1f1b" and virtual:
        problems.append("--pipeline-schedule 1f1b: --num-layers-per-virtual-pipeline-stage "
                        "makes it interleaved; drop one of them")
    if p.pipeline_schedule == "zb-h1" and p.data_parallel_sharding_strategy == "full":
        problems.append("--pipeline-schedule zb-h1 with --data-parallel-sharding-strategy "
                        "full: FSDP2 reduce-scatters a block's gradients when its backward "
                        "ends, before the deferred weight gradients exist; use one or the "
                        "other")
    if p.data_parallel_sharding_strategy == "full":
        for flag, on in (("--use-distributed-optimizer", p.use_distributed_optimizer),
                         ("--overlap-grad-reduce", p.overlap_grad_reduce),
                         ("--ddp-bucket-size", p.ddp_bucket_size is not None)):
            if on:
                problems.append(f"{flag} belongs to --data-parallel-sharding-strategy "
                                "optimizer; with 'full' FSDP2 shards the optimizer state and "
                                "overlaps the gradient reduction itself: drop the flag")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        problems.append(f"--ddp-bucket-size must be at least 1 (got {p.ddp_bucket_size})")
    return problems + _at_least_1({
        "--num-layers-per-virtual-pipeline-stage": p.num_layers_per_virtual_pipeline_stage,
        "--num-layers-in-first-pipeline-stage": p.num_layers_in_first_pipeline_stage,
        "--num-layers-in-last-pipeline-stage": p.num_layers_in_last_pipeline_stage,
        "--recompute-num-layers": p.recompute_num_layers})


def _check_recompute(parallel: ParallelConfig, num_layers: int) -> list[str]:
    problems = []
    if parallel.recompute_granularity == "auto":
        budget = parallel.activation_memory_budget_gb
        if budget is None or budget <= 0:
            problems.append("--recompute-granularity auto needs a positive "
                            "--activation-memory-budget-gb")
        if parallel.recompute_method is not None or parallel.recompute_num_layers is not None:
            problems.append("--recompute-granularity auto chooses the recomputed blocks itself; "
                            "drop --recompute-method / --recompute-num-layers")
    elif parallel.activation_memory_budget_gb is not None:
        problems.append("--activation-memory-budget-gb applies to --recompute-granularity auto")
    if parallel.recompute_granularity == "full":
        if parallel.recompute_method is None:
            problems.append("--recompute-granularity full needs --recompute-method uniform "
                            "or block")
        if parallel.recompute_num_layers is None or parallel.recompute_num_layers < 1:
            problems.append("--recompute-granularity full needs --recompute-num-layers N "
                            "(N >= 1)")
        elif parallel.recompute_num_layers > num_layers:
            problems.append(f"--recompute-num-layers {parallel.recompute_num_layers} is more than "
                            f"--num-layers {num_layers}")
    elif parallel.recompute_granularity != "auto" and (
            parallel.recompute_method is not None or parallel.recompute_num_layers is not None):
        problems.append("--recompute-method and --recompute-num-layers apply to "
                        "--recompute-granularity full only")
    return problems


def _check_training(t: TrainingConfig) -> list[str]:
    problems = _at_least_1({"--micro-batch-size": t.micro_batch_size,
                            "--global-batch-size": t.global_batch_size,
                            "--train-iters": t.train_iters})
    problems += _non_negative({"--lr-warmup-iters": t.lr_warmup_iters})
    problems += _non_negative({"--lr": t.lr, "--min-lr": t.min_lr,
                               "--weight-decay": t.weight_decay, "--clip-grad": t.clip_grad,
                               "--adam-eps": t.adam_eps})
    if t.min_lr > t.lr:
        problems.append(f"--min-lr {t.min_lr} is above --lr {t.lr}; lower --min-lr")
    if t.label_smoothing is not None and not 0.0 <= t.label_smoothing < 1.0:
        problems.append(f"--label-smoothing must be in [0, 1) (got {t.label_smoothing})")
    problems += _fraction({"--adam-beta1": t.adam_beta1, "--adam-beta2": t.adam_beta2})
    if t.layer_decay is not None and not 0.0 < t.layer_decay <= 1.0:
        problems.append(f"--layer-decay must be in (0, 1] (got {t.layer_decay}); 0.65-0.75 "
                        "is usual for fine-tuning a ViT-B")
    if t.layer_decay is not None and t.layer_decay != 1.0 and t.freeze_backbone:
        problems.append("--layer-decay scales the lr of the backbone's layers, which "
                        "--freeze-backbone does not train; drop one of them")
    return problems + _at_least_1({"--lr-decay-iters": t.lr_decay_iters})


def _check_precision(pr: PrecisionConfig) -> list[str]:
    problems = []
    if pr.bf16 and pr.fp16:
        problems.append("--bf16 and --fp16 exclude each other; pick one")
    if pr.loss_scale is not None and pr.loss_scale <= 0:
        problems.append(f"--loss-scale must be positive (got {pr.loss_scale})")
    if pr.initial_loss_scale <= 0 or pr.min_loss_scale <= 0:
        problems.append("--initial-loss-scale and --min-loss-scale must be positive")
    elif pr.min_loss_scale > pr.initial_loss_scale:
        problems.append(f"--min-loss-scale {pr.min_loss_scale:g} is above --initial-loss-scale "
                        f"{pr.initial_loss_scale:g}")
    if pr.loss_scale_window < 1 or pr.hysteresis < 1:
        problems.append("--loss-scale-window and --hysteresis must be at least 1")
    if pr.accumulate_allreduce_grads_in_fp32 and not (pr.bf16 or pr.fp16):
        problems.append("--accumulate-allreduce-grads-in-fp32 applies to --bf16 / --fp16 "
                        "(fp32 gradients are already fp32)")
    return problems


def _check_data(d: DataConfig) -> list[str]:
    problems = (_at_least_1({"--synthetic-size": d.synthetic_size,
                             "--prefetch-factor": d.prefetch_factor})
                + _non_negative({"--num-workers": d.num_workers}))
    problems += _non_negative({flag: value for flag, value in (
        ("--rand-augment-ops", d.rand_augment_ops), ("--mixup", d.mixup),
        ("--cutmix", d.cutmix)) if value is not None})
    problems += [f"{flag} is a probability, in [0, 1] (got {value})" for flag, value in (
        ("--hflip", d.hflip), ("--mixup-switch-prob", d.mixup_switch_prob))
        if value is not None and not 0.0 <= value <= 1.0]
    if d.random_crop_min_scale is not None and not 0.0 < d.random_crop_min_scale <= 1.0:
        problems.append(f"--random-crop-min-scale must be in (0, 1] (got "
                        f"{d.random_crop_min_scale})")
    if d.rand_augment_magnitude is not None and not 0.0 <= d.rand_augment_magnitude <= 10.0:
        problems.append(f"--rand-augment-magnitude is on timm's 0-10 scale (got "
                        f"{d.rand_augment_magnitude})")
    if d.crop_pct is not None and not 0.0 < d.crop_pct <= 1.0:
        problems.append(f"--crop-pct must be in (0, 1] (got {d.crop_pct}); 0.875 is usual")
    if d.augment != "none" and d.dataset == "synthetic" and d.augment != "affine":
        problems.append(f"--augment {d.augment} augments images made from pixels; synthetic "
                        "images are random numbers: use --augment none or affine")
    return problems


def _check_logging(lg: LoggingConfig) -> list[str]:
    problems = _at_least_1({"--log-interval": lg.log_interval})
    problems += _non_negative({"--eval-interval": lg.eval_interval})
    if lg.progress_interval_seconds <= 0:
        problems.append(f"--progress-interval-seconds must be positive (got "
                        f"{lg.progress_interval_seconds})")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        problems.append(f"--peak-tflops must be positive (got {lg.peak_tflops})")
    return problems + _at_least_1({"--eval-iters": lg.eval_iters})


def _check_checkpoint(ck: CheckpointConfig) -> list[str]:
    problems = []
    if ck.save_interval < 0 or ck.keep_last_checkpoints < 0:
        problems.append("--save-interval and --keep-last-checkpoints must be 0 or more")
    if (ck.save_interval or ck.keep_last_checkpoints) and not ck.save:
        problems.append("--save-interval / --keep-last-checkpoints need --save DIR")
    if ck.load and not os.path.isdir(ck.load) and not _same_path(ck.load, ck.save):
        problems.append(f"--load {ck.load}: no such directory (a missing --load starts from "
                        "scratch only when it is also --save)")
    if ck.exit_duration_in_mins is not None and ck.exit_duration_in_mins <= 0:
        problems.append(f"--exit-duration-in-mins must be positive (got "
                        f"{ck.exit_duration_in_mins})")
    if ck.eval_only:
        if not ck.load:
            problems.append("--eval-only evaluates the checkpoint of --load DIR; add --load")
        for flag, value in (("--save", ck.save), ("--finetune", ck.finetune),
                            ("--pretrained-checkpoint", ck.pretrained_checkpoint)):
            if value:
                problems.append(f"{flag} with --eval-only: an evaluation trains nothing and "
                                "writes no checkpoint; drop one of them")
    if ck.finetune and not ck.load:
        problems.append("--finetune loads the weights of --load DIR; add --load (or use "
                        "--pretrained-checkpoint DIR)")
    if ck.reset_classifier and not (ck.finetune or ck.pretrained_checkpoint):
        problems.append("--reset-classifier applies when fine-tuning: add --pretrained-"
                        "checkpoint DIR (or --load DIR --finetune)")
    if ck.finetune and ck.pretrained_checkpoint:
        problems.append("--finetune and --pretrained-checkpoint both choose the weights to "
                        "fine-tune from; keep one")
    if ck.pretrained_checkpoint and not os.path.isdir(ck.pretrained_checkpoint):
        problems.append(f"--pretrained-checkpoint {ck.pretrained_checkpoint}: no such "
                        "directory")
    source = ck.pretrained_checkpoint or (ck.load if ck.finetune else None)
    if source and ck.save and (_same_path(source, ck.save)
                               or _same_path(os.path.dirname(os.path.abspath(source)), ck.save)):
        problems.append(f"--save {ck.save} is where the weights to fine-tune come from: its "
                        "checkpoints (and --keep-last-checkpoints) would replace them; save "
                        "the fine-tuning elsewhere")
    return problems + _check_save_directory(ck.save)


def _same_path(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _check_probe(cfg: Config) -> list[str]:
    checkpoint = cfg.checkpoint
    if cfg.training.freeze_backbone and not (checkpoint.finetune
                                             or checkpoint.pretrained_checkpoint):
        return ["--freeze-backbone trains a classifier on a frozen model: give it weights "
                "with --pretrained-checkpoint DIR (or --load DIR --finetune)"]
    if cfg.training.freeze_backbone and \
            cfg.parallel.data_parallel_sharding_strategy == "full":
        # the probe runs the frozen chunks without autograd and the classifier outside
        # them: FSDP2 would never reduce-scatter the classifier's gradient
        return ["--freeze-backbone with --data-parallel-sharding-strategy full: a linear "
                "probe holds little to shard; use the default strategy "
                "(--use-distributed-optimizer shards its Adam state)"]
    return []


def _check_save_directory(save: str | None) -> list[str]:
    """--save must be creatable and writable now, not found wrong at the first save."""
    if not save:
        return []
    path = os.path.abspath(save)
    if os.path.exists(path) and not os.path.isdir(path):
        return [f"--save {save}: exists and is not a directory"]
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"--save {save}: {parent} is a file, so the directory cannot be made"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"--save {save}: {parent} is not writable"]
    return []


def model_problems(model: ModelConfig) -> list[str]:
    """Everything wrong with a model configuration alone, each naming its flag (empty:
    nothing), e.g. for a saved model asked to run at another image size."""
    return _check_model(model) + _check_model_shape(model)


def _check_model_shape(model: ModelConfig) -> list[str]:
    """Width by heads, sin-cos width by 4, the image by the patch."""
    problems = []
    if model.hidden_size % model.num_attention_heads:
        problems.append(
            f"--hidden-size {model.hidden_size} is not divisible by --num-attention-heads "
            f"{model.num_attention_heads}; pick a head count that divides the width"
        )
    if model.position_embedding_type == "rope-2d" and model.head_dim % 4:
        problems.append(
            f"--position-embedding-type rope-2d rotates pairs along two axes: the head width "
            f"--hidden-size / --num-attention-heads = {model.head_dim} must be divisible by 4"
        )
    if model.position_embedding_type == "sincos2d" and model.hidden_size % 4:
        problems.append(
            f"--position-embedding-type sincos2d needs --hidden-size divisible by 4 "
            f"(got {model.hidden_size}); use learned position embeddings or another width"
        )
    if model.img_h % model.patch_dim or model.img_w % model.patch_dim:
        problems.append(
            f"image {model.img_h}x{model.img_w} (--img-h x --img-w) is not divisible by "
            f"--patch-dim {model.patch_dim}; resize the images or pick a patch size that "
            "divides both"
        )
    return problems


def _check_layout(cfg: Config, world_size: int) -> list[str]:
    """TP splits heads and MLP width; the world splits into TP x PP x DP; the global batch
    into micro-batches x DP."""
    model, parallel, training = cfg.model, cfg.parallel, cfg.training
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    problems = []
    if model.num_attention_heads % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
            f"{model.num_attention_heads}; use a TP size that divides the head count"
        )
    if model.ffn_hidden_size % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size "
            f"{model.ffn_hidden_size}; use a TP size that divides the MLP width"
        )
    if world_size % (tp * pp):
        problems.append(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"x --pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes"
        )
    else:
        dp = world_size // (tp * pp)
        if parallel.data_parallel_sharding_strategy == "full" and dp == 1:
            problems.append(
                f"--data-parallel-sharding-strategy full shards over the data-parallel ranks, "
                f"but there is 1 (world {world_size} = TP {tp} x PP {pp}); launch more "
                f"processes or use the default strategy")
        per_step = training.micro_batch_size * dp
        if training.global_batch_size % per_step:
            problems.append(
                f"--global-batch-size {training.global_batch_size} is not divisible by "
                f"--micro-batch-size {training.micro_batch_size} x data-parallel size {dp} "
                f"(= {per_step}); use a multiple of {per_step}"
            )
    return problems


def _check_data_source(d: DataConfig, m: ModelConfig) -> list[str]:
    problems = []
    files = ("image-folder", "shards", "seg-folder")
    if d.dataset in files and m.num_channels not in (1, 3):
        problems.append(f"--dataset {d.dataset} reads grey or RGB images: --num-channels must "
                        f"be 1 or 3 (got {m.num_channels})")
    if d.dataset == "image-folder" and not d.data_path:
        problems.append("--dataset image-folder needs --data-path DIR (with train/ and val/)")
    if d.dataset == "shards" and not (d.data_path and d.valid_data_path):
        problems.append("--dataset shards needs --data-path and --valid-data-path, shard "
                        "patterns such as 'train/{000000..000127}.tar' (tools/make_shards.py "
                        "writes them)")
    if d.data_path and d.dataset not in files:
        problems.append(
            f"--data-path is only read by --dataset image-folder, shards or seg-folder (got "
            f"--dataset "
            f"{d.dataset})"
        )
    if d.valid_data_path and d.dataset != "shards":
        problems.append(f"--valid-data-path is only read by --dataset shards (got --dataset "
                        f"{d.dataset}; an image folder holds its own val/)")
    if d.image_normalization != "half" and d.dataset not in files:
        problems.append(f"--image-normalization applies to image files (--dataset image-folder "
                        f"or shards); --dataset {d.dataset} is normalised by its own statistics")
    if d.crop_pct is not None and d.dataset not in files:
        problems.append(f"--crop-pct applies to image files (--dataset image-folder or "
                        f"shards); --dataset {d.dataset} is held in memory at its size")
    return problems


def _check_backend(p: ParallelConfig) -> list[str]:
    # --device cuda with gloo is allowed: gloo moves CUDA tensors through host memory.
    if p.device == "cpu" and p.distributed_backend == "nccl":
        return ["--distributed-backend nccl needs GPUs; use gloo with --device cpu"]
    return []


def _join(problems: list[str]) -> str:
    """One problem as it is; several as a counted list."""
    if len(problems) == 1:
        return problems[0]
    return "the configuration has %d problems:\n  - %s" % (
        len(problems),
        "\n  - ".join(problems),
    )
