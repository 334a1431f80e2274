"""Contrastive image-text training (CLIP, SigLIP, LiT) as a task of the engine.

One step on each rank:

    indices = this DP rank's slice of iteration i's global batch   (layout-independent)
    images, captions = dataset.get(indices, iteration=i); ids = tokenizer.encode(captions)
    image, text embeddings [n, d] = model(images, ids)       (towers tensor-parallel inside)
    loss = clip_loss / siglip_loss over the DP group          (the global batch's negatives)
    backward (x loss scale) -> DataParallelBuffers reduce over DP -> optimizer

There is one micro-batch per step: the loss needs every negative of the global batch at
once, so the global batch is micro-batch x DP (validated). With pipeline parallelism the
image tower's blocks are split over the stages (as in megavit.pretrain, without virtual
stages) and the last stage holds the text tower, the projections and the loss: the loss is
the pipeline executor's loss callback there. With --lock-image-tower the image tower is
loaded from --image-checkpoint, runs a forward-only schedule (no activations kept) and is
neither in the gradient buffer nor in the optimizer; the last stage then runs the text tower
and the loss and back-propagates them alone.

With --teacher-checkpoint (two-tower distillation, open_clip's rule) a frozen two-tower
teacher runs forward only on the first pipeline stage, at the job's TP, on the student's
images (adapted to its preprocessing) and the same captions in its own tokenizer; its
embeddings [n, 2 d_t] and temperature travel to the last stage in one broadcast over the
pipeline group, where --distill-similarity-weight x `two_tower_distillation` joins the
contrastive loss. The student's checkpoint records the teacher's path and config hash.

    run = image_text_run(cfg, pstate)     # the engine's Run of this task
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from megavit.checkpointing.checkpointer import resolve_checkpoint
from megavit.checkpointing.inference import (InferenceModel, checkpoint_kind,
                                             load_frozen_two_tower)
from megavit.checkpointing.model_config import config_differences, read_checkpoint_info
from megavit.checkpointing.model_state import (CheckpointLoadError, check_loadable,
                                               load_state, model_state_dict)
from megavit.config import (Config, ConfigError, ContrastiveRunConfig, ModelConfig,
                            section_to_dict)
from megavit.data.image_text import build_image_text, image_text_batches
from megavit.data.tokenizer import TOKENIZER_FILE
from megavit.models.two_tower import TwoTowerModel, build_two_tower
from megavit.models.transformer import Runtime
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.schedules import build_schedule
from megavit.parallel.state import ParallelState
from megavit.tasks.distillation.losses import two_tower_distillation
from megavit.tasks.distillation.task import teacher_input, teacher_reference
from megavit.tasks.image_text.losses import ContrastiveQueue, clip_loss, siglip_loss
from megavit.tasks.image_text.zero_shot import (class_embeddings, retrieval_recall,
                                                zero_shot_correct)
from megavit.training.loop import parameter_count
from megavit.training.run import Run


class ImageTextTask:
    """A two-tower model aligned by a contrastive loss on image-caption pairs."""

    throughput_unit = "pairs"

    def __init__(self, cfg: ContrastiveRunConfig) -> None:
        self.cfg = cfg
        self.config: Config = cfg.base
        self.tokenizer: Any = None
        self.train_set: Any = None
        self.heldout: Any = None       # digits / MNIST-5k captions (None for CSV / shards)
        self.transfer: Any = None      # --zero-shot-transfer's held-out set
        self.queue: ContrastiveQueue | None = None   # --contrastive-queue-size (CLIP)
        self.teacher_dir: Path | None = None           # --teacher-checkpoint's iter_N/
        self.teacher: InferenceModel | None = None     # on the first pipeline stage only
        self.teacher_eval: dict[str, float] | None = None
        self.teacher_width = 0                          # its embedding width d_t
        self.similarity_values: list[torch.Tensor] = []   # since the last log line

    def prepare(self, pstate: ParallelState) -> Config:
        if self.cfg.distillation.teacher_checkpoint:
            self.check_teacher()
        data = build_image_text(self.cfg, self.config.training.seed)
        self.tokenizer, self.train_set = data.tokenizer, data.train
        self.heldout, self.transfer = data.heldout, data.transfer
        c = self.cfg.contrastive
        if c.contrastive_queue_size:
            self.queue = ContrastiveQueue(c.contrastive_queue_size, self.cfg.embed_dim,
                                          pstate.device)
        return self.config

    def build_model(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> TwoTowerModel:
        """The image tower's blocks of this stage; the last stage adds the text tower and
        the projections. The text tower runs without SP or full recomputation (its
        sequences are short), with selective recomputation if asked."""
        base, contrastive, tok = self.config, self.cfg.contrastive, self.tokenizer
        training = base.training
        text_rt = Runtime(tp=pstate.tp, seed=training.seed, rng=runtime.rng,
                          recompute_granularity="selective"
                          if base.parallel.recompute_granularity == "selective" else None,
                          layernorm_impl=training.layernorm_impl)
        model = build_two_tower(base.model, self.cfg.text, runtime, text_rt, training.seed,
                                tok.vocab_size, tok.pad_id, tok.eos_id, self.cfg.embed_dim,
                                contrastive.loss, contrastive.lock_image_tower, pstate.device,
                                dtype, layout.chunk_layers(stage, 0), layout.is_first(stage, 0),
                                layout.is_last(stage, 0),
                                image_projection=contrastive.image_projection)
        if contrastive.image_checkpoint:
            load_image_tower(model, pstate, contrastive.image_checkpoint, base.model)
        if self.teacher_dir is not None:
            self.teacher = load_frozen_two_tower(
                self.teacher_dir, pstate, here=layout.is_first(stage, 0),
                tokenizer_model=self.cfg.distillation.teacher_tokenizer_model)
            if self.teacher is not None:
                self.teacher.model.to(dtype)
        return model

    # ---- two-tower distillation ---------------------------------------------------------

    def check_teacher(self) -> None:
        """--teacher-checkpoint resolved once (a --save directory may get a newer iter_N
        meanwhile): a two-tower model reading the student's channel count."""
        flag = f"--teacher-checkpoint {self.cfg.distillation.teacher_checkpoint}"
        self.teacher_dir = resolve_checkpoint(Path(self.cfg.distillation.teacher_checkpoint),
                                              "--teacher-checkpoint")
        info = read_checkpoint_info(self.teacher_dir)
        self.teacher_width = info.get("contrastive", {}).get("embed_dim", 0)
        if (kind := checkpoint_kind(info)) != "two-tower":
            raise CheckpointLoadError(f"{flag}: a two-tower student distils a two-tower "
                                      f"teacher (megavit.pretrain_contrastive); this is a "
                                      f"{kind} checkpoint (python -m megavit.distill "
                                      "distils classifiers)")
        channels = info["model"]["num_channels"]
        if channels != self.config.model.num_channels:
            raise ConfigError(f"{flag}: the teacher reads {channels}-channel images, the "
                              f"student {self.config.model.num_channels} (--num-channels)")

    @torch.no_grad()
    def teacher_embeddings(self, images: torch.Tensor, ids: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
        """[n, 2 d_t + 1] float32: the teacher's unit-norm image and text embeddings of this
        rank's pairs and, in the last column, its logit scale (clamped at 100 for a CLIP
        teacher, as its loss did)."""
        model = self.teacher.model
        device = next(model.parameters()).device
        x = teacher_input(images.to(device, dtype), self.train_set.preprocessing,
                          self.teacher.preprocessing)
        scale = model.logit_scale.float().exp()
        if model.loss == "clip":
            scale = scale.clamp(max=100.0)
        image, text = model.encode_image(x), model.encode_text(ids.to(device))
        return torch.cat([image.float(), text.float(), scale.expand(len(image), 1)], dim=1)

    def teacher_targets(self, run: Run, images, teacher_ids, n: int) -> torch.Tensor:
        """The teacher's embeddings and scale (`teacher_embeddings`) on every pipeline
        stage: computed on the first, broadcast over the pipeline group."""
        pstate = run.pstate
        if run.is_first_stage:
            out = self.teacher_embeddings(images, teacher_ids, run.dtype)
        else:
            out = torch.zeros(n, 2 * self.teacher_width + 1, device=pstate.device)
        if pstate.pp.size > 1:
            out = pstate.pp.broadcast(out.contiguous(), src=0)
        return out

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return model.trainable_parameters()

    def lr_scale(self, name: str) -> float:
        return 1.0

    @property
    def train_size(self) -> int:
        return len(self.train_set)

    def batches(self, run: Run, start: int, stop: int) -> Iterator[tuple]:
        """This DP rank's (images, token ids) for iterations [start, stop), each None where
        this pipeline stage does not need it (only the first stage reads pixels, only the
        last tokenizes); file-backed data is read ahead by --num-workers processes."""
        dp = run.pstate.dp
        return image_text_batches(self.train_set, self.tokenizer, run.sampler, start, stop,
                                  dp.rank, dp.size, self.cfg.contrastive.num_workers,
                                  images=run.pstate.pp.rank == 0, texts=run.is_last_stage,
                                  second_tokenizer=self.teacher.tokenizer
                                  if self.teacher is not None else None)

    def micro_batch_count(self, batch: tuple) -> int:
        return 1

    def loss(self, run: Run, image: torch.Tensor, text: torch.Tensor,
             teacher: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's share of the contrastive loss over the DP group; with `teacher`
        ([n, 2 d_t + 1], `teacher_embeddings`) plus --distill-similarity-weight x the
        similarity term."""
        m, c = run.model, self.cfg.contrastive
        if c.loss == "clip":
            loss = clip_loss(image, text, m.logit_scale.float(), run.pstate.dp,
                             queue=self.queue)
        else:
            loss = siglip_loss(image, text, m.logit_scale.float(), m.logit_bias.float(),
                               run.pstate.dp, chunks=c.siglip_chunks)
        if teacher is None:
            return loss
        scale = m.logit_scale.float().exp()
        if c.loss == "clip":
            scale = scale.clamp(max=100.0)     # as clip_loss's logits
        t_image, t_text, t_scale = teacher.split([(teacher.shape[1] - 1) // 2] * 2 + [1], 1)
        term = two_tower_distillation(image, text, scale, t_image, t_text, t_scale[0, 0],
                                      run.pstate.dp)
        self.similarity_values.append(term.detach())
        return loss + self.cfg.distillation.distill_similarity_weight * term

    def _activation_shape(self, run: Run, batch: int) -> tuple[int, int, int]:
        """[tokens, images, width] passed between image-tower stages."""
        image = run.model.image
        return image.received_tokens, batch, image.cfg.hidden_size

    def _run_image_tower(self, run: Run, images: torch.Tensor | None, batch: int,
                         forward_only: bool, on_features) -> None:
        """The image tower over the pipeline (one micro-batch; P = 1 is F0 B0): on the
        last stage `on_features(features [b, h_img])` returns what to back-propagate."""

        def forward(chunk: int, mb: int, x: torch.Tensor | None, meter) -> torch.Tensor:
            return run.model.image(images.to(run.pstate.device, run.dtype) if x is None else x)

        actions = build_schedule(1, run.layout.stages, run.pstate.pp.rank, 1, forward_only)
        run.executor.run(actions, forward, lambda mb, chunk: self._activation_shape(run, batch),
                         lambda mb, features: on_features(features), forward_only)

    def forward_backward(self, run: Run, batch: tuple, loss_scale: float | None,
                         measure: bool) -> tuple[torch.Tensor, None]:
        """The image tower's blocks over the stages, the text tower and the loss on the
        last; a locked image tower (LiT) runs a forward-only schedule and the last stage
        back-propagates the text tower and the loss alone."""
        pstate = run.pstate
        images, ids, *rest = batch      # (images, ids[, the teacher's ids])
        teacher_ids = rest[0] if rest else None
        if self.teacher_dir is not None and not rest:     # every rank: none waits alone
            raise ValueError("two-tower distillation: the batch has no captions in the "
                             "teacher's tokenizer (batches() gives them as a third element)")
        n = run.sampler.global_batch_size // pstate.dp.size
        lock = self.cfg.contrastive.lock_image_tower
        held: dict[str, torch.Tensor] = {}
        teacher = (self.teacher_targets(run, images, teacher_ids, n)
                   if self.teacher_dir is not None else None)

        def text_and_loss(features: torch.Tensor) -> torch.Tensor:
            text = run.model.encode_text(ids.to(pstate.device))
            loss = self.loss(run, run.model.project_image(features), text, teacher)
            held["loss"] = loss.detach()
            return loss * loss_scale if loss_scale is not None else loss

        def on_features(features: torch.Tensor) -> torch.Tensor:
            if lock:               # forward-only image tower: the loss comes afterwards
                held["features"] = features
                return features.new_zeros(())
            return text_and_loss(features)

        self._run_image_tower(run, images, n, lock, on_features)
        if lock and run.is_last_stage:
            text_and_loss(held["features"]).backward()
        return held.get("loss", torch.zeros((), device=pstate.device)), None

    @torch.no_grad()
    def encode_texts(self, run: Run, captions: list[str]) -> torch.Tensor:
        return run.model.encode_text(self.tokenizer.encode(captions).to(run.pstate.device))

    @torch.no_grad()
    def _embed_split(self, run: Run, dataset) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        """Image embeddings [N, d], labels [N] and captions of a held-out set on the last
        pipeline stage (None elsewhere): each DP rank embeds a contiguous slice (through the
        pipeline, forward only), gathered over DP (padded to equal slices, then trimmed)."""
        dp, n = run.pstate.dp, len(dataset)
        per_rank = -(-n // dp.size)
        start = min(dp.rank * per_rank, n)
        mine = torch.arange(start, min(start + per_rank, n))
        pad = per_rank - len(mine)
        padded = torch.cat([mine, mine.new_zeros(pad)]) if pad else mine
        images, _ = dataset.get(padded, iteration=0, images=run.pstate.pp.rank == 0)
        held = {}

        def on_features(features: torch.Tensor) -> torch.Tensor:
            held["embeddings"] = run.model.project_image(features)
            return features.new_zeros(())

        self._run_image_tower(run, images, per_rank, True, on_features)
        if not run.is_last_stage:
            return None
        all_emb = dp.all_gather(held["embeddings"].contiguous())
        keep = torch.cat([torch.arange(r * per_rank, r * per_rank + max(0, min(per_rank,
                                                                              n - r * per_rank)))
                          for r in range(dp.size)])
        labels = dataset.labels_of(torch.arange(n))
        _, all_captions = dataset.get(torch.arange(n), iteration=0, images=False)
        return all_emb[keep], labels, all_captions

    def _metric_names(self) -> list[str]:
        names = []
        if self.heldout is not None:
            names += ["zero_shot_accuracy", "image_to_text_r1", "text_to_image_r1",
                      "image_to_text_r5", "text_to_image_r5", "eval_images"]
        if self.transfer is not None:
            names.append(f"zero_shot_accuracy_{self.transfer.name.split('-')[0]}")
        return names

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        """Zero-shot accuracy and retrieval recall@1/5 on the held-out split (and zero-shot
        accuracy on --zero-shot-transfer's set), computed on the last pipeline stage and
        shared with the others."""
        run.model.eval()
        out: dict[str, float] = {}
        last = run.is_last_stage
        encode = lambda captions: self.encode_texts(run, captions)  # noqa: E731
        classes = None
        if self.heldout is not None:     # CSV / shards have no held-out split yet
            if last:
                classes = class_embeddings(encode, self.heldout.class_prompts())
            split = self._embed_split(run, self.heldout)
            if last:
                emb, labels, captions = split
                out["zero_shot_accuracy"] = \
                    zero_shot_correct(emb, labels, classes).item() / len(labels)
                out.update(retrieval_recall(emb, encode(captions)))
                out["eval_images"] = len(labels)
        if self.transfer is not None:
            if last and classes is None:
                classes = class_embeddings(encode, self.transfer.class_prompts())
            split = self._embed_split(run, self.transfer)
            if last:
                emb, labels, _ = split
                out[f"zero_shot_accuracy_{self.transfer.name.split('-')[0]}"] = \
                    zero_shot_correct(emb, labels, classes).item() / len(labels)
        names = self._metric_names()
        values = torch.tensor([out.get(k, 0.0) for k in names], dtype=torch.float64,
                              device=run.pstate.device)
        run.pstate.pp.broadcast(values, src=run.pstate.pp.size - 1)
        out = dict(zip(names, values.tolist()))
        if "eval_images" in out:
            out["eval_images"] = int(out["eval_images"])
        run.model.train()
        if self.teacher_dir is not None and self.heldout is not None:
            if self.teacher_eval is None:      # the teacher does not change: once
                self.teacher_eval = self.evaluate_teacher(run)
            out.update(self.teacher_eval)
        return out

    @torch.no_grad()
    def evaluate_teacher(self, run: Run) -> dict[str, float]:
        """The teacher's zero-shot accuracy on the held-out split the student is scored on
        (first stage: each DP rank embeds a slice, the correct counts summed over DP;
        shared over PP)."""
        pstate = run.pstate
        sums = torch.zeros(2, dtype=torch.float64, device=pstate.device)
        if run.is_first_stage:
            model, tok = self.teacher.model, self.teacher.tokenizer
            classes = class_embeddings(
                lambda captions: model.encode_text(tok.encode(captions).to(pstate.device)),
                self.heldout.class_prompts())
            n, dp = len(self.heldout), pstate.dp
            mine = torch.arange(n)[dp.rank::dp.size]
            for chunk in mine.split(256):
                images, _ = self.heldout.get(chunk, iteration=0, images=True)
                x = teacher_input(images.to(pstate.device, run.dtype),
                                  self.heldout.preprocessing, self.teacher.preprocessing)
                sums[0] += zero_shot_correct(model.encode_image(x),
                                             self.heldout.labels_of(chunk), classes)
                sums[1] += len(chunk)
        pstate.dp.all_reduce(sums)
        if pstate.pp.size > 1:
            pstate.pp.broadcast(sums, src=0)
        return {"teacher_zero_shot_accuracy": sums[0].item() / max(sums[1].item(), 1.0)}

    def describe(self) -> dict[str, dict]:
        """The image tower ("model"), the text tower with its tokenizer ids, the
        contrastive setup and the training images' preprocessing, for a checkpoint's
        `megavit_config.json` (with a teacher: its path and config hash, not its
        weights)."""
        tok = self.tokenizer
        teacher = ({"distillation": {**teacher_reference(self.teacher_dir),
                                     "similarity_weight":
                                         self.cfg.distillation.distill_similarity_weight}}
                   if self.teacher_dir is not None else {})
        return {**teacher, "model": dataclasses.asdict(self.config.model),
                "text": {**section_to_dict(self.cfg.text), "vocab_size": tok.vocab_size,
                         "pad_id": tok.pad_id, "eos_id": tok.eos_id},
                "contrastive": {**dataclasses.asdict(self.cfg.contrastive),
                                "embed_dim": self.cfg.embed_dim},
                "preprocessing": self.train_set.preprocessing.to_dict()}

    def checkpoint_files(self) -> dict[str, bytes]:
        """The tokenizer, so a checkpoint is usable alone (tools/zero_shot.py, export)."""
        return {TOKENIZER_FILE: self.tokenizer.model_proto}

    def log_lines(self, run: Run) -> list[str]:
        base, contrastive, text = self.config, self.cfg.contrastive, self.cfg.text
        model, training = base.model, base.training
        trainable = parameter_count(run, (p for _, p in run.model.trainable_parameters()))
        total = parameter_count(run, run.model.parameters())
        heldout = (f"{self.heldout.name} {len(self.heldout)} pairs" if self.heldout is not None
                   else "no held-out split (zero-shot evaluation needs --image-text-data "
                        "digits or mnist5k, or --zero-shot-transfer)")
        return [
            f"model: image {base.preset or 'custom'} (layers {model.num_layers}, hidden "
            f"{model.hidden_size}, pooling {model.pooling}) | text "
            f"{self.cfg.text_preset or 'custom'} "
            f"(layers {text.blocks.num_layers}, hidden {text.blocks.hidden_size}, "
            f"{'causal' if text.text_causal else 'bidirectional'}, pooling {text.text_pooling}, "
            f"vocab {self.tokenizer.vocab_size}, context {text.context_length}) | embed "
            f"{self.cfg.embed_dim} | loss {contrastive.loss} | parameters {total / 1e6:.2f} M, "
            f"trained {trainable / 1e6:.2f} M"
            f"{' (image tower locked)' if contrastive.lock_image_tower else ''}",
            f"data: {self.train_set.name} {len(self.train_set)} pairs | {heldout} | global "
            f"batch {training.global_batch_size} = micro {training.micro_batch_size} x dp "
            f"{run.pstate.dp.size}"
            f" | tokenizer {self.tokenizer.path} ({self.tokenizer.vocab_size} pieces)",
            *self.teacher_lines(run)]

    def teacher_lines(self, run: Run) -> list[str]:
        if self.teacher_dir is None:
            return []
        info = read_checkpoint_info(self.teacher_dir)
        image, text = info["model"], info["text"]
        line = (f"teacher: {self.teacher_dir} | image layers {image['num_layers']}, hidden "
                f"{image['hidden_size']} | text layers {text['text_num_layers']}, hidden "
                f"{text['text_hidden_size']} | embed {self.teacher_width} | frozen, forward "
                f"only on the first pipeline stage at tensor-parallel size {run.pstate.tp.size}"
                f" | similarity weight {self.cfg.distillation.distill_similarity_weight}")
        if self.teacher is not None:
            count = sum(p.numel() for p in self.teacher.model.parameters())
            line += f" | parameters per rank {count:,}"
        lines = [line]
        if self.teacher is not None and self.teacher.note:
            lines.append(f"teacher: {self.teacher.note}")
        return lines

    def flops_per_step(self, run: Run) -> None:
        return None     # no FLOPs model of the two towers yet: no MFU

    def train_fields(self, run: Run) -> dict[str, float]:
        """The temperature and bias (they live on the last stage); with a teacher
        `similarity_loss`, the unweighted similarity term per step since the last line,
        averaged over DP (an all-reduce over the last stage's DP group)."""
        if not run.is_last_stage:
            return {}
        out = {"temperature": float(run.model.logit_scale.exp().item())}
        if run.model.logit_bias is not None:
            out["bias"] = float(run.model.logit_bias.item())
        if self.teacher_dir is not None:
            values, self.similarity_values = self.similarity_values, []
            mean = (torch.stack(values).double().mean() if values else
                    torch.zeros((), dtype=torch.float64, device=run.pstate.device))
            run.pstate.dp.all_reduce(mean)
            out["similarity_loss"] = mean.item() / run.pstate.dp.size
        return out

    def summary_fields(self, evaluation: dict[str, float]) -> dict[str, float]:
        out = dict(evaluation)
        teacher = out.get("teacher_zero_shot_accuracy")
        if teacher is not None and "zero_shot_accuracy" in out:
            out["student_teacher_ratio"] = (out["zero_shot_accuracy"] / teacher if teacher
                                            else float("nan"))
        return out


def load_image_tower(model: TwoTowerModel, pstate: ParallelState, save_dir: str,
                     image_cfg: ModelConfig) -> None:
    """The image weights of the latest checkpoint of a megavit.pretrain --save directory
    into `model.image` (its classifier is not loaded); the image model's flags must match
    (the class count aside)."""
    checkpoint = resolve_checkpoint(Path(save_dir), "--image-checkpoint")
    saved = read_checkpoint_info(checkpoint)["model"]
    differ = config_differences(
        "model", saved, dataclasses.asdict(image_cfg),
        lambda k: k == "num_classes" or "dropout" in k or "drop_path" in k)
    if differ:
        raise CheckpointLoadError(f"--image-checkpoint {checkpoint}: a different image model, "
                                  "not loaded: " + "; ".join(differ))
    check_loadable(checkpoint)
    state = {f"model/{k}": v for k, v in model_state_dict(model.image, pstate).items()}
    load_state(state, checkpoint, pstate, "image tower")


def image_text_run(cfg: ContrastiveRunConfig, pstate: ParallelState) -> Run:
    """The engine's run of a two-tower model with the flags `cfg`, on this rank."""
    return Run.build(ImageTextTask(cfg), pstate)
