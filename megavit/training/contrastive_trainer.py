"""Contrastive image-text training (CLIP, SigLIP, LiT): build, step, evaluate, loop.

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
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megavit.config import ContrastiveRunConfig
from megavit.data.sampler import GlobalBatchSampler
from megavit.checkpointing.checkpointer import resume, save_checkpoint
from megavit.models.two_tower import TwoTowerModel, build_two_tower
from megavit.models.vit import Runtime
from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.pipeline_executor import PipelineExecutor
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.schedules import build_schedule
from megavit.parallel.random import RNGTracker
from megavit.parallel.state import ParallelState
from megavit.training.contrastive import ContrastiveQueue, clip_loss, siglip_loss
from megavit.training.lr_schedule import LRSchedule
from megavit.training.metrics import MetricsLogger, Stopwatch, format_eta
from megavit.training.optimizer import MixedPrecisionOptimizer
from megavit.training.peak_flops import configure_tf32
from megavit.training.step import StepResult, finish_step
from megavit.training.trainer import (gradient_buffers, loss_scaler, lr_schedule, nan_check,
                                      param_dtype)
from megavit.training.zero_shot import class_embeddings, retrieval_recall, zero_shot_correct


TOKENIZER_FILE = "tokenizer.model"


@dataclass
class ContrastiveRun:
    """Everything one contrastive run holds on this rank."""

    cfg: ContrastiveRunConfig
    pstate: ParallelState
    model: TwoTowerModel
    buffers: DataParallelBuffers
    optimizer: MixedPrecisionOptimizer
    scaler: Any
    schedule: LRSchedule
    tokenizer: Any
    train_set: Any
    heldout: Any
    sampler: GlobalBatchSampler
    layout: PipelineLayout | None = None    # the image tower's blocks over the stages
    executor: PipelineExecutor | None = None
    transfer: Any = None         # --zero-shot-transfer's held-out set
    queue: ContrastiveQueue | None = None   # --contrastive-queue-size (CLIP)

    @classmethod
    def build(cls, cfg: ContrastiveRunConfig, pstate: ParallelState) -> "ContrastiveRun":
        from megavit.data.image_text import build_image_text

        b, t = cfg.base, cfg.base.training
        configure_tf32(b.precision.tf32)
        data = build_image_text(cfg, t.seed)
        # each stage seeds its dropout streams apart: its layers are different layers
        rng = RNGTracker(t.seed + 100 * pstate.pp.rank, pstate.tp.rank, pstate.device)
        image_rt = Runtime.from_config(b.parallel, pstate.tp, t.seed, rng, t.layernorm_impl)
        text_rt = Runtime(tp=pstate.tp, seed=t.seed, rng=rng,
                          recompute_granularity="selective"
                          if b.parallel.recompute_granularity == "selective" else None,
                          layernorm_impl=t.layernorm_impl)
        tok = data.tokenizer
        dtype = param_dtype(b.precision)
        c = cfg.contrastive
        p = b.parallel
        layout = PipelineLayout.from_flags(b.model.num_layers, p.pipeline_model_parallel_size,
                                           None, p.num_layers_in_first_pipeline_stage,
                                           p.num_layers_in_last_pipeline_stage)
        stage = pstate.pp.rank
        model = build_two_tower(b.model, cfg.text, image_rt, text_rt, t.seed, tok.vocab_size,
                                tok.pad_id, tok.eos_id, cfg.embed_dim, c.loss,
                                c.lock_image_tower, pstate.device, dtype,
                                layout.chunk_layers(stage, 0), layout.is_first(stage, 0),
                                layout.is_last(stage, 0),
                                image_projection=c.image_projection)
        if c.image_checkpoint:
            load_image_tower(model, pstate, c.image_checkpoint, b.model)
        buffers = gradient_buffers(model.trainable_parameters(), b, pstate)
        return cls(cfg=cfg, pstate=pstate, model=model, buffers=buffers,
                   optimizer=MixedPrecisionOptimizer(buffers, t, pstate,
                                                     master_weights=dtype != torch.float32),
                   scaler=loss_scaler(b.precision), schedule=lr_schedule(t),
                   tokenizer=tok, train_set=data.train, heldout=data.heldout,
                   sampler=GlobalBatchSampler(len(data.train), t.global_batch_size, t.seed),
                   layout=layout,
                   executor=PipelineExecutor(layout, stage, pstate.pp_channels, pstate.device,
                                             dtype),
                   transfer=data.transfer,
                   queue=ContrastiveQueue(c.contrastive_queue_size, cfg.embed_dim,
                                          pstate.device) if c.contrastive_queue_size else None)

    def describe_towers(self) -> dict:
        """The text tower, tokenizer ids and contrastive setup, for a checkpoint's
        `megavit_config.json` (the image tower is its "model")."""
        tok = self.tokenizer
        return {"text": {**dataclasses.asdict(self.cfg.text), "vocab_size": tok.vocab_size,
                         "pad_id": tok.pad_id, "eos_id": tok.eos_id},
                "contrastive": {**dataclasses.asdict(self.cfg.contrastive),
                                "embed_dim": self.cfg.embed_dim}}

    def checkpoint_files(self) -> dict[str, bytes]:
        """Files saved beside the tensors: the tokenizer, so a checkpoint is usable alone
        (tools/zero_shot.py, export)."""
        return {TOKENIZER_FILE: self.tokenizer.model_proto}

    def loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """This rank's share of the contrastive loss over the DP group."""
        m = self.model
        if self.cfg.contrastive.loss == "clip":
            return clip_loss(image, text, m.logit_scale.float(), self.pstate.dp,
                             queue=self.queue)
        return siglip_loss(image, text, m.logit_scale.float(), m.logit_bias.float(),
                           self.pstate.dp, chunks=self.cfg.contrastive.siglip_chunks)

    def batches(self, start: int, stop: int):
        """This DP rank's (images, token ids) for iterations [start, stop), each None where
        this pipeline stage does not need it (only the first stage reads pixels, only the
        last tokenizes); file-backed data is read ahead by --num-workers processes."""
        from megavit.data.image_text import image_text_batches

        dp = self.pstate.dp
        return image_text_batches(self.train_set, self.tokenizer, self.sampler, start, stop,
                                  dp.rank, dp.size, self.cfg.contrastive.num_workers,
                                  images=self.pstate.pp.rank == 0, texts=self.is_last_stage)

    @property
    def is_last_stage(self) -> bool:
        return self.pstate.pp.rank == self.pstate.pp.size - 1

    def _activation_shape(self, batch: int) -> tuple[int, int, int]:
        """[tokens, images, width] passed between image-tower stages."""
        image, t = self.model.image, self.pstate.tp.size
        tokens = image.padded_length // t if image.rt.sequence_parallel else image.cfg.seq_length
        return tokens, batch, image.cfg.hidden_size

    def _run_image_tower(self, images: torch.Tensor | None, batch: int, forward_only: bool,
                         on_features) -> None:
        """The image tower over the pipeline (one micro-batch; P = 1 is F0 B0): on the
        last stage `on_features(features [b, h_img])` returns what to back-propagate."""
        dtype = param_dtype(self.cfg.base.precision)

        def forward(chunk: int, mb: int, x: torch.Tensor | None, meter) -> torch.Tensor:
            return self.model.image(images.to(self.pstate.device, dtype) if x is None else x)

        layout = self.layout
        actions = build_schedule(1, layout.stages, self.pstate.pp.rank, 1, forward_only)
        self.executor.run(actions, forward, lambda mb: self._activation_shape(batch),
                          lambda mb, features: on_features(features), forward_only)

    def step(self, iteration: int, on_gradients=None, batch=None) -> StepResult:
        """One optimizer step on `batch` (from `batches`; read now when None).
        `on_gradients(model)`, if given, runs after the gradient reduction and before the
        optimizer (as in `train_step`). With pipelining the image tower's blocks run over the
        stages and the last stage adds the text tower and the loss; a locked image tower
        (LiT) runs a forward-only schedule."""
        pstate = self.pstate
        lr = self.schedule.lr_at(iteration)
        last = self.is_last_stage
        images, ids = batch if batch is not None else \
            next(iter(self.batches(iteration, iteration + 1)))
        n = self.sampler.global_batch_size // pstate.dp.size
        self.buffers.start_step(1)
        scale = self.scaler.scale if self.scaler is not None else None
        lock = self.cfg.contrastive.lock_image_tower
        held: dict[str, torch.Tensor] = {}

        def text_and_loss(features: torch.Tensor) -> torch.Tensor:
            text = self.model.encode_text(ids.to(pstate.device))
            loss = self.loss(self.model.project_image(features), text)
            held["loss"] = loss.detach()
            return loss * scale if scale is not None else loss

        def on_features(features: torch.Tensor) -> torch.Tensor:
            if lock:               # forward-only image tower: the loss comes afterwards
                held["features"] = features
                return features.new_zeros(())
            return text_and_loss(features)

        self._run_image_tower(images, n, lock, on_features)
        if lock and last:
            text_and_loss(held["features"]).backward()
        loss = held.get("loss", torch.zeros((), device=pstate.device))
        return finish_step(self.model, self.buffers, self.optimizer, self.scaler, lr, loss,
                           pstate, self.cfg.base.training.clip_grad, iteration,
                           nan_check(self.cfg.base.precision), last, on_gradients)

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer.encode(captions).to(self.pstate.device))

    @torch.no_grad()
    def _embed_split(self, dataset) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        """Image embeddings [N, d], labels [N] and captions of a held-out set on the last
        pipeline stage (None elsewhere): each DP rank embeds a contiguous slice (through the
        pipeline, forward only), gathered over DP (padded to equal slices, then trimmed)."""
        dp, n = self.pstate.dp, len(dataset)
        per_rank = -(-n // dp.size)
        start = min(dp.rank * per_rank, n)
        mine = torch.arange(start, min(start + per_rank, n))
        pad = per_rank - len(mine)
        padded = torch.cat([mine, mine.new_zeros(pad)]) if pad else mine
        images, _ = dataset.get(padded, iteration=0, images=self.pstate.pp.rank == 0)
        held = {}

        def on_features(features: torch.Tensor) -> torch.Tensor:
            held["embeddings"] = self.model.project_image(features)
            return features.new_zeros(())

        self._run_image_tower(images, per_rank, True, on_features)
        if not self.is_last_stage:
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
    def evaluate(self) -> dict[str, float]:
        """Zero-shot accuracy and retrieval recall@1/5 on the held-out split (and zero-shot
        accuracy on --zero-shot-transfer's set), computed on the last pipeline stage and
        shared with the others."""
        self.model.eval()
        out: dict[str, float] = {}
        last = self.is_last_stage
        classes = None
        if self.heldout is not None:     # CSV / shards have no held-out split yet
            if last:
                classes = class_embeddings(self.encode_texts, self.heldout.class_prompts())
            split = self._embed_split(self.heldout)
            if last:
                emb, labels, captions = split
                out["zero_shot_accuracy"] = \
                    zero_shot_correct(emb, labels, classes).item() / len(labels)
                out.update(retrieval_recall(emb, self.encode_texts(captions)))
                out["eval_images"] = len(labels)
        if self.transfer is not None:
            if last and classes is None:
                classes = class_embeddings(self.encode_texts, self.transfer.class_prompts())
            split = self._embed_split(self.transfer)
            if last:
                emb, labels, _ = split
                out[f"zero_shot_accuracy_{self.transfer.name.split('-')[0]}"] = \
                    zero_shot_correct(emb, labels, classes).item() / len(labels)
        names = self._metric_names()
        values = torch.tensor([out.get(k, 0.0) for k in names], dtype=torch.float64,
                              device=self.pstate.device)
        self.pstate.pp.broadcast(values, src=self.pstate.pp.size - 1)
        out = dict(zip(names, values.tolist()))
        if "eval_images" in out:
            out["eval_images"] = int(out["eval_images"])
        self.model.train()
        return out


def load_image_tower(model: TwoTowerModel, pstate: ParallelState, save_dir: str,
                     image_cfg) -> None:
    """The image weights of the latest checkpoint of a megavit.pretrain --save directory
    into `model.image` (its classifier is not loaded); the image model's flags must match
    (the class count aside)."""
    import json

    from megavit.checkpointing.checkpointer import (CONFIG_FILE, config_differences,
                                                    resolve_checkpoint)
    from megavit.checkpointing.model_state import (CheckpointLoadError, check_loadable,
                                                   load_state, model_state_dict)

    checkpoint = resolve_checkpoint(Path(save_dir))
    saved = json.loads((checkpoint / CONFIG_FILE).read_text())["model"]
    differ = config_differences(
        "model", saved, dataclasses.asdict(image_cfg),
        lambda k: k == "num_classes" or "dropout" in k or "drop_path" in k)
    if differ:
        raise CheckpointLoadError(f"--image-checkpoint {checkpoint}: a different image model, "
                                  "not loaded: " + "; ".join(differ))
    check_loadable(checkpoint)
    state = {f"model/{k}": v for k, v in model_state_dict(model.image, pstate).items()}
    load_state(state, checkpoint, pstate, "image tower")


def pretrain_contrastive(cfg: ContrastiveRunConfig, pstate: ParallelState) -> dict[str, Any]:
    """Train for --train-iters steps, evaluating zero-shot; returns the summary metrics."""
    b = cfg.base
    log = MetricsLogger(b.logging, pstate.is_main, b.training.train_iters)
    try:
        return _train(ContrastiveRun.build(cfg, pstate), log)
    finally:
        log.close()


def _train(run: ContrastiveRun, log: MetricsLogger) -> dict[str, Any]:
    cfg, pstate = run.cfg, run.pstate
    b, t, lg = cfg.base, cfg.base.training, cfg.base.logging
    c, m, tx = cfg.contrastive, b.model, cfg.text
    def count(params) -> float:    # the whole model's: this stage's, summed over PP
        n = sum(p.numel() * (pstate.tp.size if getattr(p, "tp_shard", None) else 1)
                for p in params)
        return pstate.pp.all_reduce(torch.tensor([float(n)], dtype=torch.float64,
                                                 device=pstate.device)).item()

    trainable = count(p for _, p in run.model.trainable_parameters())
    total = count(run.model.parameters())
    log.info(f"layout: {pstate.describe()}")
    log.info(f"model: image {b.preset or 'custom'} (layers {m.num_layers}, hidden "
             f"{m.hidden_size}, pooling {m.pooling}) | text {cfg.text_preset or 'custom'} "
             f"(layers {tx.text_num_layers}, hidden {tx.text_hidden_size}, "
             f"{'causal' if tx.text_causal else 'bidirectional'}, pooling {tx.text_pooling}, "
             f"vocab {run.tokenizer.vocab_size}, context {tx.context_length}) | embed "
             f"{cfg.embed_dim} | loss {c.loss} | parameters {total / 1e6:.2f} M, trained "
             f"{trainable / 1e6:.2f} M{' (image tower locked)' if c.lock_image_tower else ''}")
    heldout = (f"{run.heldout.name} {len(run.heldout)} pairs" if run.heldout is not None
               else "no held-out split (zero-shot evaluation needs --image-text-data digits "
                    "or mnist5k, or --zero-shot-transfer)")
    log.info(f"data: {run.train_set.name} {len(run.train_set)} pairs | {heldout} | global "
             f"batch {t.global_batch_size} = micro {t.micro_batch_size} x dp {pstate.dp.size}"
             f" | tokenizer {run.tokenizer.path} ({run.tokenizer.vocab_size} pieces)")
    watch = Stopwatch(pstate.device)
    loss_sum, steps, last = torch.zeros((), device=pstate.device), 0, {}
    skipped = 0
    eval_seconds = 0.0
    ck = b.checkpoint
    first = resume(run, ck.load, log.info)
    run.model.train()
    for iteration, batch in zip(range(first, t.train_iters),
                                run.batches(first, t.train_iters)):
        result = run.step(iteration, batch=batch)
        loss_sum += result.loss
        skipped += int(result.skipped)
        steps += 1
        done = iteration + 1
        log.progress(done)
        if done % lg.log_interval == 0 or done == t.train_iters:
            step_time = watch.lap() / steps
            last = {"iteration": done, "loss": (loss_sum / steps).item(), "lr": result.lr,
                    "grad_norm": result.grad_norm.item(),

                    "pairs_per_second": t.global_batch_size / step_time,
                    "step_time_ms": step_time * 1e3,
                    "eta": format_eta(step_time * (t.train_iters - done))}
            if result.loss_scale is not None:
                last.update(loss_scale=result.loss_scale, skipped_steps=skipped)
            if run.is_last_stage:    # the temperature and bias live on the last stage
                last["temperature"] = float(run.model.logit_scale.exp().item())
                if run.model.logit_bias is not None:
                    last["bias"] = float(run.model.logit_bias.item())
            log.train(last)
            loss_sum.zero_()
            steps = 0
        if lg.eval_interval and done % lg.eval_interval == 0 and done != t.train_iters:
            start = time.perf_counter()
            if result := run.evaluate():
                log.eval({"iteration": done, **result})
            eval_seconds += time.perf_counter() - start
            watch.lap()
        if ck.save and ((ck.save_interval and done % ck.save_interval == 0)
                        or done == t.train_iters):
            start = time.perf_counter()
            save_checkpoint(run, ck.save, done, ck.keep_last_checkpoints, log.info)
            eval_seconds += time.perf_counter() - start
            watch.lap()
    train_time = watch.total() - eval_seconds
    final = {"iteration": t.train_iters, **run.evaluate()}
    if len(final) > 1:
        log.eval(final)
    summary = {"iteration": t.train_iters, "train_seconds": train_time,
               "loss": last.get("loss", float("nan")),
               **{k: v for k, v in final.items() if k != "iteration"},
               "pairs_per_second": t.global_batch_size * (t.train_iters - first)
               / max(train_time, 1e-9)}
    log.summary(summary)
    return summary
