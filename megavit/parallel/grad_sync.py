"""Gradient synchronisation after backward, before clipping and the optimizer step.

- Over TP: a replicated parameter used only on this rank's part of the work (the per-head
  QK-LayerNorm weights, which each rank applies to its own heads; with sequence parallelism
  also every LayerNorm and bias applied to this rank's sequence shard) ends backward with a
  partial gradient; the sum over the TP group is the serial gradient. Such parameters are
  marked with `mark_partial_grad`; their gradients are summed in one all-reduce.
- Over DP: every gradient is averaged over the replicas (one all-reduce per dtype), so each
  holds the gradient of the global batch's mean loss.

Both pack the gradients into one flat buffer per dtype, so each is one collective.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megavit.parallel.comm import Group


def mark_partial_grad(target: nn.Module | torch.Tensor) -> nn.Module | torch.Tensor:
    """Mark a parameter (or every parameter of a module) as replicated over TP with a
    per-rank partial gradient, summed over TP after backward. Returns `target`."""
    params = [target] if isinstance(target, torch.Tensor) else list(target.parameters())
    for p in params:
        p.tp_partial_grad = True  # type: ignore[attr-defined]
    return target


def has_partial_grad(param: torch.Tensor) -> bool:
    return getattr(param, "tp_partial_grad", False)


@torch.no_grad()
def _all_reduce_grads(grads: list[torch.Tensor], group: Group, scale: float) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        group.all_reduce(flat)
        if scale != 1.0:
            flat.mul_(scale)
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)


def sum_partial_gradients(params: Iterable[torch.Tensor], tp: Group) -> None:
    """In place: gradients of parameters marked partial become their sum over `tp`."""
    if tp.size > 1:
        grads = [p.grad for p in params if p.grad is not None and has_partial_grad(p)]
        if grads:
            _all_reduce_grads(grads, tp, 1.0)


def average_gradients(params: Iterable[torch.Tensor], dp: Group) -> None:
    """In place: every gradient becomes its mean over `dp`."""
    if dp.size > 1:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            _all_reduce_grads(grads, dp, 1.0 / dp.size)
