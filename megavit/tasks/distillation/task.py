"""Distillation (`megavit.distill`): a student classifier trained on the labels and on a
frozen teacher's logits (response distillation: losses.py).

    data        the classification task's micro-batches (augmented, mixed); on the first
                pipeline stage the teacher runs forward on each micro-batch's images (resized
                and renormalised to its own preprocessing when it differs), and its logits
                [m, C] travel to every stage with the labels: one broadcast of [M m, C] on the
                pipeline group per step (with feature pairs the teacher's maps, with
                relation pairs its q, k, v of those blocks, travel the same way). A
                micro-batch's labels become [m, 2C (+ maps)]: the task's targets as
                distributions, the teacher's logits, its maps; the q, k, v go to the
                student blocks' RelationLinks (relations.py). With --distill-cache every
                stage reads the logits from the cache instead (cache.py)
    teacher     where it runs: at the job's tensor-parallel size (its heads split like the
                student's, the TP group's collectives), at every data-parallel rank on its
                own images, and only on the first pipeline stage, before the student's
                schedule of the step: the images are there, the logits are small to send,
                and the student's schedule (1F1B or interleaved) is left as it is. Eval
                mode, no gradient, no optimizer state, nothing kept for backward; in the
                student's parameter dtype
    loss        (1 - alpha) x the classification loss + alpha x distillation (losses.py
                `response_loss`) + the feature term, per micro-batch on the last stage; the
                relation term in the paired student blocks' backward, on their stages
    evaluate    the student as the classification task does, and the teacher's accuracy on
                the same held-out images (computed once)
    checkpoint  the student only; its description records the teacher's checkpoint and the
                SHA-256 of the teacher's megavit_config.json (not its weights)

    run = Run.build(DistillationTask(cfg), pstate)     # cfg: DistillationRunConfig
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from megavit.checkpointing.checkpointer import CONFIG_FILE, resolve_checkpoint
from megavit.checkpointing.inference import (InferenceModel, checkpoint_kind,
                                             load_frozen_classifier)
from megavit.checkpointing.model_config import read_checkpoint_info
from megavit.checkpointing.model_state import CheckpointLoadError
from megavit.config import Config, ConfigError, ModelConfig
from megavit.config.distillation import DistillationRunConfig
from megavit.data.preprocessing import Preprocessing
from megavit.data.sampler import MicroBatch, eval_batches
from megavit.data.targets import class_targets, primary_labels
from megavit.models.distilled import build_distilled_stage
from megavit.models.transformer import Runtime
from megavit.parallel.pipeline_executor import StepStats
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.state import ParallelState
from megavit.tasks.classification import ClassificationTask
from megavit.tasks.distillation.cache import (CacheManifest, TeacherCache, TeacherCacheError,
                                              cache_identity, shard_name)
from megavit.tasks.distillation.losses import feature_distillation, response_loss
from megavit.tasks.distillation.relations import RelationLink, TeacherCapture
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


def teacher_reference(path: str | Path) -> dict[str, str]:
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
        self.pairs: list[tuple[int, int]] = []
        self.relation_pairs: list[tuple[int, int]] = []
        self.links: list[RelationLink] = []            # one per relation pair
        self.captures: list[TeacherCapture] = []        # (first stage)
        self.logged_steps = 0
        self.cache: TeacherCache | None = None          # --distill-cache
        self.teacher_dir: Path | None = None             # the teacher's iter_N/

    def prepare(self, pstate: ParallelState) -> Config:
        cfg = super().prepare(pstate)
        if self.distill.distill_cache:
            self.open_cache(cfg)
        else:     # resolved once: a --save directory may get a newer iter_N meanwhile
            self.teacher_dir = resolve_checkpoint(Path(self.distill.teacher_checkpoint))
            info = read_checkpoint_info(self.teacher_dir)
            if (kind := checkpoint_kind(info)) != "classifier":
                raise CheckpointLoadError(
                    f"--teacher-checkpoint {self.distill.teacher_checkpoint}: a {kind} "
                    "checkpoint; megavit.distill distils classifiers" + (
                        " (a two-tower student learns from a two-tower teacher with python "
                        "-m megavit.pretrain_contrastive --teacher-checkpoint)"
                        if kind == "two-tower" else ""))
            self.teacher_model = ModelConfig(**info["model"])
        if self.teacher_model.num_channels != cfg.model.num_channels:
            raise ConfigError(f"--teacher-checkpoint {self.distill.teacher_checkpoint}: the "
                              f"teacher reads {self.teacher_model.num_channels}-channel "
                              f"images, the student {cfg.model.num_channels} (--num-channels)")
        if self.teacher_model.num_classes != cfg.model.num_classes:
            raise CheckpointLoadError(
                f"--teacher-checkpoint {self.distill.teacher_checkpoint}: the teacher has "
                f"{self.teacher_model.num_classes} classes, the student "
                f"{cfg.model.num_classes}: response distillation needs the same classes")
        if self.distill.distill_loss == "token":
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, distillation_token=True))
            self.config = cfg
        self.relation_pairs = self.distill.relation_pairs()
        self.check_relation_pairs(cfg, self.teacher_model)
        self.pairs = self.distill.feature_pairs()
        if self.pairs:
            self.check_pairs(cfg.model, self.teacher_model)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, feature_layers=",".join(str(s) for s, _ in self.pairs)))
            self.config = cfg
        return cfg

    def open_cache(self, cfg: Config) -> None:
        """--distill-cache: the manifest fits this run (data, seed, batch sizes, image,
        classes; the teacher's config when --teacher-checkpoint is given) and its shards
        cover --train-iters; TeacherCacheError naming what does not."""
        root = Path(self.distill.distill_cache)
        manifest = CacheManifest.read(root)
        if self.distill.teacher_checkpoint:
            self.teacher_dir = resolve_checkpoint(Path(self.distill.teacher_checkpoint))
        sha = (teacher_reference(self.teacher_dir)["teacher_config_sha256"]
               if self.teacher_dir else manifest.identity["teacher_config_sha256"])
        if differ := manifest.differences(cache_identity(cfg, sha, 0, self.recipe)):
            raise TeacherCacheError(f"--distill-cache {root}: written for another teacher or "
                                    "other data: " + "; ".join(differ))
        if gone := [f for f in manifest.shards if not (root / shard_name(f)).is_file()]:
            raise TeacherCacheError(f"--distill-cache {root}: {shard_name(gone[0])} is "
                                    "listed but missing; run tools/cache_teacher.py again")
        if missing := manifest.missing(cfg.training.train_iters):
            raise TeacherCacheError(f"--distill-cache {root}: no rows for iterations "
                                    f"{missing[0]}..{missing[-1]} (--train-iters "
                                    f"{cfg.training.train_iters}); run tools/cache_teacher.py "
                                    "with this --train-iters")
        self.teacher_model = ModelConfig(**manifest.teacher_model)
        if self.distill.distill_pooled_weight and not manifest.identity.get("pooled_features"):
            raise TeacherCacheError(f"--distill-cache {root}: holds no pooled features "
                                    "(--distill-pooled-weight needs them); write it with "
                                    "tools/cache_teacher.py --pooled-features")
        self.cache = TeacherCache(root, manifest, cfg.training.global_batch_size)

    def check_pairs(self, student: ModelConfig, teacher: ModelConfig) -> None:
        """Each pair's teacher block exists and its grid can be aligned with the student's."""
        flag = f"--distill-feature-pairs {self.distill.distill_feature_pairs}"
        for s, t in self.pairs:
            if not 0 <= t < teacher.num_layers:
                raise ConfigError(f"{flag}: teacher block {t} outside 0..{teacher.num_layers - 1}")
            (sh, sw), (th, tw) = student.grid_at(s), teacher.grid_at(t)
            if sh * tw != sw * th:
                raise ConfigError(f"{flag}: student block {s}'s {sh}x{sw} patch grid and "
                                  f"teacher block {t}'s {th}x{tw} have different aspect "
                                  "ratios; their tokens cannot be aligned")

    @property
    def relation_heads(self) -> int:
        return self.distill.distill_relation_heads or self.config.model.num_attention_heads

    def check_relation_pairs(self, cfg: Config, teacher: ModelConfig) -> None:
        """Each relation pair's teacher block exists, sees as many tokens as the student's,
        and the relation heads divide the teacher's width."""
        flag = f"--distill-relation-pairs {self.distill.distill_relation_pairs}"
        heads = self.distill.distill_relation_heads or cfg.model.num_attention_heads
        if self.relation_pairs and teacher.hidden_size % heads:
            raise ConfigError(f"--distill-relation-heads {heads} does not divide the teacher's "
                              f"width {teacher.hidden_size}")
        for s, t in self.relation_pairs:
            if not 0 <= t < teacher.num_layers:
                raise ConfigError(f"{flag}: teacher block {t} outside 0..{teacher.num_layers - 1}")
            ls, lt = cfg.model.at_layer(s).seq_length, teacher.at_layer(t).seq_length
            if ls != lt:
                raise ConfigError(f"{flag}: student block {s} sees {ls} tokens, teacher block "
                                  f"{t} {lt}: relations compare token with token (use the "
                                  "same grid and prefix tokens)")

    @property
    def relation_sizes(self) -> list[int]:
        """Per relation pair, the flattened size of one image's teacher q, k, v on this TP
        rank: L * 3 * h_t / t."""
        t = self.config.parallel.tensor_model_parallel_size
        m = self.teacher_model
        return [m.at_layer(j).seq_length * 3 * m.hidden_size // t
                for _, j in self.relation_pairs]

    @property
    def pooled_width(self) -> int:
        """The teacher's pooled-feature width w_p with --distill-pooled-weight, else 0."""
        return self.teacher_model.hidden_size if self.distill.distill_pooled_weight else 0

    @property
    def feature_sizes(self) -> list[int]:
        """Per pair, the flattened size of one image's projected map: H_s * W_s * w_t."""
        m, t = self.config.model, self.teacher_model
        return [m.grid_at(s)[0] * m.grid_at(s)[1] * t.hidden_size for s, _ in self.pairs]

    def build_model(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> torch.nn.Module:
        model = super().build_model(runtime, layout, stage, pstate, dtype)
        self.teacher = None if self.cache is not None else load_frozen_classifier(
            self.teacher_dir, pstate, here=stage == 0)
        if self.teacher is not None:
            self.teacher.model.to(dtype)
        self.connect_relations(model, pstate)
        return model

    def build_stage(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> torch.nn.Module:
        """With feature pairs or a pooled-feature term a DistilledStudent (its projections
        on the last stage)."""
        if not (self.pairs or self.pooled_width):
            return super().build_stage(runtime, layout, stage, pstate, dtype)
        return build_distilled_stage(self.config.model, runtime, self.config.training.seed,
                                     layout, stage,
                                     [self.teacher_model.hidden_size] * len(self.pairs),
                                     pstate.device, dtype, self.pooled_width)

    def connect_relations(self, model: torch.nn.Module, pstate: ParallelState) -> None:
        """A RelationLink on each paired student block held here, a TeacherCapture on each
        paired teacher block (first stage)."""
        self.links = [RelationLink(self.relation_heads, pstate.tp.size,
                                   self.distill.distill_relation_weight,
                                   self.config.model.at_layer(s).seq_length)
                      for s, _ in self.relation_pairs]
        for (s, _), link in zip(self.relation_pairs, self.links):
            for chunk in model.chunks:
                if str(s) in chunk.blocks:
                    chunk.blocks[str(s)].attention.relation = link
        if self.teacher is not None:
            self.captures = [TeacherCapture() for _ in self.relation_pairs]
            for (_, t), capture in zip(self.relation_pairs, self.captures):
                self.teacher.model.blocks[str(t)].attention.relation = capture

    # ---- data: the teacher's logits join the labels ------------------------------------

    def teacher_logits(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The teacher's logits [m, C] (float32) of the student's images [m, c, H, W]."""
        return self.teacher_targets(images, dtype, features=False)

    def teacher_view(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The student's images on the teacher's device, in `dtype`, as the teacher was
        trained to read them (`teacher_input`)."""
        device = next(self.teacher.model.parameters()).device
        return teacher_input(images.to(device, dtype), self.train_set.preprocessing,
                             self.teacher.preprocessing)

    def teacher_logits_and_pooled(self, images: torch.Tensor, dtype: torch.dtype
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits [m, C] and pooled features [m, w_p] (float32) of the
        student's images, from one pass (tools/cache_teacher.py --pooled-features)."""
        pooled: list[torch.Tensor] = []
        logits, _ = self.teacher.model.output_and_intermediates(
            self.teacher_view(images, dtype), [], pooled=pooled)
        return logits.float(), pooled[0].float()

    def teacher_targets(self, images: torch.Tensor, dtype: torch.dtype,
                        features: bool = True) -> torch.Tensor:
        """The teacher's logits [m, C], then (with `features`) its pooled features [m, w_p]
        when --distill-pooled-weight asks for them, each feature pair's teacher map resized
        to the student block's grid, as [m, H_s, W_s, w_t] flattened, and each relation
        pair's teacher q, k, v of this TP rank as [m, L, 3 h_t / t] flattened:
        [m, C + w_p + sum(feature_sizes) + sum(relation_sizes)] float32."""
        x = self.teacher_view(images, dtype)
        pooled: list[torch.Tensor] | None = [] if features and self.pooled_width else None
        if features and (self.pairs or pooled is not None):
            logits, maps = self.teacher.model.output_and_intermediates(
                x, [t for _, t in self.pairs], pooled=pooled)
        else:
            with torch.no_grad():
                logits, maps = self.teacher.model(x), []
        out = [logits.float(), *(p.float() for p in pooled or [])]
        for (s, _), teacher_map in zip(self.pairs, maps):
            size = self.config.model.grid_at(s)
            if tuple(teacher_map.shape[-2:]) != size:
                teacher_map = F.interpolate(teacher_map.float(), size=size, mode="bilinear",
                                            align_corners=False)
            out.append(teacher_map.float().permute(0, 2, 3, 1).flatten(1))
        if features:         # the relation pairs' q, k, v, caught by that same forward
            out += [c.qkv.float().transpose(0, 1).flatten(1) for c in self.captures]
        return torch.cat(out, dim=1)

    def batches(self, run: Run, start: int, stop: int) -> Iterator[list[MicroBatch]]:
        classes = self.config.model.num_classes
        pstate = run.pstate
        for micro_batches in super().batches(run, start, stop):
            if not micro_batches:
                yield micro_batches
                continue
            sizes = [len(mb.labels) for mb in micro_batches]
            if self.cache is not None:     # every stage reads its rows: nothing to send
                yield [mb._replace(labels=torch.cat(
                           [class_targets(mb.labels, classes),
                            self.cache.logits(mb.sample_ids, classes),
                            *([self.cache.pooled(mb.sample_ids)] if self.pooled_width
                              else [])], dim=-1))
                       for mb in micro_batches]
                continue
            if run.is_first_stage:
                logits = torch.cat([self.teacher_targets(mb.images, run.dtype)
                                    for mb in micro_batches])
            else:
                logits = torch.zeros(sum(sizes), classes + self.pooled_width
                                     + sum(self.feature_sizes) + sum(self.relation_sizes),
                                     device=pstate.device)
            if pstate.pp.size > 1:
                logits = pstate.pp.broadcast(logits.contiguous(), src=0)
            kept = classes + self.pooled_width + sum(self.feature_sizes)
            for link in self.links:
                link.targets = {}                     # the previous step's are done with
            for mb, t in zip(micro_batches, logits.split(sizes)):
                first = int(mb.sample_ids[0])
                for link, qkv in zip(self.links, t[:, kept:].split(self.relation_sizes, 1)):
                    link.targets[first] = qkv.reshape(len(t), link.length, -1).chunk(3, -1)
            yield [mb._replace(labels=torch.cat(
                       [class_targets(mb.labels, classes).to(t.device), t[:, :kept]], dim=-1))
                   for mb, t in zip(micro_batches, logits.split(sizes))]

    # ---- loss ---------------------------------------------------------------------------

    def distillation_loss(self, output: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The loss of the student's output [m, C (+ the distillation token head's C) (+ its
        projected pooled features) (+ its projected feature maps)] against packed labels
        [m, 2C (+ the teacher's pooled features) (+ its maps)]: (1 - alpha) x the task's
        loss + alpha x the response term + the pooled weight x the pooled-feature term +
        the feature weight x the mean feature term over the pairs."""
        classes = self.config.model.num_classes
        sizes = self.feature_sizes
        token = self.config.model.distillation_token     # the token head's logits next
        pooled = [self.pooled_width] if self.pooled_width else []
        logits, *rest = output.split([classes, *([classes] if token else []), *pooled,
                                      *sizes], dim=1)
        token_logits, rest = (rest[0], rest[1:]) if token else (None, rest)
        student_pooled, student_maps = (rest[0], rest[1:]) if pooled else (None, rest)
        targets, teacher, *teacher_rest = packed.split([classes, classes, *pooled, *sizes],
                                                       dim=1)
        teacher_pooled, teacher_maps = ((teacher_rest[0], teacher_rest[1:]) if pooled
                                        else (None, teacher_rest))
        d = self.distill
        loss = response_loss(d.distill_loss, self.loss_fn(logits, targets), logits, teacher,
                             d.distill_alpha, d.distill_temperature, token_logits)
        if student_pooled is not None:
            loss = loss + d.distill_pooled_weight * feature_distillation(
                student_pooled[:, None], teacher_pooled[:, None], d.distill_feature_loss)
        if self.pairs and d.distill_feature_weight:
            width = self.teacher_model.hidden_size
            terms = [feature_distillation(s.reshape(len(s), -1, width),
                                          t.reshape(len(t), -1, width), d.distill_feature_loss)
                     for s, t in zip(student_maps, teacher_maps)]
            loss = loss + d.distill_feature_weight * sum(terms) / len(terms)
        return loss

    def forward_backward(self, run: Run, batch: list[MicroBatch], loss_scale: float | None,
                         measure: bool) -> tuple[torch.Tensor, StepStats]:
        for link in self.links:       # the relation terms join each micro-batch's backward
            link.micro_batches = len(batch)
            link.loss_scale = 1.0 if loss_scale is None else float(loss_scale)
        self.logged_steps += 1
        return pipeline_forward_backward(run, batch, self.distillation_loss, loss_scale,
                                         measure)

    def train_fields(self, run: Run) -> dict[str, float]:
        """`relation_loss`: the relation terms (unweighted, summed over the pairs) per step
        since the last line, summed over the TP shares and the stages holding the paired
        blocks, averaged over DP (three small all-reduces at log time)."""
        if not self.relation_pairs:
            return {}
        pstate = run.pstate
        total = torch.zeros((), dtype=torch.float64, device=pstate.device)
        for link in self.links:
            for value in link.values:
                total += value.double()
            link.values = []
        pstate.tp.all_reduce(total)
        pstate.pp.all_reduce(total)
        pstate.dp.all_reduce(total)
        steps, self.logged_steps = max(self.logged_steps, 1), 0
        return {"relation_loss": total.item() / steps / pstate.dp.size}

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
        if self.cache is not None:         # measured when the cache was written
            return {"teacher_accuracy": self.cache.manifest.teacher_accuracy}
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
        teacher = (teacher_reference(self.teacher_dir) if self.teacher_dir else
                   {"teacher_cache": d.distill_cache, "teacher_config_sha256":
                    self.cache.manifest.identity["teacher_config_sha256"]})
        return {**super().describe(), "distillation": {
            **teacher, "loss": d.distill_loss, "cache": d.distill_cache,
            "alpha": d.distill_alpha, "temperature": d.distill_temperature,
            "feature_pairs": d.distill_feature_pairs, "feature_loss": d.distill_feature_loss,
            "feature_weight": d.distill_feature_weight,
            "feature_widths": [self.teacher_model.hidden_size] * len(self.pairs),
            "pooled_width": self.pooled_width, "pooled_weight": d.distill_pooled_weight,
            "relation_pairs": d.distill_relation_pairs, "relation_heads": self.relation_heads,
            "relation_weight": d.distill_relation_weight}}

    def log_lines(self, run: Run) -> list[str]:
        t, d = self.teacher_model, self.distill
        student = sum(p.numel() for p in run.model.parameters())
        where = (f"from the cache {d.distill_cache} (top-"
                 f"{self.cache.manifest.identity['top_k']} logits)" if self.cache is not None
                 else "frozen, forward only on the first pipeline stage at tensor-parallel "
                 f"size {run.pstate.tp.size}")
        line = (f"teacher: {d.teacher_checkpoint or d.distill_cache} | layers {t.num_layers} "
                f"| hidden {t.hidden_size} | heads {t.num_attention_heads} | image "
                f"{t.img_h}x{t.img_w} | {where} | loss {d.distill_loss} | alpha "
                f"{d.distill_alpha}"
                + (f" | temperature {d.distill_temperature}" if d.distill_loss == "soft" else "")
                + (f" | pooled features weight {d.distill_pooled_weight}"
                   if self.pooled_width else ""))
        if self.teacher is not None:
            teacher = sum(p.numel() for p in self.teacher.model.parameters())
            line += f" | parameters per rank {teacher:,} (student's on this rank {student:,})"
        lines = super().log_lines(run) + [line]
        if self.teacher is not None and self.teacher.note:
            lines.append(f"teacher: {self.teacher.note}")
        return lines

    def summary_fields(self, evaluation: dict[str, float]) -> dict[str, Any]:
        student = evaluation["eval_accuracy"]
        teacher = evaluation.get("teacher_accuracy", float("nan"))
        return {"eval_loss": evaluation["eval_loss"], "student_accuracy": student,
                "teacher_accuracy": teacher,
                "student_teacher_ratio": student / teacher if teacher else float("nan")}
