"""Offline resharding of a megavit checkpoint, tensor by tensor: never the whole model in
memory (`tools/checkpoint_convert.py --target-tensor-parallel-size` is the command line).

`reshard` writes the same training state as a TP=t run stores it. Which blocks a
checkpoint holds depends on tensor parallelism only — pieces are named per serial
parameter (so pipeline stages and virtual stages need no conversion), data-parallel
replicas are stored once, and ZeRO-1 optimizer state is stored shaped like the parameters.
Any checkpoint already *loads* at any layout; converted to the run's TP size, each rank
reads exactly its own blocks instead of whole stored pieces that it then cuts (a TP=1
checkpoint read at TP=8 reads every tensor 8 times). The RNG streams of the source layout
are dropped: the resumed run starts its dropout streams afresh, as after any layout change.
`write_dcp` (a DCP checkpoint written batch by batch) also writes imported models
(`megavit.interop.import_hf`).

Memory: stored tensors are read in batches of at most `buffer_bytes` (a tensor larger than
that is read alone), and each batch is written before the next is read. Measured peak RSS
growth converting a 266 MB vit-s checkpoint: 18 MB with an 8 MiB buffer, 118 MB with 64 MiB
(a batch, DCP's read copies and the output blocks: about twice the buffer), 443 MB with a
buffer larger than the checkpoint (tests/test_checkpoint_convert.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)

from megavit.checkpointing.checkpointer import CONFIG_FILE
from megavit.checkpointing.directory import CheckpointDirectory
from megavit.checkpointing.offline import (ConvertError, Progress, batched, read_config,
                                           read_tensors)
from megavit.checkpointing.pieces import piece_blocks, serial_meta_model
from megavit.checkpointing.safe_reader import check_checkpoint


def _nbytes(md: TensorStorageMetadata) -> int:
    return math.prod(md.size) * md.properties.dtype.itemsize


def _piece_of(fqn: str) -> str | None:
    """The parameter piece a stored tensor is shaped like: model/<piece>,
    optimizer/<key>/<piece>; None for scalars (iteration, step, scaler) and RNG streams."""
    parts = fqn.split("/")
    if parts[0] == "model" and len(parts) > 1:
        return "/".join(parts[1:])
    if parts[0] == "optimizer" and len(parts) > 2:
        return "/".join(parts[2:])
    return None


def _block(tensor: torch.Tensor, offsets: tuple, sizes: tuple) -> torch.Tensor:
    """A copy of one block (torch.save of a view would write the whole tensor)."""
    view = tensor
    for dim, (o, s) in enumerate(zip(offsets, sizes)):
        view = view.narrow(dim, o, s)
    return view if view.numel() == tensor.numel() else view.clone()


class _BatchSource:
    """What DCP's file writer asks of a save planner while writing: each item's data."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def resolve_data(self, item: WriteItem) -> torch.Tensor:
        chunk = item.tensor_data.chunk
        return _block(self.tensors[item.index.fqn], tuple(chunk.offsets), tuple(chunk.sizes))


@dataclass
class StoredTensor:
    """A tensor of a DCP checkpoint being written: its whole size, dtype (`properties`) and
    the (offsets, sizes) of the blocks it is stored as (one per TP rank for a sharded piece,
    so each rank of that TP size reads exactly its own)."""

    size: torch.Size
    properties: TensorProperties
    blocks: list[tuple]


