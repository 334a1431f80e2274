"""The transformer both towers are made of: the blocks, the attention core, attention
pooling, and the `Runtime` that says how this rank runs them.

Activations are [s, b, h]: s tokens, b sequences (images or captions), width h. Model code
only says which layer is column- or row-parallel; the TP group, sequence parallelism,
recomputation and RNG streams come from the `Runtime`. The settings of the blocks come from
a `TransformerConfig` (the image model's `ModelConfig` is one; the text tower has its own).

    x [s, b, h] ─► block ─► ... ─► block ─► [s, b, h]
      ParallelBlock    ViT-22B: one norm feeds attention and MLP side by side; fused
                       projections; one TP all-reduce forward, one backward
      SequentialBlock  classic pre-norm block: attention, then MLP; two each way
      AttentionCore    QK-norms, softmax(QK^T)V, attention dropout over this rank's heads
                       (what --recompute-granularity selective recomputes)
      MAPHead          a learned probe attends over the tokens: [s, b, h] -> [b, h]

Block names are global (`blocks.17` is block 17 in every layout, built by `build_block`),
so a stage's part of a model has the serial model's parameter names.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import ParallelConfig, TransformerConfig
from megavit.models.attention import (TokenLayout, apply_rope_2d, eager_attention,
                                      linear_attention, rope_2d_angles, window_attention)
from megavit.parallel.comm import Group
from megavit.parallel.layers import (ColumnParallelLinear, RowParallelLinear, make_norm,
                                     softmax_attention,
                                     multi_head_attention)
from megavit.parallel.random import MODEL_PARALLEL, RNGTracker, counter_uniform
from megavit.parallel.recompute import recompute
from megavit.parallel.sharding import param_seed, set_init, trunc_normal
from megavit.parallel.tp_linear import SequenceParallelMode


@dataclass
class Runtime:
    """How this rank runs the model, besides its weights.

    `sequence_parallel`: None, "keep" or "regather" (a `SequenceParallelMode`, see
    `column_linear`).
    `recompute_granularity`: None, "selective" or "full" (with `recompute_method` "uniform"
    or "block" and `recompute_num_layers`). `rng`: the dropout streams (needed when dropout
    is on). `seed`: keys the drop-path masks."""

    tp: Group
    sequence_parallel: SequenceParallelMode | None = None
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int = 1
    rng: RNGTracker | None = None
    seed: int = 0
    layernorm_impl: str = "torch"

    @classmethod
    def from_config(cls, parallel: ParallelConfig, tp: Group, seed: int,
                    rng: RNGTracker | None = None, layernorm_impl: str = "torch") -> "Runtime":
        sp: SequenceParallelMode | None = None
        if parallel.sequence_parallel and tp.size > 1:
            sp = "regather" if parallel.sequence_parallel_regather else "keep"
        return cls(tp=tp, sequence_parallel=sp,
                   recompute_granularity=parallel.recompute_granularity,
                   recompute_method=parallel.recompute_method,
                   recompute_num_layers=parallel.recompute_num_layers or 1, rng=rng, seed=seed,
                   layernorm_impl=layernorm_impl)


class ForwardContext(NamedTuple):
    """Per-forward inputs every block sees: the additive attention mask for padded tokens
    (or None) and the global ids of the images (for drop-path; None when not training)."""

    attn_mask: torch.Tensor | None
    sample_ids: torch.Tensor | None


def drop_path(y: torch.Tensor, sample_ids: torch.Tensor | None, rate: float, key: int) -> torch.Tensor:
    """Zero image i's branch [s, b, h] with probability `rate`, from (key, sample id) alone,
    and scale the kept ones by 1 / (1 - rate)."""
    if sample_ids is None:
        raise ValueError("drop-path needs the images' global ids (forward(..., sample_ids))")
    keep = (counter_uniform(key, sample_ids.to(y.device)) >= rate).to(y.dtype) / (1 - rate)
    return y * keep.view(1, -1, 1)


class BranchRegularizer(nn.Module):
    """What happens to a block's branch output before the residual add in training: hidden
    dropout (on the tracker's model-parallel stream when the activations are sequence
    shards, else the default stream, identical on every TP rank), then drop-path."""

    def __init__(self, dropout: float, drop_path_rate: float, key: int, rt: Runtime) -> None:
        super().__init__()
        self.dropout, self.drop_path_rate, self.key, self.rt = dropout, drop_path_rate, key, rt

    def forward(self, y: torch.Tensor, sample_ids: torch.Tensor | None) -> torch.Tensor:
        if not self.training:
            return y
        if self.dropout > 0:
            if self.rt.rng is None:
                raise ValueError("hidden dropout needs an RNG tracker (Runtime.rng)")
            stream = (self.rt.rng.fork(MODEL_PARALLEL) if self.rt.sequence_parallel
                      else contextlib.nullcontext())
            with stream:
                y = F.dropout(y, self.dropout)
        if self.drop_path_rate > 0:
            y = drop_path(y, sample_ids, self.drop_path_rate, self.key)
        return y


def branch_regularizer(cfg: TransformerConfig, rt: Runtime, layer: int, branch: str) -> BranchRegularizer:
    rate = cfg.drop_path_rate * layer / max(cfg.num_layers - 1, 1)
    return BranchRegularizer(cfg.hidden_dropout, rate,
                             param_seed(rt.seed, f"drop-path.{layer}.{branch}"), rt)


class Activation(nn.Module):
    """The MLP activation: exact GELU, or its tanh approximation ("gelu_tanh")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.approximate = {"gelu": "none", "gelu_tanh": "tanh"}[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def norm_from_config(cfg: TransformerConfig, size: int, impl: str = "torch",
                     partial_grad: bool = False) -> nn.Module:
    """The configured norm over `size` features (`make_norm` with --normalization,
    --norm-epsilon and --norm-bias)."""
    return make_norm(size, cfg.norm_epsilon, cfg.norm_bias, partial_grad, impl,
                     cfg.normalization)


def qk_norms(cfg: TransformerConfig, rt: Runtime) -> tuple[nn.Module | None, nn.Module | None]:
    """Per-head LayerNorms over the head dim for queries and keys (or None, None). One set
    of weights is shared by all heads; each TP rank applies it to its own heads only, so its
    gradient is partial and summed over TP after backward."""
    if not cfg.qk_layernorm:
        return None, None
    return tuple(norm_from_config(cfg, cfg.head_dim, rt.layernorm_impl, partial_grad=True)
                 for _ in range(2))


def _window(q, k, v, dropout_p, mask, layout: TokenLayout, w: int, shift: int,
            carriers: bool) -> torch.Tensor:
    return window_attention(q, k, v, layout, w, dropout_p, shift, carriers)


def _linear(q, k, v, dropout_p, mask, length: int) -> torch.Tensor:
    return linear_attention(q, k, v, length, dropout_p)


def _inputs_only(q, k, v, dropout_p, mask, inner, rng: RNGTracker | None) -> torch.Tensor:
    """`inner` attention keeping only q, k, v for backward and running again there: what
    window attention's partition (copies of q, k, v, padding, masks, the windows' output)
    and linear attention's features would keep costs more memory than the attention's
    recomputation costs time (O(s w^2) and O(s d^2) FLOPs, against the block's O(s h^2))."""
    if not torch.is_grad_enabled():
        return inner(q, k, v, dropout_p, mask)
    return recompute(inner, q, k, v, dropout_p, mask, rng=rng)


def _rotated(q, k, v, dropout_p, mask, layout, head_dim, inner, angles: dict) -> torch.Tensor:
    """rope-2d: queries and keys rotated by their grid position, then `inner` attention.
    The (cos, sin) tables are made at the first call on a device and kept in `angles` (not
    when the model is built, on the meta device)."""
    if q.device not in angles:
        angles[q.device] = tuple(t.to(q.device) for t in rope_2d_angles(layout, head_dim))
    cos, sin = angles[q.device]
    return inner(apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin), v, dropout_p, mask)


