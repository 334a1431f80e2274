"""Parameters whose gradient is partial over tensor parallelism.

A replicated parameter used only on this rank's part of the work — the per-head
QK-LayerNorm weights (each rank applies them to its own heads), and under sequence
parallelism every LayerNorm and bias applied to this rank's sequence shard — ends backward
with a partial gradient; the sum over the TP group is the serial gradient. Such parameters
are marked here; `megavit.parallel.data_parallel.DataParallelBuffers` keeps them in their
own gradient bucket and sums it over TP before reducing it over DP.
"""

from __future__ import annotations

import torch
from torch import nn


def mark_partial_grad(target: nn.Module | torch.Tensor) -> nn.Module | torch.Tensor:
    """Mark a parameter (or every parameter of a module) as replicated over TP with a
    per-rank partial gradient, summed over TP after backward. Returns `target`."""
    params = [target] if isinstance(target, torch.Tensor) else list(target.parameters())
    for p in params:
        p.tp_partial_grad = True  # type: ignore[attr-defined]
    return target


def has_partial_grad(param: torch.Tensor) -> bool:
    return getattr(param, "tp_partial_grad", False)
