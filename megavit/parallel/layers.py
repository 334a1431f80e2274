"""Tensor-parallel building blocks: column- and row-parallel linear layers, LayerNorm and
multi-head attention over this rank's heads.

Activations are [s, b, h] (sequence first, as in Megatron). Inside a TP region the last
dim is this rank's slice; outside it activations are replicated on every TP rank.

    x [s, b, h] ── ColumnParallelLinear ──► [s, b, out/t] ── ... ── RowParallelLinear ──► [s, b, h]
       (backward: all-reduce of dx)                        (forward: all-reduce of y)

Weights are stored as for `F.linear` ([out, in]); each carries a `TPShard` describing
its slice of the serial weight and an init function (see `megavit.parallel.sharding`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megavit.parallel.comm import Group
from megavit.parallel.mappings import copy_to_tp, reduce_from_tp
from megavit.parallel.sharding import TPShard, constant, set_init, set_tp_shard, trunc_normal


def _segments(n: int | Sequence[int]) -> tuple[int, ...]:
    return (n,) if isinstance(n, int) else tuple(n)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along `out` over the TP group.

    `out_features` may be a list of segments (e.g. [h, h, h, f] for a fused q|k|v|mlp
    projection): each segment is split over the ranks separately, so rank r's output is
    [seg0_r | seg1_r | ...]. `bias` is one flag, or one per segment (a segment without
    bias gets zeros; the bias add stays fused in the matmul).

    Input [..., in], replicated. Output [..., sum(segments) / t], this rank's columns.
    Collectives: backward all-reduces the input gradient over `group`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        group: Group,
        bias: bool | Sequence[bool] = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.group = group
        self.segments = _segments(out_features)
        t = group.size
        self.local_segments = tuple(s // t for s in self.segments)
        self.weight = nn.Parameter(torch.empty(sum(self.local_segments), in_features))
        set_tp_shard(self.weight, TPShard(0, self.segments, t, group.rank))
        set_init(self.weight, trunc_normal(init_std))
        flags = [bias] * len(self.segments) if isinstance(bias, bool) else list(bias)
        if len(flags) != len(self.segments):
            raise ValueError("give one bias flag per output segment")
        self.bias_flags = tuple(flags)
        biased = tuple(s for s, f in zip(self.segments, flags) if f)
        if biased:
            self.bias = nn.Parameter(torch.empty(sum(s // t for s in biased)))
            set_tp_shard(self.bias, TPShard(0, biased, t, group.rank))
            set_init(self.bias, constant(0.0))
        else:
            self.register_parameter("bias", None)

    def _local_bias(self) -> torch.Tensor | None:
        if self.bias is None or all(self.bias_flags):
            return self.bias
        pieces, offset = [], 0
        for n, has_bias in zip(self.local_segments, self.bias_flags):
            if has_bias:
                pieces.append(self.bias[offset:offset + n])
                offset += n
            else:
                pieces.append(self.bias.new_zeros(n))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self._local_bias())

    def extra_repr(self) -> str:
        return (f"in={self.weight.shape[1]}, out_segments={self.segments}, "
                f"tp={self.group.size}, bias={self.bias_flags}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along `in` over the TP group.

    `in_features` may be a list of segments matching the column-parallel layer that feeds
    it (e.g. [h, f] for a fused attention-out | MLP-out projection).

    Input [..., sum(segments) / t], this rank's slice. Output [..., out], replicated.
    Collectives: forward all-reduces the output over `group`; the bias (replicated) is
    added after the reduction.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int,
        group: Group,
        bias: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.group = group
        self.segments = _segments(in_features)
        t = group.size
        self.weight = nn.Parameter(torch.empty(out_features, sum(s // t for s in self.segments)))
        set_tp_shard(self.weight, TPShard(1, self.segments, t, group.rank))
        set_init(self.weight, trunc_normal(init_std))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            set_init(self.bias, constant(0.0))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_segments={self.segments}, out={self.weight.shape[0]}, "
                f"tp={self.group.size}, bias={self.bias is not None}")


def layer_norm(size: int, eps: float, bias: bool) -> nn.LayerNorm:
    """A LayerNorm (replicated over TP) with weight 1 and, if present, bias 0."""
    norm = nn.LayerNorm(size, eps=eps, bias=bias)
    set_init(norm.weight, constant(1.0))
    if norm.bias is not None:
        set_init(norm.bias, constant(0.0))
    return norm


def to_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[s, b, n*d] -> [b, n, s, d] (a view; no copy)."""
    s, b, _ = x.shape
    return x.view(s, b, -1, head_dim).permute(1, 2, 0, 3)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, n, s, d] -> [s, b, n*d]."""
    b, n, s, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(s, b, n * d)


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_dim: int,
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over this rank's heads, bidirectional.

    q [sq, b, n*d], k and v [sk, b, n*d] -> [sq, b, n*d]. `q_norm` / `k_norm` normalise
    each head's d-vector (ViT-22B's QK LayerNorm). No communication.
    """
    s, b, _ = q.shape
    q = q.view(s, b, -1, head_dim)
    k = k.view(k.shape[0], b, -1, head_dim)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), to_heads(v, head_dim)
    )
    return from_heads(out)
