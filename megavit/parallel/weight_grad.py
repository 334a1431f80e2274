"""Splitting a backward pass into the input gradient (B) and the weight gradient (W), for
the zero-bubble pipeline schedule (`schedules.schedule_zb_h1`).

A linear layer's backward has two products: dx = dy W (the previous stage waits for it)
and dW = dy^T x (nobody waits for it). While a `WeightGradStore` is deferring (the B
pass of one micro-batch and chunk), the tensor-parallel linear layers
(`tp_linear.column_linear`, `row_linear`) compute dx only and hand the store a closure
that computes dW from the dy and x it keeps; everything else — norms, biases, embeddings,
the input-gradient collectives — runs in B as usual. The W pass of that (micro-batch,
chunk) runs the closures and gives each weight its gradient through autograd
(`torch.autograd.backward` on the leaf), so gradient hooks (the data-parallel buffers'
accumulation, bucket counting) see one gradient per weight per micro-batch exactly as
without the split: dW of a weight used more than once in the chunk is summed first.

The layers find the store through their `weight_grads` attribute (`defer_weight_gradients`
sets it on a model's layers); without one they compute dW in backward as before. The
activations W needs (dy and x of each layer) are held until W runs: a micro-batch's
memory is freed at W, not at B.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Hashable, Iterator

import torch
from torch import nn


class WeightGradStore:
    """The deferred weight gradients of one pipeline stage, per (micro-batch, chunk)."""

    def __init__(self) -> None:
        self.deferring = False
        self.computed = 0        # weight gradients W passes have given (for tests, logs)
        self._collecting: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = []
        self._queues: dict[Hashable, list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]] = {}

    @contextmanager
    def input_gradients_only(self, key: Hashable) -> Iterator[None]:
        """Inside: linear layers defer their weight gradients, kept under `key`."""
        if self.deferring:
            raise RuntimeError("weight gradients are already being deferred")
        self.deferring, self._collecting = True, []
        try:
            yield
        finally:
            self.deferring = False
            self._queues[key] = self._collecting
            self._collecting = []

    def put(self, weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None:
        """Called by a layer's backward: `compute()` gives dW for `weight` later."""
        self._collecting.append((weight, compute))

    def run(self, key: Hashable) -> int:
        """The W pass of `key`: compute its deferred gradients and accumulate them, one
        gradient per weight (summed over its uses). Returns how many weights got one."""
        summed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for weight, compute in self._queues.pop(key, []):
            with torch.no_grad():
                g = compute()
            if id(weight) in summed:
                summed[id(weight)] = (weight, summed[id(weight)][1] + g)
            else:
                summed[id(weight)] = (weight, g)
        if summed:
            weights, grads = zip(*summed.values())
            torch.autograd.backward(list(weights), list(grads))
        self.computed += len(summed)
        return len(summed)

    @property
    def pending(self) -> int:
        """(micro-batch, chunk) passes whose W has not run."""
        return len(self._queues)


def defer_weight_gradients(model: nn.Module, store: WeightGradStore | None) -> int:
    """Point every tensor-parallel linear layer of `model` at `store` (None: compute
    weight gradients in backward again). Returns the number of layers."""
    from megavit.parallel.layers import ColumnParallelLinear, RowParallelLinear

    n = 0
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            m.weight_grads = store
            n += 1
    return n
