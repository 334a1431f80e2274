"""Activation memory of the blocks: what autograd keeps for backward, predicted and measured.

`block_activation_bytes` is the formula derived in docs/activation_memory.md: the bytes a
block keeps for backward per micro-batch, on one TP rank, for both block types, with or
without sequence parallelism and recomputation. `SavedTensorMeter` measures the same thing
on a real forward pass (each saved storage counted once; parameters and buffers excluded).

Notation: s tokens, b images per micro-batch, h width, f MLP width, a heads, t the TP size,
p bytes per activation element (4 in fp32); statistics (LayerNorm mean/rstd, attention
log-sum-exp) are always fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from megavit.config import ModelConfig
from megavit.parallel.comm import Group


@dataclass(frozen=True)
class ActivationSetup:
    """What decides a block's saved activations besides the model's sizes."""

    tp: int = 1
    micro_batch: int = 1
    sequence_parallel: str | None = None     # None, "keep" or "regather"
    recompute: str | None = None             # None, "selective" or "full"
    recompute_method: str | None = None      # "uniform" or "block" (full only)
    recompute_num_layers: int = 1
    bytes_per_element: int = 4


def _parallel_block(s: int, b: int, h: int, f: int, a: int, t: int, p: int,
                    sp: str | None, selective: bool, qk_norm: bool) -> float:
    """Bytes one ViT-22B parallel block keeps (see docs/activation_memory.md, table 1)."""
    n = s // t if sp else s                     # tokens of this rank outside the TP region
    kept = p * n * b * h + 8 * n * b            # LayerNorm: input + mean, rstd
    kept += p * (n if sp == "regather" else s) * b * h   # in_proj input (gathered or shard)
    kept += p * s * b * 3 * h / t               # q|k|v matmul output (one storage)
    kept += p * s * b * h / t                   # attention output (SDPA's, also out_proj's)
    kept += 2 * p * s * b * f / t               # GELU input and output (out_proj input)
    if not selective:
        if qk_norm:
            kept += 2 * p * s * b * h / t       # normalised q and k
            kept += 2 * 8 * s * b * a / t       # their mean, rstd
        kept += 4 * s * b * a / t               # SDPA log-sum-exp
    return kept


def _sequential_block(s: int, b: int, h: int, f: int, a: int, t: int, p: int,
                      sp: str | None, selective: bool, qk_norm: bool) -> float:
    """Bytes one classic pre-LN block keeps (docs/activation_memory.md, table 2)."""
    n = s // t if sp else s
    gathered = n if sp == "regather" else s
    kept = 2 * (p * n * b * h + 8 * n * b)      # two LayerNorms: input + mean, rstd
    kept += 2 * p * gathered * b * h            # qkv and fc1 inputs
    kept += p * s * b * 3 * h / t               # q|k|v
    kept += p * s * b * h / t                   # attention output (SDPA's, also proj's)
    kept += 2 * p * s * b * f / t               # GELU input and output (fc2 input)
    if not selective:
        if qk_norm:
            kept += 2 * p * s * b * h / t + 2 * 8 * s * b * a / t
        kept += 4 * s * b * a / t               # SDPA log-sum-exp
    return kept


def block_activation_bytes(cfg: ModelConfig, setup: ActivationSetup) -> float:
    """Predicted bytes kept for backward per block per micro-batch on one TP rank, averaged
    over the model's blocks (full recomputation keeps different amounts per block, and
    drop-path is off in block 0). Attention dropout is not modelled (on CPU it switches
    SDPA to its math kernel, which keeps s x s tensors)."""
    if cfg.attention_dropout > 0:
        raise ValueError("the activation formula does not model attention dropout")
    t, b, p = setup.tp, setup.micro_batch, setup.bytes_per_element
    sp = setup.sequence_parallel if t > 1 else None
    s = -(-cfg.seq_length // t) * t if sp else cfg.seq_length   # padded for SP
    h, f, a = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads
    one = _parallel_block if cfg.block_type == "parallel" else _sequential_block
    base = one(s, b, h, f, a, t, p, sp, setup.recompute == "selective", cfg.qk_layernorm)
    branches = 1 if cfg.block_type == "parallel" else 2
    n = s // t if sp else s
    if cfg.hidden_dropout > 0:
        base += branches * p * n * b * h                 # dropout masks

    def layer(l: int) -> float:                          # drop-path is off in block 0
        drop_path_on = cfg.drop_path_rate > 0 and l > 0 and cfg.num_layers > 1
        return base + (branches * p * b if drop_path_on else 0)   # per-image masks

    layers = cfg.num_layers
    if setup.recompute != "full":
        return sum(layer(l) for l in range(layers)) / layers
    # A recomputed region keeps its input; all regions share one tensor of the images'
    # int64 ids (the drop-path keys), counted once.
    region_input = p * n * b * h
    k = setup.recompute_num_layers
    if setup.recompute_method == "uniform":
        return (region_input * -(-layers // k) + 8 * b) / layers
    return (k * region_input + 8 * b + sum(layer(l) for l in range(k, layers))) / layers


class SavedTensorMeter:
    """Inside `with meter:`, every tensor autograd saves for backward is recorded by its
    storage; `bytes` sums each storage once. Storages of `exclude` (parameters, buffers)
    are not activations and are left out."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def measure_block_activations(model: torch.nn.Module, hidden: torch.Tensor,
                              sample_ids: torch.Tensor | None = None) -> float:
    """Bytes kept for backward by `model.run_blocks` on `hidden` (this rank's block input),
    per block. The input itself counts: the first block keeps it as every block does."""
    exclude = [*model.parameters(), *model.buffers()]
    with SavedTensorMeter(exclude) as meter:
        out = model.run_blocks(hidden, sample_ids)
    del out
    return meter.bytes / len(model.blocks)


def measure_setup(cfg: ModelConfig, setup: ActivationSetup, tp: Group,
                  seed: int = 0) -> float:
    """Build `cfg` for `setup` on this rank (`tp`: its TP group, of size setup.tp) and
    measure the bytes its blocks keep per block for one micro-batch of random input."""
    from megavit.models.vit import Runtime, build_vit
    from megavit.parallel.random import RNGTracker

    rt = Runtime(tp, sequence_parallel=setup.sequence_parallel if tp.size > 1 else None,
                 recompute_granularity=setup.recompute, recompute_method=setup.recompute_method,
                 recompute_num_layers=setup.recompute_num_layers,
                 rng=RNGTracker(seed, tp.rank, torch.device("cpu")), seed=seed)
    model = build_vit(cfg, rt, seed)
    model.train()
    tokens = model.padded_length // tp.size if rt.sequence_parallel else cfg.seq_length
    g = torch.Generator().manual_seed(seed + tp.rank)
    hidden = torch.randn(tokens, setup.micro_batch, cfg.hidden_size, generator=g,
                         requires_grad=True)
    return measure_block_activations(model, hidden, torch.arange(setup.micro_batch))
