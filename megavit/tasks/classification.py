"""Image classification (`megavit.pretrain`): the smallest complete task.

    data        image folder / digits / MNIST-5k / synthetic -> MicroBatch(images, labels,
                sample ids), augmented per sample (data/sampler.py)
    model       this stage's chunks of the ViT (models/vit.py `build_stage`)
    loss        cross-entropy (with --label-smoothing) on the last stage, per micro-batch,
                through the pipeline schedule (training/step.py `pipeline_forward_backward`);
                with --freeze-backbone (a linear probe) the model runs forward only and
                only the classifier is trained
    lr          --layer-decay: each parameter's lr scaled by its depth (models/vit.py
                `vit_layer_id`)
    evaluate    held-out loss and top-1 accuracy, summed over DP, shared from the last stage

    run = classification_run(cfg, pstate)     # the engine's Run of this task
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import Config, ConfigError
from megavit.data.datasets import Dataset, build_datasets
from megavit.data.targets import class_targets, label_hits, smooth_targets
from megavit.data.augment import (BatchMixer, ImageAugmenter, recipe_from_config,
                                  torchvision_version)
from megavit.data.sampler import (MicroBatch, eval_batches, labels_from_first_stage,
                                  mixed_batches, train_batches)
from megavit.models.transformer import Runtime
from megavit.models.vit import build_stage, vit_layer_id
from megavit.parallel.pipeline_executor import StepStats
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.state import ParallelState
from megavit.training.loop import parameter_count
from megavit.training.run import Run
from megavit.training.step import pipeline_forward_backward, run_micro_batches

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classification_loss(kind: str = "softmax", label_smoothing: float = 0.0) -> LossFn:
    """Mean loss of logits [b, C] against labels [b] / [b, K] (int64, megavit/data/targets.py)
    or soft targets [b, C] (Mixup / CutMix), with label smoothing eps (targets t ->
    t (1 - eps) + eps / C).

    'softmax': cross-entropy -sum_c t_c log softmax(z)_c, a multi-hot target normalised to
    sum to 1. 'sigmoid': binary cross-entropy summed over the C classes, averaged over the
    batch: -sum_c [t_c log s(z_c) + (1 - t_c) log s(-z_c)] (big_vision's sigmoid_xent)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if kind == "softmax":
            if labels.dim() == 1 and not labels.is_floating_point():
                return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            targets = class_targets(labels, logits.shape[-1])
            targets = targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)
            return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        targets = smooth_targets(class_targets(labels, logits.shape[-1]), label_smoothing)
        return F.binary_cross_entropy_with_logits(logits, targets,
                                                  reduction="none").sum(-1).mean()

    return loss


def resolve_num_classes(cfg: Config, train: Dataset) -> Config:
    """--num-classes, defaulting to the training set's class count."""
    m = cfg.model
    if m.num_classes is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, num_classes=train.num_classes))
    if m.num_classes == 0:
        raise ConfigError("--num-classes 0 builds a feature extractor; pretraining needs a "
                          "classifier (leave --num-classes unset to use the dataset's)")
    if m.num_classes < train.num_classes:
        raise ConfigError(f"--num-classes {m.num_classes} is smaller than the "
                          f"{train.num_classes} classes of {train.name}")
    return cfg


def is_classifier(name: str) -> bool:
    """The parameters of the classifier on top of the pooled features (`head.*`)."""
    return name.startswith("head.")


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def class_names(dataset: str, heldout) -> list[str]:
    """The class names a dataset knows: an image folder's sub-folder names, the digits'
    '0'..'9'; empty otherwise (shards, synthetic data)."""
    if dataset in ("digits", "mnist5k", "mnist-canvas"):
        return [str(k) for k in range(10)]
    return [str(c) for c in getattr(heldout, "classes", None) or []]


