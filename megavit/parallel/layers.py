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

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megavit.parallel.comm import Group
from megavit.parallel.partial_grad import mark_partial_grad
from megavit.parallel.mappings import reduce_from_tp, reduce_scatter_to_sequence_parallel
from megavit.parallel.random import MODEL_PARALLEL, RNGTracker
from megavit.parallel.sharding import TPShard, constant, set_init, set_tp_shard, trunc_normal
from megavit.parallel.tp_linear import SequenceParallelMode, column_linear, row_linear


def _segments(n: int | Sequence[int]) -> tuple[int, ...]:
    return (n,) if isinstance(n, int) else tuple(n)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along `out` over the TP group.

    `out_features` may be a list of segments (e.g. [h, h, h, f] for a fused q|k|v|mlp
    projection): each segment is split over the ranks separately, so rank r's output is
    [seg0_r | seg1_r | ...]. `bias` is one flag, or one per segment (a segment without
    bias gets zeros; the bias add stays fused in the matmul).

    Input [..., in], replicated. Output [..., sum(segments) / t], this rank's columns.
    Collectives: backward all-reduces the input gradient over `group`. With
    `sequence_parallel` ("keep" or "regather", see `column_linear`) the input is this rank's
    sequence shard [s/t, b, in], all-gathered in forward; backward reduce-scatters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        group: Group,
        bias: bool | Sequence[bool] = True,
        init_std: float = 0.02,
        sequence_parallel: SequenceParallelMode | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel if group.size > 1 else None
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

    def _group_bias(self, first: int, count: int) -> torch.Tensor | None:
        """This rank's bias for segments [first, first + count): a view of the bias
        parameter, zeros where a segment has none, or None when none has one."""
        flags = self.bias_flags[first:first + count]
        if not any(flags):
            return None
        offset = sum(n for n, f in zip(self.local_segments[:first], self.bias_flags) if f)
        pieces = []
        for n, has_bias in zip(self.local_segments[first:first + count], flags):
            pieces.append(self.bias[offset:offset + n] if has_bias else self.bias.new_zeros(n))
            offset += n if has_bias else 0
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., sum(segments) / t]."""
        return self.forward_groups(x, [len(self.segments)])[0]

    def forward_groups(self, x: torch.Tensor, groups: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """The same projection as separate outputs, one matmul per group of consecutive
        segments (`groups` gives how many segments each takes, e.g. [3, 1] for [q|k|v]
        and [mlp]). Each output is contiguous; nothing is split or concatenated, forward
        or backward. One all-reduce backward, whatever the number of groups."""
        if sum(groups) != len(self.segments):
            raise ValueError(f"groups {list(groups)} do not cover {len(self.segments)} segments")
        rows, biases, first = [], [], 0
        for n in groups:
            rows.append(sum(self.local_segments[first:first + n]))
            biases.append(self._group_bias(first, n))
            first += n
        return column_linear(x, self.weight, self.group, rows, biases, self.sequence_parallel,
                             getattr(self, "weight_grads", None))

    def extra_repr(self) -> str:
        return (f"in={self.weight.shape[1]}, out_segments={self.segments}, "
                f"tp={self.group.size}, bias={self.bias_flags}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along `in` over the TP group.

    `in_features` may be a list of segments matching the column-parallel layer that feeds
    it (e.g. [h, f] for a fused attention-out | MLP-out projection).

    Input [..., sum(segments) / t], this rank's slice. Output [..., out], replicated.
    Collectives: forward all-reduces the output over `group`; the bias (replicated) is
    added after the reduction. With `sequence_parallel` the output is reduce-scattered to
    this rank's sequence shard [s/t, b, out] instead (all-gather backward; "keep" and
    "regather" differ only in the column-parallel layer that feeds it), and the bias
    gradient, from this rank's tokens only, is summed over TP after backward.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int,
        group: Group,
        bias: bool = True,
        init_std: float = 0.02,
        sequence_parallel: SequenceParallelMode | None = None,
    ) -> None:
        super().__init__()
        if sequence_parallel not in (None, "keep", "regather"):
            raise ValueError(f"unknown sequence-parallel mode {sequence_parallel!r}")
        self.group = group
        self.sequence_parallel = sequence_parallel is not None and group.size > 1
        self.segments = _segments(in_features)
        t = group.size
        self.weight = nn.Parameter(torch.empty(out_features, sum(s // t for s in self.segments)))
        set_tp_shard(self.weight, TPShard(1, self.segments, t, group.rank))
        set_init(self.weight, trunc_normal(init_std))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            set_init(self.bias, constant(0.0))
            if self.sequence_parallel:   # added to this rank's tokens only
                mark_partial_grad(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., sum(segments) / t] -> [..., out]."""
        return self.forward_groups([x])

    def forward_groups(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The projection of the concatenation of `inputs` (one per group of input
        segments, each [..., its width / t]) without concatenating them: the partial
        products accumulate into one output, which is all-reduced once."""
        t = self.group.size
        cols = [x.shape[-1] for x in inputs]
        if sum(cols) != self.weight.shape[1]:
            raise ValueError(f"inputs of widths {cols} do not match the local weight "
                             f"{tuple(self.weight.shape)}")
        store = getattr(self, "weight_grads", None)   # zero bubble: see weight_grad.py
        if t == 1:
            return row_linear(inputs, self.weight, cols, self.bias, store)
        y = row_linear(inputs, self.weight, cols, weight_grads=store)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel(y, self.group)
        else:
            y = reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_segments={self.segments}, out={self.weight.shape[0]}, "
                f"tp={self.group.size}, bias={self.bias is not None}")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, through apex's fused kernel when asked (`impl="apex"`), apex is
    importable and the input is on a GPU; otherwise torch's. The same function either way
    (a LayerNorm without bias passes zeros to apex's affine kernel)."""

    def __init__(self, size: int, eps: float, bias: bool, impl: str = "torch") -> None:
        super().__init__(size, eps=eps, bias=bias)
        self.fused = None
        if impl == "apex":
            try:
                from apex.normalization.fused_layer_norm import fused_layer_norm_affine
            except ImportError:
                pass
            else:
                self.fused = fused_layer_norm_affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is None or not x.is_cuda:
            return super().forward(x)
        bias = self.bias if self.bias is not None else torch.zeros_like(self.weight)
        return self.fused(x, self.weight, bias, self.normalized_shape, self.eps)


class RMSNorm(nn.Module):
    """x * weight / sqrt(mean(x^2) + eps) over the last dim (no mean subtraction, no bias)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(size: int, eps: float, bias: bool, partial_grad: bool = False,
              impl: str = "torch", kind: str = "layernorm") -> nn.Module:
    """A LayerNorm (or with `kind` "rmsnorm" an RMSNorm, which has no bias) replicated over
    TP, with weight 1 and, if present, bias 0. `partial_grad`: it sees only this rank's part
    of the work (a sequence shard, or its own heads), so its gradients are summed over TP
    after backward."""
    if kind == "rmsnorm":
        if bias:
            raise ValueError("an RMSNorm has no bias")
        norm = RMSNorm(size, eps)
    else:
        norm = LayerNorm(size, eps, bias, impl)
    set_init(norm.weight, constant(1.0))
    if getattr(norm, "bias", None) is not None:
        set_init(norm.bias, constant(0.0))
    return mark_partial_grad(norm) if partial_grad else norm


def to_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[s, b, n*d] -> [b, n, s, d] (a view; no copy)."""
    s, b, _ = x.shape
    return x.view(s, b, -1, head_dim).permute(1, 2, 0, 3)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, n, s, d] -> [s, b, n*d]."""
    b, n, s, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(s, b, n * d)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                      attn_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA on heads-first [b, n, s, d] tensors (the default `attend`)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_dim: int,
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng: RNGTracker | None = None,
    attend: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over this rank's heads, bidirectional; or, with
    `attend`, attend(q, k, v, dropout_p, attn_mask) on the heads-first [b, n, s, d] tensors
    instead (another attention pattern, e.g. windows, or rotated queries and keys).

    q [sq, b, n*d], k and v [sk, b, n*d] -> [sq, b, n*d]. `q_norm` / `k_norm` normalise
    each head's d-vector (ViT-22B's QK LayerNorm). `attn_mask`: additive [sq, sk] (0 or
    -inf, e.g. for padded keys). Dropout on the probabilities draws from the tracker's
    model-parallel stream: each TP rank's heads get their own masks. No communication.
    """
    s, b, _ = q.shape
    q = q.view(s, b, -1, head_dim)
    k = k.view(k.shape[0], b, -1, head_dim)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    args = (q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), to_heads(v, head_dim))
    attend = attend or softmax_attention
    if dropout_p > 0:
        if rng is None:
            raise ValueError("attention dropout needs an RNG tracker")
        with rng.fork(MODEL_PARALLEL):
            out = attend(*args, dropout_p, attn_mask)
    else:
        out = attend(*args, 0.0, attn_mask)
    return from_heads(out)
