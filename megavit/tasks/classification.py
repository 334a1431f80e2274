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
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import Config, ConfigError
from megavit.data.datasets import Dataset, build_datasets
from megavit.data.sampler import (MicroBatch, eval_batches, labels_from_first_stage,
                                  train_batches)
from megavit.models.transformer import Runtime
from megavit.models.vit import build_stage, vit_layer_id
from megavit.parallel.pipeline_executor import StepStats
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.state import ParallelState
from megavit.training.loop import parameter_count
from megavit.training.run import Run
from megavit.training.step import pipeline_forward_backward, run_micro_batches

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
    """Mean cross-entropy of logits [b, classes] against labels [b]."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

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


class ClassificationTask:
    """A ViT classifier trained with cross-entropy on an image dataset."""

    throughput_unit = "images"

    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.train_set: Dataset | None = None
        self.heldout: Dataset | None = None
        self.loss_fn = classification_loss(cfg.training.label_smoothing)

    def prepare(self, pstate: ParallelState) -> Config:
        self.train_set, self.heldout = build_datasets(self.config.data, self.config.model,
                                                      self.config.training.seed)
        self.config = resolve_num_classes(self.config, self.train_set)
        return self.config

    def build_model(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> nn.Module:
        model = build_stage(self.config.model, runtime, self.config.training.seed, layout,
                            stage, pstate.device, dtype)
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
                                t.micro_batch_size, d.num_workers, d.augment,
                                run.is_first_stage, with_labels=not handed)
        return labels_from_first_stage(batches, run.pstate.pp) if handed else batches

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
        """Mean loss and top-1 accuracy over the held-out split (or its first --eval-iters
        global batches): the same images in every layout, run forward through the
        pipeline, summed over DP ranks and shared from the last stage with the others."""
        pstate, model, training = run.pstate, run.model, self.config.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=pstate.device)  # loss, correct, count

        def tally(mb: int, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = logits.float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += (logits.argmax(dim=-1) == labels).sum()
            sums[2] += labels.numel()
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
        count = max(sums[2].item(), 1.0)
        return {"eval_loss": sums[0].item() / count, "eval_accuracy": sums[1].item() / count,
                "eval_images": int(sums[2].item())}

    def describe(self) -> dict[str, dict]:
        """The model, after the dataset fixed the class count, and the preprocessing its
        training images had (none for synthetic images)."""
        out = {"model": dataclasses.asdict(self.config.model)}
        if self.train_set.preprocessing is not None:
            out["preprocessing"] = self.train_set.preprocessing.to_dict()
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
            f"{t.micro_batch_size} x {run.micro_batches} micro-batches x dp {run.pstate.dp.size}"]

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