class ClassificationTask:
    """A ViT classifier trained with cross-entropy on an image dataset."""

    throughput_unit = "images"

    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.train_set: Dataset | None = None
        self.heldout: Dataset | None = None
        self.recipe = recipe_from_config(cfg.data, cfg.training.label_smoothing)
        self.loss_fn = classification_loss(cfg.data.loss, self.recipe.label_smoothing)
        self.augmenter: ImageAugmenter | None = None
        self.mixer: BatchMixer | None = None

    def prepare(self, pstate: ParallelState) -> Config:
        cfg = self.config
        self.train_set, self.heldout = build_datasets(cfg.data, cfg.model, cfg.training.seed)
        self.config = resolve_num_classes(cfg, self.train_set)
        size, seed = (cfg.model.img_h, cfg.model.img_w), cfg.training.seed
        if self.recipe.per_image:
            self.augmenter = ImageAugmenter(self.recipe, size, seed)
        if self.recipe.mixes:
            self.mixer = BatchMixer(self.recipe, size, seed)
        return self.config

    def build_stage(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> nn.Module:
        """This stage's chunks of the classifier (a subclass may build another ViT)."""
        return build_stage(self.config.model, runtime, self.config.training.seed, layout,
                           stage, pstate.device, dtype)

    def build_model(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> nn.Module:
        model = self.build_stage(runtime, layout, stage, pstate, dtype)
        if self.config.data.loss == "sigmoid":   # each class starts at probability ~1/C
            for name in ("head", "head_dist"):   # (big_vision)
                if (head := getattr(model.chunks[-1], name, None)) is not None:
                    with torch.no_grad():
                        head.bias.fill_(-math.log(self.config.model.num_classes))
        if self.config.training.freeze_backbone:
            for name, param in model.named_parameters():
                param.requires_grad_(is_classifier(name))
        return model

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Every parameter; with --freeze-backbone the classifier's only."""
        return [(name, p) for name, p in model.named_parameters()
                if not self.config.training.freeze_backbone or is_classifier(name)]

    def lr_scale(self, name: str) -> float:
        """--layer-decay d: d^(L + 1 - depth) (1 for the head; 1 everywhere without it)."""
        decay, layers = self.config.training.layer_decay, self.config.model.num_layers
        if decay is None or decay == 1.0:
            return 1.0
        return decay ** (layers + 1 - vit_layer_id(name, layers))

    @property
    def train_size(self) -> int:
        return len(self.train_set)

    def batches(self, run: Run, start: int, stop: int) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches for iterations [start, stop) (images only on the
        stage holding the model's first chunk; the labels of a file-backed dataset come
        from that stage, see `labels_from_first_stage`)."""
        t, d, dp = self.config.training, self.config.data, run.pstate.dp
        handed = self._labels_handed_on(run, self.train_set)
        batches = train_batches(self.train_set, run.sampler, start, stop, dp.rank, dp.size,
                                t.micro_batch_size, d.num_workers,
                                "affine" if self.recipe.affine else "none",
                                run.is_first_stage, with_labels=not handed,
                                augmenter=self.augmenter, prefetch_factor=d.prefetch_factor,
                                pin_memory=run.pstate.device.type == "cuda")
        if handed:
            batches = labels_from_first_stage(batches, run.pstate.pp)
        if self.mixer is not None:   # after the hand-off: every stage mixes the same labels
            batches = mixed_batches(batches, self.mixer, self.config.model.num_classes,
                                    t.global_batch_size, t.micro_batch_size)
        return batches

    @staticmethod
    def _labels_handed_on(run: Run, dataset: Dataset) -> bool:
        """Under pipeline parallelism a file-backed dataset's labels travel from the first
        stage (it alone decodes the images, and so knows which were replaced)."""
        return run.pstate.pp.size > 1 and not dataset.in_memory

    def micro_batch_count(self, batch: list[MicroBatch]) -> int:
        return len(batch)

    def forward_backward(self, run: Run, batch: list[MicroBatch], loss_scale: float | None,
                         measure: bool) -> tuple[torch.Tensor, StepStats]:
        if self.config.training.freeze_backbone:
            return self.probe_forward_backward(run, batch, loss_scale)
        return pipeline_forward_backward(run, batch, self.loss_fn, loss_scale, measure)

    def probe_forward_backward(self, run: Run, micro_batches: list[MicroBatch],
                               loss_scale: float | None) -> tuple[torch.Tensor, StepStats]:
        """--freeze-backbone: the model forward only, in eval mode, through a forward-only
        pipeline schedule (no activations kept, no gradient between stages); on the last
        stage the classifier's forward and backward on each micro-batch's pooled features
        [m, h] (its loss / M, times the loss scale). Returns the summed loss (last stage)."""
        n = len(micro_batches)
        total = torch.zeros((), device=run.pstate.device)
        head = run.model.chunks[-1].head if run.is_last_stage else None

        def train_head(mb: int, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            nonlocal total
            with torch.enable_grad():
                loss = self.loss_fn(head(features), labels) / n
                (loss * loss_scale if loss_scale is not None else loss).backward()
            total = total + loss.detach()
            return features.new_zeros(())

        run.model.eval()
        try:
            stats = run_micro_batches(run.model, run.executor, micro_batches, run.pstate,
                                      train_head, forward_only=True, apply_head=False)
        finally:
            run.model.train()
        return total, stats

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        """Mean loss (--loss, no smoothing), top-1 accuracy and, for multi-label data,
        precision@1 over the held-out split (or its first --eval-iters global batches): the
        same images in every layout, run forward through the pipeline, summed over DP ranks
        and shared from the last stage with the others."""
        pstate, model, training = run.pstate, run.model, self.config.training
        model.eval()
        # loss, top-1 hits, precision@1 hits, count
        sums = torch.zeros(4, dtype=torch.float64, device=pstate.device)
        eval_loss = classification_loss(self.config.data.loss)

        def tally(mb: int, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = logits.float()
            top1, at1 = label_hits(logits, labels)
            sums[0] += eval_loss(logits, labels).double() * len(labels)
            sums[1] += top1.sum()
            sums[2] += at1.sum()
            sums[3] += len(labels)
            return logits.new_zeros(())

        handed = self._labels_handed_on(run, self.heldout)
        batches = eval_batches(self.heldout, training.global_batch_size, pstate.dp.rank,
                               pstate.dp.size, training.micro_batch_size,
                               self.config.logging.eval_iters, run.is_first_stage,
                               with_labels=not handed)
        for micro_batches in (labels_from_first_stage(batches, pstate.pp) if handed
                              else batches):
            micro_batches = [mb for mb in micro_batches if mb.labels.numel()]
            if micro_batches:
                run_micro_batches(model, run.executor, micro_batches, pstate, tally,
                                  forward_only=True)
        pstate.dp.all_reduce(sums)
        pstate.pp.broadcast(sums, src=pstate.pp.size - 1)   # every stage reports the result
        model.train()
        count = max(sums[3].item(), 1.0)
        out = {"eval_loss": sums[0].item() / count, "eval_accuracy": sums[1].item() / count}
        if getattr(self.heldout, "multi_label", False):
            out["eval_precision_at_1"] = sums[2].item() / count
        out["eval_images"] = int(sums[3].item())
        return out

    def describe(self) -> dict[str, dict]:
        """The model, after the dataset fixed the class count, and the preprocessing its
        training images had (none for synthetic images)."""
        out = {"model": dataclasses.asdict(self.config.model)}
        if self.heldout.preprocessing is not None:     # how evaluation reads an image
            out["preprocessing"] = self.heldout.preprocessing.to_dict()
        if names := class_names(self.config.data.dataset, self.heldout):
            out["classes"] = {"names": names}          # for megavit.predict's output
        return out

    def checkpoint_files(self) -> dict[str, bytes]:
        return {}

    def log_lines(self, run: Run) -> list[str]:
        total = parameter_count(run, run.model.parameters())
        return self._lines(run, total) + self._finetuning_lines(run, total)

    def _finetuning_lines(self, run: Run, total: float) -> list[str]:
        training, layers = self.config.training, self.config.model.num_layers
        lines = []
        if training.freeze_backbone:
            trained = parameter_count(run, (p for _, p in self.trainable_parameters(run.model)))
            lines.append(f"linear probe: the backbone is frozen (forward only, eval mode); "
                         f"training the classifier's {int(trained):,} of {int(total):,} "
                         "parameters")
        if training.layer_decay not in (None, 1.0):
            decay = training.layer_decay
            lines.append(f"layer-wise lr decay {decay}: embeddings x{decay ** (layers + 1):.3g}, "
                         f"block 0 x{decay ** layers:.3g}, block {layers - 1} x{decay:.3g}, "
                         "final norm and head x1")
        return lines

    def _lines(self, run: Run, total: float) -> list[str]:
        cfg, m, t = self.config, self.config.model, self.config.training
        return [
            f"model: {cfg.preset or 'custom'} | block {m.block_type} | layers {m.num_layers} "
            f"| hidden {m.hidden_size} | heads {m.num_attention_heads} | ffn {m.ffn_hidden_size} "
            f"| patch {m.patch_dim} | image {m.img_h}x{m.img_w}x{m.num_channels} "
            f"| tokens {m.seq_length} | pooling {m.pooling} | classes {m.num_classes} "
            f"| parameters {_count(total)} | gflops_per_image_fwd "
            f"{run.model.estimate_flops(1, training=False) / 1e9:.3f}",
            f"data: {self.train_set.name} {len(self.train_set)} images | {self.heldout.name} "
            f"{len(self.heldout)} images | global batch {t.global_batch_size} = micro "
            f"{t.micro_batch_size} x {run.micro_batches} micro-batches x dp {run.pstate.dp.size}",
            self._augment_line()]

    def _augment_line(self) -> str:
        line = (f"augment: {self.config.data.augment} | {self.recipe.describe()} | loss "
                f"{self.config.data.loss}")
        backends = {a.backend for a in (self.augmenter, self.mixer) if a is not None}
        if backends == {"torchvision"}:
            line += f" | images through torchvision {torchvision_version()} transforms v2"
        elif backends:
            line += (" | images through megavit's torch implementation (torchvision does not "
                     "import here; the same draws)")
        return line

    def flops_per_step(self, run: Run) -> float:
        """Forward and backward (3x forward); a linear probe runs the forward only (the
        classifier's backward is not counted)."""
        return run.model.estimate_flops(self.config.training.global_batch_size,
                                        training=not self.config.training.freeze_backbone)

    def train_fields(self, run: Run) -> dict[str, float]:
        return {}

    def summary_fields(self, evaluation: dict[str, float]) -> dict[str, Any]:
        return {"eval_loss": evaluation["eval_loss"],
                "eval_accuracy": evaluation["eval_accuracy"]}


def classification_run(cfg: Config, pstate: ParallelState) -> Run:
    """The engine's run of a classifier with the flags `cfg`, on this rank."""
    return Run.build(ClassificationTask(cfg), pstate)
