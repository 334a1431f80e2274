"""What the offline tools share, tensor by tensor and never the whole model in memory:
`reshard` here (`reshard.py`), and consolidation, export and import in `megavit.interop`.

- `ConvertError`: a conversion that cannot be done; the command lines exit 2 with it.
- `Progress`: one stable progress line per written batch.
- `read_config`: a checkpoint's `megavit_config.json` and the ModelConfig it describes.
- `batched`, `read_tensors`: stored tensors are read in batches of at most `buffer_bytes` (a
  tensor larger than that is read alone), each batch written before the next is read.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from megavit.checkpointing.checkpointer import CONFIG_FILE
from megavit.checkpointing.model_config import read_checkpoint_info
from megavit.checkpointing.model_state import CheckpointLoadError
from megavit.checkpointing.safe_reader import (CorruptCheckpointError, SafeFileSystemReader,
                                               failure_causes)
from megavit.config import ModelConfig
from megavit.errors import UserError


class ConvertError(UserError, RuntimeError):
    """A conversion that cannot be done (bad target, a checkpoint that contradicts its
    config); nothing was written."""


@dataclass
class Progress:
    """Counts what has been written; `report` prints one stable line per batch."""

    total_tensors: int
    total_bytes: int
    report: Callable[[str], None]
    label: str = "convert"
    tensors: int = 0
    bytes: int = 0
    peak_batch_bytes: int = 0
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def batch_done(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        self.peak_batch_bytes = max(self.peak_batch_bytes, nbytes)
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.report(f"{self.label} | tensors {self.tensors}/{self.total_tensors} | MiB "
                    f"{self.bytes / 2**20:.1f}/{self.total_bytes / 2**20:.1f} | "
                    f"{100 * self.bytes / max(self.total_bytes, 1):.1f}% | "
                    f"{self.bytes / 2**20 / seconds:.1f} MiB/s")


def read_config(checkpoint: Path) -> tuple[dict, ModelConfig]:
    path = checkpoint / CONFIG_FILE
    info = read_checkpoint_info(checkpoint)
    try:
        return info, ModelConfig(**info["model"])
    except TypeError as e:
        raise CheckpointLoadError(f"{path}: a model config this megavit cannot build ({e})") \
            from e


def batched(names: list[str], sizes: dict[str, int], buffer_bytes: int) -> Iterator[list[str]]:
    """Consecutive names in groups of at most `buffer_bytes` (a larger tensor alone)."""
    batch, held = [], 0
    for name in names:
        if batch and held + sizes[name] > buffer_bytes:
            yield batch
            batch, held = [], 0
        batch.append(name)
        held += sizes[name]
    if batch:
        yield batch


def read_tensors(checkpoint: Path, metadata: Metadata, names: list[str]) -> dict[str, torch.Tensor]:
    """The named stored tensors, whole, from however many blocks they were saved as."""
    state = {}
    for name in names:
        md = metadata.state_dict_metadata[name]
        state[name] = torch.empty(md.size, dtype=md.properties.dtype)
    try:
        with warnings.catch_warnings():   # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=SafeFileSystemReader(os.fspath(checkpoint)),
                     no_dist=True)
    except CheckpointException as e:      # DCP wraps what the reader raised
        for failure in getattr(e, "failures", {}).values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, CorruptCheckpointError):
                raise CorruptCheckpointError(str(cause)) from e
        raise CheckpointLoadError(f"{checkpoint}: cannot be read ({failure_causes(e)})") from e
    return state