def keep_probabilities(recorded: list, probabilities: torch.Tensor) -> None:
    """Append recorded attention probabilities, keeping their gradient after backward
    (gradient-weighted maps read it)."""
    if probabilities.requires_grad:
        probabilities.retain_grad()
    recorded.append(probabilities)


class AttentionCore(nn.Module):
    """The attention core of a block over this rank's heads — QK-norms, softmax(QK^T)V (or
    window / local-global / linear attention, `cfg.attention_kind(layer)`, with rope-2d
    rotation if configured) and attention dropout — recomputed in backward under
    --recompute-granularity selective. Without it, window and linear attention still keep
    only their q, k, v inputs and run again in backward (`_inputs_only`).

    `recorded`: None, or a list that each forward appends this rank's attention
    probabilities [b, n/t, L, L] to (the real tokens; set by `megavit.interpret`): the
    core then runs `eager_attention`, the same function with the probabilities explicit,
    and is not recomputed."""

    def __init__(self, cfg: TransformerConfig, rt: Runtime, layer: int = 0) -> None:
        super().__init__()
        self.head_dim, self.rt = cfg.head_dim, rt
        self.q_norm, self.k_norm = qk_norms(cfg, rt)
        self.dropout = cfg.attention_dropout
        self.kind = cfg.attention_kind(layer)
        self.attend = None
        self.recorded: list | None = None
        # relation(qkv, sample_ids) -> qkv: sees (and may tie a loss to) this rank's
        # [q | k | v] before the core, e.g. relation distillation (tasks/distillation)
        self.relation = None
        self.eager = None               # an image model's attention with explicit maps
        if hasattr(cfg, "grid"):
            image = TokenLayout(cfg.prefix_tokens, tuple(cfg.grid))
            self.eager = functools.partial(
                eager_attention, kind=self.kind, length=cfg.seq_length, layout=image,
                w=cfg.window_size or 0, shift=cfg.window_shift_of(layer),
                record=self._record)
        if self.kind in ("window", "local-global"):   # an image model (models/attention.py)
            layout = TokenLayout(cfg.prefix_tokens, tuple(cfg.grid))
            self.attend = functools.partial(_window, layout=layout, w=cfg.window_size,
                                            shift=cfg.window_shift_of(layer),
                                            carriers=self.kind == "local-global")
        elif self.kind == "linear":   # real tokens: the sequence before any SP padding
            self.attend = functools.partial(_linear, length=cfg.seq_length)
        if self.attend is not None and rt.recompute_granularity != "selective":
            self.attend = functools.partial(_inputs_only, inner=self.attend, rng=rt.rng)
        if getattr(cfg, "position_embedding_type", None) == "rope-2d":
            layout = TokenLayout(cfg.prefix_tokens, tuple(cfg.grid))
            angles: dict = {}
            self.attend = functools.partial(_rotated, layout=layout, head_dim=cfg.head_dim,
                                            inner=self.attend or softmax_attention,
                                            angles=angles)
            self.eager = functools.partial(_rotated, layout=layout, head_dim=cfg.head_dim,
                                           inner=self.eager, angles=angles)

    def _record(self, probabilities: torch.Tensor) -> None:
        keep_probabilities(self.recorded, probabilities)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        return multi_head_attention(q, k, v, self.head_dim, self.q_norm, self.k_norm, mask,
                                    self.dropout if self.training else 0.0, self.rt.rng,
                                    attend=self.attend if self.recorded is None
                                    else self.eager)

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None,
                sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.relation is not None:
            qkv = self.relation(qkv, sample_ids)
        q, k, v = qkv.chunk(3, dim=-1)                          # this rank's heads
        if self.recorded is not None:
            return self.core(q, k, v, mask)
        if self.rt.recompute_granularity == "selective" and torch.is_grad_enabled():
            return recompute(self.core, q, k, v, mask, rng=self.rt.rng)
        return self.core(q, k, v, mask)


