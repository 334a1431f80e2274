"""Measuring memory without a GPU: what autograd keeps for backward, and what operations
allocate.

`LiveBytesMeter` tracks, inside `with meter:`, the storage that operations allocate until it
is freed, and its peak (a CPU stand-in for torch.cuda.max_memory_allocated).
`SavedTensorMeter` records, while active, every tensor that autograd saves for backward,
by storage (a tensor kept by two operations, or two views of one tensor, count once), and
leaves out the storages it is told to exclude (parameters, buffers): the activation memory
of the forward pass that ran inside it.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytesMeter(TorchDispatchMode):
    """Peak bytes of live storage that operations inside the mode allocated: `peak`. Views
    and in-place / out= results are not new storage; a storage counts until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.bytes = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.bytes -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(tree_flatten(out)[0]):
            if not isinstance(t, torch.Tensor):
                continue
            if returns and returns[min(i, len(returns) - 1)].alias_info is not None:
                continue                      # a view, or an in-place / out= result
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() == 0 or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(storage, self._freed, key)
        return out


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
