"""The global gradient norm over every tensor-parallel rank, and clipping by it.

Sharded parameters contribute their local squares on every TP rank; replicated ones
(LayerNorms, biases after a row-parallel reduction, embeddings, heads) hold the same
gradient on every TP rank and are counted on TP rank 0 only. One all-reduce on the TP
group sums the squares, one on the pipeline group adds the other stages' (disjoint)
parameters. Data-parallel replicas hold identical (already averaged) gradients, so no DP
reduction is needed.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megavit.parallel.comm import Group
from megavit.parallel.sharding import is_replicated


def global_grad_norm(params: Iterable[torch.Tensor], tp: Group,
                     pp: Group | None = None) -> torch.Tensor:
    """sqrt(sum of squares of every gradient of the serial model), a 0-d fp32 tensor: summed
    over TP (replicated parameters once) and over the pipeline stages (disjoint parameters)."""
    params = list(params)
    squares = []
    for p in params:
        if p.grad is None or (is_replicated(p) and tp.rank != 0):
            continue
        squares.append(p.grad.detach().float().pow(2).sum())
    device = params[0].device if params else torch.device("cpu")
    total = (torch.stack(squares).sum() if squares else torch.zeros((), device=device)).reshape(1)
    tp.all_reduce(total)
    if pp is not None:
        pp.all_reduce(total)
    return total.sqrt()[0]


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, tp: Group,
                   pp: Group | None = None) -> torch.Tensor:
    """Scale gradients so the global norm is at most `max_norm` (0: no clipping).
    Returns the norm before clipping (0-d tensor; no host sync)."""
    norm = global_grad_norm(params, tp, pp)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return norm