class ParallelBlock(nn.Module):
    """ViT-22B block: y = x + out_proj([attention(q, k, v) | gelu(u)]), where one
    LayerNorm feeds one fused column-parallel projection to [q | k | v | u] and one fused
    row-parallel projection maps [attention | MLP] back: one TP all-reduce forward
    (out_proj) and one backward (in_proj's input gradient); with sequence parallelism an
    all-gather and a reduce-scatter instead.

    Each fused projection has one weight (one TP split) but runs as one matmul per output
    group, so the MLP activation is contiguous and nothing is concatenated (see
    `forward_groups`); the FLOPs are those of the fused matmul.

    Per-rank shapes with TP size t: x [s, b, h] ([s/t, b, h] with SP); q, k, v [s, b, h/t]
    (this rank's heads), u [s, b, f/t].
    """

    def __init__(self, cfg: TransformerConfig, rt: Runtime, layer: int) -> None:
        super().__init__()
        h, f, std = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std
        sp = rt.sequence_parallel
        self.norm = norm_from_config(cfg, h, rt.layernorm_impl, partial_grad=sp is not None)
        qkv_bias, mlp_bias = cfg.add_qkv_bias, cfg.add_mlp_bias
        self.in_proj = ColumnParallelLinear(h, (h, h, h, f), rt.tp, init_std=std,
                                            bias=(qkv_bias, qkv_bias, qkv_bias, mlp_bias),
                                            sequence_parallel=sp)
        self.attention = AttentionCore(cfg, rt, layer)
        self.act = Activation(cfg.activation)
        self.out_proj = RowParallelLinear((h, f), h, rt.tp, init_std=std,
                                          bias=mlp_bias or cfg.add_proj_bias,
                                          sequence_parallel=sp)
        self.branch = branch_regularizer(cfg, rt, layer, "parallel")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv, u = self.in_proj.forward_groups(self.norm(x), [3, 1])  # [s,b,3h/t], [s,b,f/t]
        a = self.attention(qkv, ctx.attn_mask, ctx.sample_ids)  # [s, b, h/t]
        y = self.out_proj.forward_groups([a, self.act(u)])      # the block's one all-reduce
        return x + self.branch(y, ctx.sample_ids)               # [s, b, h]


