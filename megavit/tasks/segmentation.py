"""Semantic segmentation (`megavit.segment`): a ViT whose last block's tokens go through a
feature pyramid and a per-pixel decoder (models/dense.py), on the one engine.

    data        --dataset mnist-seg -> MicroBatch(images [m, c, H, W], label maps [m, H, W],
                sample ids); training canvases composed fresh per draw, keyed by the global
                sample id (data/segmentation.py), so every layout reads the same batches
    model       this stage's chunks of a DenseVisionTransformer (`build_dense_stage`)
    loss        per-pixel cross-entropy over the non-ignored pixels of a micro-batch
                (--ignore-index), on logits upsampled to the input, through the pipeline
                schedule like classification's
    evaluate    held-out loss, mean IoU and pixel accuracy from one confusion matrix summed
                over DP and shared from the last stage

    run = segmentation_run(cfg, pstate)      # the engine's Run of this task
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import Config
from megavit.config.segmentation import SegmentationRunConfig, with_backbone_defaults
from megavit.data.sampler import MicroBatch, eval_batches
from megavit.data.segmentation import build_segmentation_datasets
from megavit.models.dense import build_dense_stage, dense_head_flops
from megavit.models.transformer import Runtime
from megavit.parallel.pipeline_executor import StepStats
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.state import ParallelState
from megavit.training.loop import parameter_count
from megavit.training.run import Run
from megavit.training.step import pipeline_forward_backward, run_micro_batches


def segmentation_loss(ignore_index: int):
    """logits [m, K, H, W], labels [m, H, W] -> the mean cross-entropy over the pixels
    whose label is not `ignore_index` (0 when there are none)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                                reduction="sum")
        return total / (labels != ignore_index).sum().clamp_min(1)

    return loss


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """[K, K] int64 counts of (true class row, predicted class column) over the pixels of
    `labels` [m, H, W] that are not `ignore_index`; predictions: argmax of logits
    [m, K, H, W]."""
    valid = labels != ignore_index
    pred = logits.argmax(dim=1)[valid]
    return torch.bincount(labels[valid] * num_classes + pred,
                          minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Mean IoU (over the classes that occur in the labels or the predictions: union > 0)
    and pixel accuracy from a [K, K] confusion matrix; the per-class IoU (nan where the
    union is 0) under "iou"."""
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp_min(1), torch.full_like(hits, float("nan")))
    seen = union > 0
    return {"miou": iou[seen].mean().item() if seen.any() else 0.0,
            "pixel_accuracy": (hits.sum() / confusion.sum().clamp_min(1)).item(),
            "iou": iou.tolist()}


class SegmentationTask:
    """A ViT with a feature pyramid and a per-pixel decoder, trained with per-pixel
    cross-entropy on a label-map dataset."""

    throughput_unit = "images"

    def __init__(self, cfg: SegmentationRunConfig) -> None:
        self.requested_classes = cfg.base.model.num_classes    # --num-classes (folders)
        self.cfg = with_backbone_defaults(cfg)
        self.config: Config = self.cfg.base
        self.seg = self.cfg.segmentation
        self.loss_fn = segmentation_loss(self.seg.ignore_index)
        self.train_set: Any = None
        self.heldout: Any = None

    @property
    def num_classes(self) -> int:
        return self.train_set.num_classes

    def prepare(self, pstate: ParallelState) -> Config:
        self.train_set, self.heldout = build_segmentation_datasets(
            self.config.data, self.config.model, self.requested_classes, self.seg.ignore_index)
        return self.config

    def build_model(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> nn.Module:
        s = self.seg
        return build_dense_stage(self.config.model, runtime, self.config.training.seed,
                                 layout, stage, self.num_classes, s.neck, s.neck_channels,
                                 s.decoder_channels, pstate.device, dtype)

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return list(model.named_parameters())

    def lr_scale(self, name: str) -> float:
        return 1.0

    @property
    def train_size(self) -> int:
        return len(self.train_set)

    def batches(self, run: Run, start: int, stop: int) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches of iterations [start, stop): its contiguous slice of
        the global batch, each canvas composed under its global sample id (images only on
        the stage holding the first chunk; every stage has the label maps)."""
        t, dp = self.config.training, run.pstate.dp
        g = t.global_batch_size
        per_rank = g // dp.size
        for iteration in range(start, stop):
            idx = run.sampler.local_indices(iteration, dp.rank, dp.size)
            ids = iteration * g + dp.rank * per_rank + torch.arange(per_rank)
            images, maps = self.train_set.compose(idx, ids)
            if not run.is_first_stage:
                images = None
            yield [MicroBatch(None if images is None else images[k:k + t.micro_batch_size],
                              maps[k:k + t.micro_batch_size],
                              ids[k:k + t.micro_batch_size].clone())
                   for k in range(0, per_rank, t.micro_batch_size)]

    def micro_batch_count(self, batch: list[MicroBatch]) -> int:
        return len(batch)

    def forward_backward(self, run: Run, batch: list[MicroBatch], loss_scale: float | None,
                         measure: bool) -> tuple[torch.Tensor, StepStats]:
        return pipeline_forward_backward(run, batch, self.loss_fn, loss_scale, measure)

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        """Mean per-pixel loss, mean IoU and pixel accuracy over the held-out split (or
        its first --eval-iters global batches): the same canvases in every layout, one
        confusion matrix summed over DP ranks and shared from the last stage."""
        pstate, model, training = run.pstate, run.model, self.config.training
        k, ignore = self.num_classes, self.seg.ignore_index
        model.eval()
        confusion = torch.zeros(k, k, dtype=torch.int64, device=pstate.device)
        sums = torch.zeros(3, dtype=torch.float64, device=pstate.device)  # loss, pixels, images

        def tally(mb: int, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            nonlocal confusion
            logits = logits.float()
            confusion += confusion_matrix(logits, labels, k, ignore)
            sums[0] += F.cross_entropy(logits, labels, ignore_index=ignore,
                                       reduction="sum").double()
            sums[1] += (labels != ignore).sum()
            sums[2] += len(labels)
            return logits.new_zeros(())

        for micro_batches in eval_batches(self.heldout, training.global_batch_size,
                                          pstate.dp.rank, pstate.dp.size,
                                          training.micro_batch_size,
                                          self.config.logging.eval_iters, run.is_first_stage):
            micro_batches = [mb for mb in micro_batches if mb.labels.numel()]
            if micro_batches:
                run_micro_batches(model, run.executor, micro_batches, pstate, tally,
                                  forward_only=True)
        pstate.dp.all_reduce(confusion)
        pstate.dp.all_reduce(sums)
        last = pstate.pp.size - 1                  # every stage reports the result
        pstate.pp.broadcast(confusion, src=last)
        pstate.pp.broadcast(sums, src=last)
        model.train()
        metrics = iou_metrics(confusion.cpu())
        return {"eval_loss": sums[0].item() / max(sums[1].item(), 1.0),
                "eval_miou": metrics["miou"], "eval_pixel_accuracy": metrics["pixel_accuracy"],
                "eval_images": int(sums[2].item())}

    def describe(self) -> dict[str, dict]:
        return {"model": dataclasses.asdict(self.config.model),
                "segmentation": {**dataclasses.asdict(self.seg), "num_classes": self.num_classes,
                                 "class_names": list(self.train_set.class_names)},
                "preprocessing": self.heldout.preprocessing.to_dict()}

    def checkpoint_files(self) -> dict[str, bytes]:
        return {}

    def log_lines(self, run: Run) -> list[str]:
        cfg, m, t, s = self.config, self.config.model, self.config.training, self.seg
        total = parameter_count(run, run.model.parameters())
        return [
            f"model: {cfg.preset or 'custom'} | block {m.block_type} | layers {m.num_layers} "
            f"| hidden {m.hidden_size} | heads {m.num_attention_heads} | patch {m.patch_dim} "
            f"| image {m.img_h}x{m.img_w}x{m.num_channels} | tokens {m.seq_length} | neck "
            f"{s.neck} ({s.neck_channels} channels) | decoder {s.decoder_channels} channels | "
            f"classes {self.num_classes} | parameters {int(total):,} | gflops_per_image_fwd "
            f"{self._flops(run, 1, False) / 1e9:.3f}",
            f"data: {self.train_set.name} {len(self.train_set)} images | {self.heldout.name} "
            f"{len(self.heldout)} images | global batch "
            f"{t.global_batch_size} = micro {t.micro_batch_size} x {run.micro_batches} "
            f"micro-batches x dp {run.pstate.dp.size} | ignore index {s.ignore_index}"]

    def _flops(self, run: Run, batch: int, training: bool) -> float:
        s = self.seg
        return (run.model.estimate_flops(batch, training) + dense_head_flops(
            self.config.model, s.neck, s.neck_channels, s.decoder_channels, self.num_classes,
            batch, training))

    def flops_per_step(self, run: Run) -> float:
        return self._flops(run, self.config.training.global_batch_size, True)

    def train_fields(self, run: Run) -> dict[str, float]:
        return {}

    def summary_fields(self, evaluation: dict[str, float]) -> dict[str, Any]:
        return {key: evaluation[key] for key in ("eval_loss", "eval_miou",
                                                  "eval_pixel_accuracy")}


def segmentation_run(cfg: SegmentationRunConfig, pstate: ParallelState) -> Run:
    """The engine's run of a segmentation model with the flags `cfg`, on this rank."""
    return Run.build(SegmentationTask(cfg), pstate)
