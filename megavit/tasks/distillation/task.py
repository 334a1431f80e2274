"""Distillation (`megavit.distill`): a student classifier trained on the labels and on a
frozen teacher's logits (response distillation: losses.py).

    data        the classification task's micro-batches (augmented, mixed); on the first
                pipeline stage the teacher runs forward on each micro-batch's images (resized
                and renormalised to its own preprocessing when it differs), and its logits
                [m, C] travel to every stage with the labels: one broadcast of [M m, C] on the
                pipeline group per step. A micro-batch's labels become [m, 2C]: the task's
                targets as distributions, then the teacher's logits
    teacher     where it runs: at the job's tensor-parallel size (its heads split like the
                student's, the TP group's collectives), at every data-parallel rank on its
                own images, and only on the first pipeline stage, before the student's
                schedule of the step: the images are there, the logits are small to send,
                and the student's schedule (1F1B or interleaved) is left as it is. Eval
                mode, no gradient, no optimizer state, nothing kept for backward; in the
                student's parameter dtype
    loss        (1 - alpha) x the classification loss + alpha x distillation, per
                micro-batch on the last stage (losses.py `response_loss`)
    evaluate    the student as the classification task does, and the teacher's accuracy on
                the same held-out images (computed once)
    checkpoint  the student only; its description records the teacher's checkpoint and the
                SHA-256 of the teacher's megavit_config.json (not its weights)

    run = Run.build(DistillationTask(cfg), pstate)     # cfg: DistillationRunConfig
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from megavit.checkpointing.checkpointer import CONFIG_FILE, resolve_checkpoint
from megavit.checkpointing.inference import InferenceModel, load_frozen_classifier
from megavit.checkpointing.model_config import read_checkpoint_info
from megavit.checkpointing.model_state import CheckpointLoadError
from megavit.config import Config, ModelConfig
from megavit.config.distillation import DistillationRunConfig
from megavit.data.preprocessing import Preprocessing
from megavit.data.sampler import MicroBatch, eval_batches
from megavit.data.targets import class_targets, primary_labels
from megavit.models.transformer import Runtime
from megavit.parallel.pipeline_executor import StepStats
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.state import ParallelState
from megavit.tasks.classification import ClassificationTask
from megavit.tasks.distillation.losses import response_loss
from megavit.training.run import Run
from megavit.training.step import pipeline_forward_backward


def teacher_input(images: torch.Tensor, student: Preprocessing | None,
                  teacher: Preprocessing) -> torch.Tensor:
    """The student's normalised images [m, c, H, W] as the teacher was trained to read
    them: back to pixels and normalised with the teacher's mean / std when they differ,
    resized (bilinear, antialiased) to its size when that differs. `student` None (images
    not made from pixels): only the size is adapted."""
    x = images
    if student is not None and (student.mean, student.std) != (teacher.mean, teacher.std):
        shape = (1, -1, 1, 1)
        s_mean, s_std, t_mean, t_std = (torch.tensor(v, dtype=x.dtype, device=x.device)
                                        .view(shape) for v in (student.mean, student.std,
                                                               teacher.mean, teacher.std))
        x = (x * s_std + s_mean - t_mean) / t_std
    if tuple(x.shape[-2:]) != (teacher.height, teacher.width):
        x = F.interpolate(x.float(), size=(teacher.height, teacher.width), mode="bilinear",
                          align_corners=False, antialias=True).to(images.dtype)
    return x


def teacher_reference(path: str) -> dict[str, str]:
    """What a student's checkpoint records of its teacher: the iter_N/ directory read and
    the SHA-256 of its megavit_config.json."""
    checkpoint = resolve_checkpoint(Path(path))
    digest = hashlib.sha256((checkpoint / CONFIG_FILE).read_bytes()).hexdigest()
    return {"teacher_checkpoint": str(checkpoint), "teacher_config_sha256": digest}


class DistillationTask(ClassificationTask):
    """A student ViT classifier learning from labels and a frozen teacher's logits."""

    def __init__(self, cfg: DistillationRunConfig) -> None:
        super().__init__(cfg.base)
        self.distill = cfg.distillation
        self.teacher: InferenceModel | None = None     # on the first pipeline stage only
        self.teacher_model: ModelConfig | None = None  # every rank
        self.teacher_eval: dict[str, float] | None = None

    def prepare(self, pstate: ParallelState) -> Config:
        cfg = super().prepare(pstate)
        info = read_checkpoint_info(resolve_checkpoint(Path(self.distill.teacher_checkpoint)))
        self.teacher_model = ModelConfig(**info["model"])
        if self.teacher_model.num_classes != cfg.model.num_classes:
            raise CheckpointLoadError(
                f"--teacher-checkpoint {self.distill.teacher_checkpoint}: the teacher has "
                f"{self.teacher_model.num_classes} classes, the student "
                f"{cfg.model.num_classes}: response distillation needs the same classes")
        return cfg

    def build_model(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> torch.nn.Module:
        model = super().build_model(runtime, layout, stage, pstate, dtype)
        self.teacher = load_frozen_classifier(Path(self.distill.teacher_checkpoint), pstate,
                                              here=stage == 0)
        if self.teacher is not None:
            self.teacher.model.to(dtype)
        return model

    # ---- data: the teacher's logits join the labels ------------------------------------

    def teacher_logits(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The teacher's logits [m, C] (float32) of the student's images [m, c, H, W]."""
        device = next(self.teacher.model.parameters()).device
        with torch.no_grad():
            x = teacher_input(images.to(device, dtype), self.train_set.preprocessing,
                              self.teacher.preprocessing)
            return self.teacher.model(x).float()

    def batches(self, run: Run, start: int, stop: int) -> Iterator[list[MicroBatch]]:
        classes = self.config.model.num_classes
        pstate = run.pstate
        for micro_batches in super().batches(run, start, stop):
            if not micro_batches:
                yield micro_batches
                continue
            sizes = [len(mb.labels) for mb in micro_batches]
            if run.is_first_stage:
                logits = torch.cat([self.teacher_logits(mb.images, run.dtype)
                                    for mb in micro_batches])
            else:
                logits = torch.zeros(sum(sizes), classes, device=pstate.device)
            if pstate.pp.size > 1:
                logits = pstate.pp.broadcast(logits.contiguous(), src=0)
            yield [mb._replace(labels=torch.cat(
                       [class_targets(mb.labels, classes).to(t.device), t], dim=-1))
                   for mb, t in zip(micro_batches, logits.split(sizes))]

    # ---- loss ---------------------------------------------------------------------------

    def distillation_loss(self, logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The mixed loss of the student's logits [m, C] against packed labels [m, 2C]."""
        classes = logits.shape[-1]
        targets, teacher = packed[:, :classes], packed[:, classes:]
        d = self.distill
        return response_loss(d.distill_loss, self.loss_fn(logits, targets), logits, teacher,
                             d.distill_alpha, d.distill_temperature)

    def forward_backward(self, run: Run, batch: list[MicroBatch], loss_scale: float | None,
                         measure: bool) -> tuple[torch.Tensor, StepStats]:
        return pipeline_forward_backward(run, batch, self.distillation_loss, loss_scale,
                                         measure)

    # ---- evaluation, description, logs --------------------------------------------------

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        out = super().evaluate(run)
        if self.teacher_eval is None:
            self.teacher_eval = self.evaluate_teacher(run)
        return {**out, **self.teacher_eval}

    def evaluate_teacher(self, run: Run) -> dict[str, float]:
        """The teacher's top-1 accuracy on the held-out images the student is evaluated on
        (first stage; summed over DP, shared over PP)."""
        pstate, training = run.pstate, self.config.training
        sums = torch.zeros(2, dtype=torch.float64, device=pstate.device)
        if run.is_first_stage:
            for micro_batches in eval_batches(self.heldout, training.global_batch_size,
                                              pstate.dp.rank, pstate.dp.size,
                                              training.micro_batch_size,
                                              self.config.logging.eval_iters):
                for mb in micro_batches:
                    if not mb.labels.numel():
                        continue
                    logits = self.teacher_logits(mb.images, run.dtype)
                    labels = primary_labels(mb.labels).to(logits.device)
                    sums[0] += (logits.argmax(-1) == labels).sum()
                    sums[1] += len(labels)
        pstate.dp.all_reduce(sums)
        if pstate.pp.size > 1:
            pstate.pp.broadcast(sums, src=0)
        return {"teacher_accuracy": sums[0].item() / max(sums[1].item(), 1.0)}

    def describe(self) -> dict[str, dict]:
        d = self.distill
        return {**super().describe(), "distillation": {
            **teacher_reference(d.teacher_checkpoint), "loss": d.distill_loss,
            "alpha": d.distill_alpha, "temperature": d.distill_temperature}}

    def log_lines(self, run: Run) -> list[str]:
        t, d = self.teacher_model, self.distill
        student = sum(p.numel() for p in run.model.parameters())
        line = (f"teacher: {d.teacher_checkpoint} | layers {t.num_layers} | hidden "
                f"{t.hidden_size} | heads {t.num_attention_heads} | image {t.img_h}x{t.img_w} "
                f"| frozen, forward only on the first pipeline stage at tensor-parallel size "
                f"{run.pstate.tp.size} | loss {d.distill_loss} | alpha {d.distill_alpha}"
                + (f" | temperature {d.distill_temperature}" if d.distill_loss == "soft" else ""))
        if self.teacher is not None:
            teacher = sum(p.numel() for p in self.teacher.model.parameters())
            line += f" | parameters per rank {teacher:,} (student's on this rank {student:,})"
        return super().log_lines(run) + [line]

    def summary_fields(self, evaluation: dict[str, float]) -> dict[str, Any]:
        student = evaluation["eval_accuracy"]
        teacher = evaluation.get("teacher_accuracy", float("nan"))
        return {"eval_loss": evaluation["eval_loss"], "student_accuracy": student,
                "teacher_accuracy": teacher,
                "student_teacher_ratio": student / teacher if teacher else float("nan")}
