"""Collectives as autograd functions, each paired with its conjugate.

Every function takes the `Group` it communicates over (never a global) and states its
forward and backward. On a group of size 1 each is the identity.

Tensor-parallel region (activations replicated outside, sharded on the last dim inside):

    copy_to_tp      forward: identity          backward: all-reduce over the group
    reduce_from_tp  forward: all-reduce        backward: identity
    scatter_to_tp   forward: keep own chunk    backward: all-gather        (last dim)
    gather_from_tp  forward: all-gather        backward: keep own chunk    (last dim)

Sequence parallelism (activations outside the TP region split along the sequence, dim 0 of
[s, b, h], over the same group):

    scatter_to_sequence_parallel       forward: keep own chunk    backward: all-gather
    gather_from_sequence_parallel      forward: all-gather        backward: keep own chunk
    reduce_scatter_to_sequence_parallel forward: reduce-scatter   backward: all-gather

(`gather_from_sequence_parallel` assumes what follows is computed identically on every TP
rank, so each rank's gradient is already the full one; entering a column-parallel matmul
the gather is fused into the matmul instead, with a reduce-scatter backward.)

The linear layers fuse `copy_to_tp` into their matmuls (`megavit.parallel.tp_linear`, so the
backward all-reduce can overlap the weight gradients) and apply `reduce_from_tp` to their
output; the other pairs are for activations that cross a TP boundary without a matmul.
`reduce_from_tp` all-reduces in place: give it a tensor nothing else holds (a matmul output).
"""

from __future__ import annotations

import torch

from megavit.parallel.comm import Group


def _split(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """This rank's chunk of `x` along `dim`, in its own storage (a view would keep the
    whole of `x` alive for as long as the chunk is kept, e.g. saved for backward)."""
    size = x.shape[dim]
    if size % group.size:
        raise ValueError(f"dim {dim} of size {size} does not split over {group.size} "
                         f"{group.name} ranks")
    chunk = size // group.size
    return x.narrow(dim, group.rank * chunk, chunk).clone(memory_format=torch.contiguous_format)


def _gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` (all_gather concatenates dim 0)."""
    if dim == 0:
        return group.all_gather(x)
    return group.all_gather(x.movedim(dim, 0).contiguous()).movedim(0, dim).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A copy: autograd may hand the same gradient tensor to another branch.
        return ctx.group.all_reduce(grad.clone(memory_format=torch.contiguous_format)), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        x = x.contiguous()
        group.all_reduce(x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _split(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a TP region. Forward: identity. Backward: all-reduce over `group`."""
    return x if group.size == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a TP region by summing partial results. Forward: all-reduce over `group`.
    Backward: identity."""
    return x if group.size == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim: [..., n] -> [..., n / size].
    Backward: all-gather over `group` along the last dim."""
    return x if group.size == 1 else _Split.apply(x, group, -1)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather over `group` along the last dim: [..., n / size] -> [..., n].
    Backward: keep this rank's chunk."""
    return x if group.size == 1 else _Gather.apply(x, group, -1)


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return group.reduce_scatter(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group.all_gather(grad), None


def scatter_to_sequence_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s, ...] -> this rank's [s / size, ...]. Backward: all-gather over `group`."""
    return x if group.size == 1 else _Split.apply(x, group, 0)


def gather_from_sequence_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather over `group` along dim 0: [s / size, ...] -> [s, ...].
    Backward: keep this rank's chunk of the (identical on every rank) gradient."""
    return x if group.size == 1 else _Gather.apply(x, group, 0)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum partial [s, ...] results over `group`, keep this rank's [s / size, ...].
    Backward: all-gather over `group`."""
    return x if group.size == 1 else _ReduceScatterToSP.apply(x, group)