class SequentialBlock(nn.Module):
    """Classic pre-LN ViT block: x + attn(LN(x)), then + MLP(LN(x)). Two TP all-reduces
    each way (attention-out and MLP-out)."""

    def __init__(self, cfg: TransformerConfig, rt: Runtime, layer: int) -> None:
        super().__init__()
        h, f, std = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std
        sp = rt.sequence_parallel
        self.norm1 = norm_from_config(cfg, h, rt.layernorm_impl, partial_grad=sp is not None)
        self.qkv = ColumnParallelLinear(h, (h, h, h), rt.tp, bias=cfg.add_qkv_bias, init_std=std,
                                        sequence_parallel=sp)
        self.attention = AttentionCore(cfg, rt, layer)
        self.proj = RowParallelLinear(h, h, rt.tp, bias=cfg.add_proj_bias, init_std=std,
                                      sequence_parallel=sp)
        self.branch1 = branch_regularizer(cfg, rt, layer, "attention")
        self.norm2 = norm_from_config(cfg, h, rt.layernorm_impl, partial_grad=sp is not None)
        self.fc1 = ColumnParallelLinear(h, f, rt.tp, bias=cfg.add_mlp_bias, init_std=std,
                                        sequence_parallel=sp)
        self.act = Activation(cfg.activation)
        self.fc2 = RowParallelLinear(f, h, rt.tp, bias=cfg.add_mlp_bias, init_std=std,
                                     sequence_parallel=sp)
        self.branch2 = branch_regularizer(cfg, rt, layer, "mlp")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        a = self.attention(self.qkv(self.norm1(x)), ctx.attn_mask,
                           ctx.sample_ids)                              # [s, b, h/t]
        x = x + self.branch1(self.proj(a), ctx.sample_ids)
        return x + self.branch2(self.fc2(self.act(self.fc1(self.norm2(x)))), ctx.sample_ids)



class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then a
    residual MLP. Tensor-parallel like a block (heads and MLP split over TP).
    Input [s, b, h] (all tokens, replicated) -> [b, h]. `recorded`: as AttentionCore's, the
    probe's attention probabilities [b, n/t, 1, s] per forward."""

    def __init__(self, cfg: TransformerConfig, tp: Group, layernorm_impl: str = "torch") -> None:
        super().__init__()
        h, f, std = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std
        self.head_dim = cfg.head_dim
        self.probe = nn.Parameter(torch.empty(h))
        set_init(self.probe, trunc_normal(std))
        self.q = ColumnParallelLinear(h, h, tp, bias=True, init_std=std)
        self.kv = ColumnParallelLinear(h, (h, h), tp, bias=True, init_std=std)
        self.proj = RowParallelLinear(h, h, tp, bias=True, init_std=std)
        self.norm = norm_from_config(cfg, h, layernorm_impl)
        self.fc1 = ColumnParallelLinear(h, f, tp, bias=True, init_std=std)
        self.act = Activation(cfg.activation)
        self.fc2 = RowParallelLinear(f, h, tp, bias=True, init_std=std)
        self.recorded: list | None = None

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask`: additive [b, 1, 1, s] hiding padded tokens (text), or None."""
        b = x.shape[1]
        q = self.q(self.probe.view(1, 1, -1)).expand(1, b, -1)   # [1, b, h/t]
        k, v = self.kv(x).chunk(2, dim=-1)                        # [s, b, h/t] each
        attend = None if self.recorded is None else functools.partial(
            eager_attention, kind="full", length=x.shape[0],
            record=functools.partial(keep_probabilities, self.recorded))
        y = self.proj(multi_head_attention(q, k, v, self.head_dim, attn_mask=key_mask,
                                           attend=attend))        # [1, b, h]
        y = y + self.fc2(self.act(self.fc1(self.norm(y))))
        return y[0]


def build_block(cfg: TransformerConfig, rt: Runtime, layer: int) -> nn.Module:
    """Block `layer` (its global index) of the kind --block-type names."""
    kind = ParallelBlock if cfg.block_type == "parallel" else SequentialBlock
    return kind(cfg, rt, layer)
