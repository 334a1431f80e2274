"""Activation memory of the blocks: what autograd keeps for backward, predicted and measured.

`block_activation_bytes` is the formula derived in docs/activation_memory.md: the bytes a
block keeps for backward per micro-batch, on one TP rank, for both block types, with or
without sequence parallelism and recomputation. `measure_block_activations` measures the
same thing on a real forward pass with `megavit.parallel.memory.SavedTensorMeter` (each
saved storage counted once; parameters and buffers excluded).

Notation: s tokens, b images per micro-batch, h width, f MLP width, a heads, t the TP size,
p bytes per activation element (4 in fp32); statistics (LayerNorm mean/rstd, attention
log-sum-exp) are always fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megavit.config import ModelConfig
from megavit.parallel.comm import Group
from megavit.parallel.memory import SavedTensorMeter


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


def _attention_inputs(s: int, b: int, h: int, a: int, t: int, p: int, selective: bool,
                      qk_norm: bool, kind: str, rope: bool) -> float:
    """What the attention core keeps beyond q|k|v and its output when it is not recomputed
    (docs/activation_memory.md, "attention types"): q and k as their own tensors when
    normalised or rotated, the norms' statistics, and softmax's log-sum-exp for full
    attention (window, local-global and linear cores keep only their inputs)."""
    if selective:
        return 0
    kept = 2 * p * s * b * h / t if (qk_norm or rope) else 0   # normalised / rotated q, k
    if qk_norm:
        kept += 2 * 8 * s * b * a / t                           # their mean, rstd
    if kind == "full":
        kept += 4 * s * b * a / t                               # SDPA log-sum-exp
    return kept


def _parallel_block(s: int, b: int, h: int, f: int, a: int, t: int, p: int,
                    sp: str | None, selective: bool, qk_norm: bool, kind: str = "full",
                    rope: bool = False) -> float:
    """Bytes one ViT-22B parallel block keeps (see docs/activation_memory.md, table 1)."""
    n = s // t if sp else s                     # tokens of this rank outside the TP region
    kept = p * n * b * h + 8 * n * b            # LayerNorm: input + mean, rstd
    kept += p * (n if sp == "regather" else s) * b * h   # in_proj input (gathered or shard)
    kept += p * s * b * 3 * h / t               # q|k|v matmul output (one storage)
    kept += p * s * b * h / t                   # attention output (SDPA's, also out_proj's)
    kept += 2 * p * s * b * f / t               # GELU input and output (out_proj input)
    return kept + _attention_inputs(s, b, h, a, t, p, selective, qk_norm, kind, rope)


def _sequential_block(s: int, b: int, h: int, f: int, a: int, t: int, p: int,
                      sp: str | None, selective: bool, qk_norm: bool, kind: str = "full",
                      rope: bool = False) -> float:
    """Bytes one classic pre-LN block keeps (docs/activation_memory.md, table 2)."""
    n = s // t if sp else s
    gathered = n if sp == "regather" else s
    kept = 2 * (p * n * b * h + 8 * n * b)      # two LayerNorms: input + mean, rstd
    kept += 2 * p * gathered * b * h            # qkv and fc1 inputs
    kept += p * s * b * 3 * h / t               # q|k|v
    kept += p * s * b * h / t                   # attention output (SDPA's, also proj's)
    kept += 2 * p * s * b * f / t               # GELU input and output (fc2 input)
    return kept + _attention_inputs(s, b, h, a, t, p, selective, qk_norm, kind, rope)


def _geometry(cfg: ModelConfig, setup: ActivationSetup) -> tuple:
    if cfg.attention_dropout > 0:
        raise ValueError("the activation formula does not model attention dropout")
    t, b, p = setup.tp, setup.micro_batch, setup.bytes_per_element
    sp = setup.sequence_parallel if t > 1 else None
    s = -(-cfg.seq_length // t) * t if sp else cfg.seq_length   # padded for SP
    return t, b, p, sp, s, (s // t if sp else s)


def merge_activation_bytes(cfg: ModelConfig, setup: ActivationSetup, layer: int) -> float:
    """Bytes the --patch-merge-layers merge after block `layer` keeps (0 without one): the
    norm's input (the 2x2 groups, g/4 x 4h for a grid of g tokens) with its statistics, and
    the projection's input (the norm's output); replicated, so the same with TP and SP."""
    if layer not in cfg.merge_layers():
        return 0
    gh, gw = cfg.grid_at(layer)
    b, p, g = setup.micro_batch, setup.bytes_per_element, gh * gw
    return 2 * p * g * b * cfg.hidden_size + 8 * (g // 4) * b


def layer_activation_bytes(cfg: ModelConfig, setup: ActivationSetup, layer: int) -> float:
    """Bytes block `layer` (global index) keeps when it is not fully recomputed (selective
    recomputation, if set up, applies), with the merge after it if any (each block at its
    own grid). Drop-path keeps a mask from block 1 on."""
    merge = merge_activation_bytes(cfg, setup, layer)
    cfg = cfg.at_layer(layer)
    t, b, p, sp, s, n = _geometry(cfg, setup)
    h, f, a = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads
    one = _parallel_block if cfg.block_type == "parallel" else _sequential_block
    kept = one(s, b, h, f, a, t, p, sp, setup.recompute == "selective", cfg.qk_layernorm,
               cfg.attention_kind(layer), cfg.position_embedding_type == "rope-2d")
    branches = 1 if cfg.block_type == "parallel" else 2
    if cfg.hidden_dropout > 0:
        kept += branches * p * n * b * h                 # dropout masks
    if cfg.drop_path_rate > 0 and layer > 0 and cfg.num_layers > 1:
        kept += branches * p * b                         # per-image masks
    return kept + merge


def region_input_bytes(cfg: ModelConfig, setup: ActivationSetup, layer: int = 0) -> float:
    """What a fully recomputed region starting at block `layer` keeps: its input (a
    sequence shard under SP)."""
    t, b, p, sp, s, n = _geometry(cfg.at_layer(layer), setup)
    return p * n * b * cfg.hidden_size


def carried_feature_bytes(cfg: ModelConfig, setup: ActivationSetup, layer: int) -> float:
    """The --feature-layers outputs of the blocks before `layer` that a pipeline part
    starting at block `layer` receives with its hidden states (each [s_l, b, h], with SP
    this rank's shard of it padded). They share one received tensor with the hidden
    states, which the part's first block keeps (a view keeps its whole storage)."""
    total = 0.0
    for l in cfg.feature_layer_list():
        if l < layer:
            t, b, p, sp, s, n = _geometry(cfg.at_layer(l), setup)
            total += p * n * b * cfg.hidden_size
    return total


def recomputed_stack_bytes(cfg: ModelConfig, setup: ActivationSetup, layers: range,
                           recomputed: int) -> float:
    """Bytes kept by the blocks `layers` when the first `recomputed` of them are each
    recomputed on their own (full, block method); the recomputed regions also share one
    tensor of the images' int64 ids (8 b bytes). A part that starts after block 0 also
    keeps the features it received (`carried_feature_bytes`)."""
    kept = sum(layer_activation_bytes(cfg, setup, l) for l in layers[recomputed:])
    kept += carried_feature_bytes(cfg, setup, layers[0]) if len(layers) else 0
    if recomputed:
        kept += (sum(region_input_bytes(cfg, setup, l) for l in layers[:recomputed])
                 + 8 * setup.micro_batch)
    return kept


def block_activation_bytes(cfg: ModelConfig, setup: ActivationSetup) -> float:
    """Predicted bytes kept for backward per block per micro-batch on one TP rank, averaged
    over the model's blocks (full recomputation keeps different amounts per block, and
    drop-path is off in block 0). Attention dropout is not modelled (on CPU it switches
    SDPA to its math kernel, which keeps s x s tensors)."""
    layers = range(cfg.num_layers)
    if setup.recompute != "full":
        return sum(layer_activation_bytes(cfg, setup, l) for l in layers) / len(layers)
    k = setup.recompute_num_layers
    if setup.recompute_method == "uniform":
        starts = layers[::k]
        return (sum(region_input_bytes(cfg, setup, l) for l in starts)
                + 8 * setup.micro_batch) / len(layers)
    return recomputed_stack_bytes(cfg, setup, layers, k) / len(layers)


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
    from megavit.models.transformer import Runtime
    from megavit.models.vit import build_vit
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
