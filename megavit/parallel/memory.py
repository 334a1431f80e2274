"""Measuring what autograd keeps for backward.

`SavedTensorMeter` records, while active, every tensor that autograd saves for backward,
by storage (a tensor kept by two operations, or two views of one tensor, count once), and
leaves out the storages it is told to exclude (parameters, buffers): the activation memory
of the forward pass that ran inside it.
"""

from __future__ import annotations

from typing import Iterable

import torch


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
