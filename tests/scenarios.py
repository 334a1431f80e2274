"""What the equivalence tests run, identically in one process and in gloo workers.

Every scenario takes a `ParallelState` first, so the harness can call it in a worker and
the tests can call it with `serial_state()` for the reference.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any

import torch

from megavit.config import Config, DataConfig, TrainingConfig, preset_model_config
from megavit.models.transformer import (ForwardContext, MAPHead, ParallelBlock, Runtime,
                                        SequentialBlock)
from megavit.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megavit.parallel.full_sharding import CollectiveBytes, local_numel as local_tensor_numel
from megavit.parallel.sharding import full_state, initialize_parameters
from megavit.parallel.state import ParallelState, serial_state
from megavit.tasks.classification import classification_run

# Model variants the layouts are checked with: the ViT-22B recipe; a classic ViT with every
# bias, a class token (17 tokens) and fixed position embeddings; and a GAP head over
# parallel blocks whose fused input projection has a QKV bias but no MLP bias, with RMSNorm
# everywhere (QK-norms included), a pre-norm over the embedded tokens (timm's "xp" ViTs) and
# the tanh GELU.
VARIANTS: dict[str, dict[str, Any]] = {
    # 20 px images: 25 tokens, padded under SP (with the MAP head and QK-LayerNorm);
    # drop-path masks are keyed by image, so they are the same in every layout
    "vit22b": dict(drop_path_rate=0.3, img_h=20, img_w=20),
    "classic": dict(block_type="sequential", pooling="cls", qk_layernorm=False,
                    add_qkv_bias=True, add_proj_bias=True, norm_bias=True,
                    position_embedding_type="sincos2d"),
    "gap": dict(pooling="gap", add_mlp_bias=False, add_qkv_bias=True,   # mixed bias flags
                normalization="rmsnorm", pre_norm=True, activation="gelu_tanh"),
}


def debug_config(variant: str = "vit22b", tp: int = 1, parallel: dict | None = None,
                 model: dict | None = None, layers: int = 2, **training: Any) -> Config:
    """vit-debug (`layers` blocks) on digits (16x16, 1 channel), global batch 8 in
    micro-batches of 2, with augmentation, clipping and weight decay all active. `parallel`
    and `model` override ParallelConfig / ModelConfig fields."""
    model_cfg = preset_model_config("vit-debug", num_channels=1, num_layers=layers,
                                    **{**VARIANTS[variant], **(model or {})})
    train = dict(micro_batch_size=2, global_batch_size=8, train_iters=2, lr=5e-3,
                 lr_decay_style="constant", weight_decay=0.1, clip_grad=0.5, seed=7,
                 adam_eps=1e-6)
    train.update(training)
    cfg = Config(model=model_cfg, training=TrainingConfig(**train),
                 data=DataConfig(dataset="digits", augment="affine"))
    cfg.parallel = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=tp,
                                       **(parallel or {}))
    return cfg


def train_steps(pstate: ParallelState, cfg: Config, steps: int = 2,
                run: Any = None) -> dict[str, Any]:
    """Losses, grad norms and full-shape gradients of each step, and the full-shape
    weights after the last, through the real training step (of `run`, e.g. one that
    loaded weights; default: a fresh classification run of `cfg`)."""
    run = run if run is not None else classification_run(cfg, pstate)
    out: dict[str, Any] = {"loss": [], "grad_norm": [], "grads": [],
                           "initial": uncounted(pstate, full_state, run.model, pstate.tp)}
    pstate.stats.reset()
    # FSDP2's collectives (--data-parallel-sharding-strategy full) bypass the counting layer
    fsdp = CollectiveBytes(pstate.stats, pstate.dp) if run.buffers.strategy == "full" else nullcontext()
    for it, micro in enumerate(run.batches(0, steps)):
        with fsdp:
            result = run.step(it, micro, on_gradients=lambda m: out["grads"].append(
                uncounted(pstate, lambda: full_state(m, pstate.tp,
                                                     grads=run.buffers.full_grads()))))
        out["loss"].append(result.loss.item())
        out["grad_norm"].append(result.grad_norm.item())
    out["comm"] = pstate.stats.snapshot()   # the training steps' collectives only
    out["comm_bytes"] = pstate.stats.bytes_snapshot()
    # what the planner predicts (megavit/planner/memory.py): held parameters, and the
    # measured bytes per trained parameter after the optimizer's state exists
    out["held_parameters"] = sum(local_tensor_numel(p) for p in run.model.parameters())
    out["bytes_per_parameter"] = run.optimizer.bytes_per_parameter()
    out["weights"] = uncounted(pstate, full_state, run.model, pstate.tp)
    store = run.executor.weight_grads          # zero bubble: dW computed in W passes
    out["deferred_weight_grads"] = store.computed if store is not None else 0
    out["linear_weights"] = sum(1 for m in run.model.modules()
                                if isinstance(m, (ColumnParallelLinear, RowParallelLinear)))
    out["micro_batches"] = run.micro_batches
    return out


def uncounted(pstate: ParallelState, fn, *args, **kwargs):
    """fn(...) with the collective counters off (the tests' own gathers)."""
    pstate.stats.enabled = False
    try:
        return fn(*args, **kwargs)
    finally:
        pstate.stats.enabled = True


def merge_stages(results: list[dict], ranks: list[int]) -> dict[str, Any]:
    """One full-model result from the pipeline stages' results at `ranks` (one rank per
    stage, in stage order): their parameters together, the last stage's losses."""
    merged: dict[str, Any] = {"initial": {}, "weights": {}, "grads": [{}, {}],
                              "loss": results[ranks[-1]]["loss"],
                              "grad_norm": results[ranks[-1]]["grad_norm"]}
    for r in ranks:
        merged["initial"].update(results[r]["initial"])
        merged["weights"].update(results[r]["weights"])
        for step, grads in enumerate(results[r]["grads"]):
            merged["grads"][step].update(grads)
    return merged


def replay_optimizer(cfg: Config, initial: dict[str, torch.Tensor],
                     grads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The serial optimizer, fed given full-shape gradients step after step from given
    initial weights: what a layout's sharded optimizer must reproduce."""
    run = classification_run(cfg, serial_state())
    run.model.load_state_dict(initial)
    for it, step_grads in enumerate(grads):
        for name, p in run.model.named_parameters():
            p.main_grad.copy_(step_grads[name])
        run.optimizer.step(run.lr_schedule.lr_at(it), cfg.training.clip_grad, None)
    return full_state(run.model, run.pstate.tp)


def block_collectives(pstate: ParallelState, block_type: str,
                      sequence_parallel: str | None = None) -> dict[str, Any]:
    """TP collectives of one block ("parallel", "sequential") or of the MAP head ("map"):
    counts and bytes in forward, then in backward, for s=16 tokens, b=3 images (with
    sequence parallelism the block's input is this rank's [16/t, 3, h] shard)."""
    cfg = preset_model_config("vit-debug", block_type=block_type if block_type != "map" else
                              "parallel")
    with torch.device("meta"):
        if block_type == "map":
            block, call = MAPHead(cfg, pstate.tp), (lambda m, x: m(x))
        else:
            kind = ParallelBlock if block_type == "parallel" else SequentialBlock
            block = kind(cfg, Runtime(pstate.tp, sequence_parallel=sequence_parallel), 0)
            call = lambda m, x: m(x, ForwardContext(None, None))  # noqa: E731
    initialize_parameters(block, seed=0, device="cpu", prefix="blocks.0.")
    s, b, h = cfg.seq_length, 3, cfg.hidden_size
    if sequence_parallel:
        s //= pstate.tp.size
    x = torch.randn(s, b, h, generator=torch.Generator().manual_seed(pstate.tp.rank),
                    requires_grad=True)
    pstate.stats.reset()
    y = call(block, x)
    forward = dict(pstate.stats.calls), dict(pstate.stats.bytes)
    pstate.stats.reset()
    y.square().sum().backward()
    backward = dict(pstate.stats.calls), dict(pstate.stats.bytes)
    return {"forward": forward, "backward": backward,
            "activation_bytes": cfg.seq_length * b * h * 4}


def evaluate_run(pstate: ParallelState, cfg: Config) -> dict[str, float]:
    """The held-out evaluation of a freshly initialised model."""
    return classification_run(cfg, pstate).evaluate()