def write_dcp(staging: Path, stored: dict[str, StoredTensor], batches: list[list[str]],
              read: Callable[[list[str]], dict[str, torch.Tensor]], progress: Progress) -> None:
    """Write a DCP checkpoint (`.metadata` + one data file) into `staging`, batch by batch:
    `read(batch)` returns the whole tensors of one batch of names, which are cut into their
    blocks, written and dropped before the next batch is read."""
    plans, state_md = [], {}
    for batch in batches:
        items = []
        for name in batch:
            st = stored[name]
            md = state_md[name] = TensorStorageMetadata(st.properties, st.size, [])
            for offsets, block in st.blocks:
                chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(block))
                md.chunks.append(chunk)
                items.append(WriteItem(
                    index=MetadataIndex(name, torch.Size(offsets)),
                    type=WriteItemType.SHARD if len(st.blocks) > 1 else WriteItemType.TENSOR,
                    tensor_data=TensorWriteData(chunk, st.properties, st.size)))
        plans.append(SavePlan(items))
    writer = FileSystemWriter(os.fspath(staging), thread_count=1)
    writer.set_up_storage_writer(is_coordinator=True)
    plans = writer.prepare_global_plan([writer.prepare_local_plan(p) for p in plans])
    results = []
    for batch, plan in zip(batches, plans):
        tensors = read(batch)
        results.append(writer.write_data(plan, _BatchSource(tensors)).wait())
        progress.batch_done(len(batch), sum(math.prod(stored[n].size) *
                                            stored[n].properties.dtype.itemsize for n in batch))
        del tensors
    writer.finish(Metadata(state_md), results)


def reshard(source: Path, output: str | os.PathLike, tp: int, buffer_bytes: int,
            report: Callable[[str], None] = print) -> Path:
    """Write the training state of the checkpoint `source` as a TP=`tp` run stores it, as
    the iteration of the same number in the --save directory `output`; returns its path."""
    info, cfg = read_config(source)
    metadata = check_checkpoint(source)
    try:
        chunks = piece_blocks(serial_meta_model(info, tp), tp)
    except ValueError as e:
        raise ConvertError(f"--target-tensor-parallel-size {tp}: {e}") from e
    stored = {k: v for k, v in metadata.state_dict_metadata.items() if not k.startswith("rng/")}
    for name, md in stored.items():
        if not isinstance(md, TensorStorageMetadata):
            raise ConvertError(f"{source}: {name} is not a tensor; not a megavit checkpoint")
        piece = _piece_of(name)
        if piece is not None and (piece not in chunks or chunks[piece][0] != md.size):
            raise ConvertError(f"{source}: {name} {list(md.size)} does not fit the model of "
                               f"its {CONFIG_FILE}")
    names = list(stored)
    sizes = {k: _nbytes(stored[k]) for k in names}

    def blocks(name: str) -> list[tuple]:
        piece = _piece_of(name)
        if piece is None:
            return [((0,) * len(stored[name].size), tuple(stored[name].size))]
        return chunks[piece][1]

    if Path(output).exists() and not Path(output).is_dir():
        raise ConvertError(f"--output {output}: exists and is not a directory")
    directory = CheckpointDirectory(output)
    iteration = int(info["iteration"])
    if directory.path_of(iteration).exists():
        raise ConvertError(f"{directory.path_of(iteration)}: exists; choose another --output")
    created = not Path(output).exists()
    staging = directory.staging(iteration)
    progress = Progress(len(names), sum(sizes.values()), report)
    try:
        write_dcp(staging, {n: StoredTensor(stored[n].size, stored[n].properties, blocks(n))
                            for n in names},
                  list(batched(names, sizes, buffer_bytes)),
                  lambda batch: read_tensors(source, metadata, batch), progress)
        for side in source.iterdir():   # files beside the tensors, e.g. a two-tower tokenizer
            if side.is_file() and side.name not in (CONFIG_FILE, ".metadata") \
                    and side.suffix != ".distcp":
                shutil.copy2(side, staging / side.name)
        layout = {"tp": tp, "pp": 1, "dp": 1, "virtual_stages": 1,
                  "distributed_optimizer": False, "resharded_from": info["layout"]}
        (staging / CONFIG_FILE).write_text(json.dumps({**info, "layout": layout}, indent=1,
                                                      sort_keys=True) + "\n")
    except BaseException:      # a corrupt source, Ctrl-C: leave nothing half-written
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
    final = directory.commit(iteration)
    dropped = len(metadata.state_dict_metadata) - len(stored)
    report(f"resharded checkpoint | iteration {iteration} | tp {info['layout']['tp']} -> {tp} | "
           f"path {final} | tensors {len(names)} | rng streams dropped {dropped} | "
           f"peak buffered MiB {progress.peak_batch_bytes / 2**20:.1f}")
    return final
