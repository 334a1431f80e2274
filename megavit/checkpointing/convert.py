"""Offline conversion of a megavit checkpoint, tensor by tensor: never the whole model in memory.

Two outputs (`tools/checkpoint_convert.py` is the command line):

- `reshard`: the same training state written as a TP=t run stores it. Which blocks a
  checkpoint holds depends on tensor parallelism only — pieces are named per serial
  parameter (so pipeline stages and virtual stages need no conversion), data-parallel
  replicas are stored once, and ZeRO-1 optimizer state is stored shaped like the parameters.
  Any checkpoint already *loads* at any layout; converted to the run's TP size, each rank
  reads exactly its own blocks instead of whole stored pieces that it then cuts (a TP=1
  checkpoint read at TP=8 reads every tensor 8 times). The RNG streams of the source layout
  are dropped: the resumed run starts its dropout streams afresh, as after any layout change.
- `consolidate`: the model's weights as one safetensors file under the serial model's
  parameter names (fused pieces joined back into their parameters), in a chosen dtype, with
  the model config in the header — the input of export to other libraries.

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
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)

from megavit.checkpointing.checkpointer import CONFIG_FILE
from megavit.checkpointing.directory import CheckpointDirectory
from megavit.checkpointing.model_state import CheckpointLoadError
from megavit.checkpointing.pieces import piece_blocks, pieces_of, serial_meta_model
from megavit.checkpointing.safe_reader import SafeFileSystemReader, check_checkpoint
from megavit.config import ModelConfig
from megavit.errors import UserError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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


def read_config(checkpoint: Path) -> tuple[dict, ModelConfig]:
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        raise CheckpointLoadError(f"{path}: missing; not a megavit checkpoint")
    info = json.loads(path.read_text())
    try:
        return info, ModelConfig(**info["model"])
    except TypeError as e:
        raise CheckpointLoadError(f"{path}: a model config this megavit cannot build ({e})") \
            from e


def _batches(names: list[str], sizes: dict[str, int], buffer_bytes: int) -> Iterator[list[str]]:
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


def _read(checkpoint: Path, metadata: Metadata, names: list[str]) -> dict[str, torch.Tensor]:
    """The named stored tensors, whole, from however many blocks they were saved as."""
    state = {}
    for name in names:
        md = metadata.state_dict_metadata[name]
        state[name] = torch.empty(md.size, dtype=md.properties.dtype)
    with warnings.catch_warnings():   # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(os.fspath(checkpoint)),
                 no_dist=True)
    return state


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

    directory = CheckpointDirectory(output)
    iteration = int(info["iteration"])
    if directory.path_of(iteration).exists():
        raise ConvertError(f"{directory.path_of(iteration)}: exists; choose another --output")
    staging = directory.staging(iteration)
    progress = Progress(len(names), sum(sizes.values()), report)
    write_dcp(staging, {n: StoredTensor(stored[n].size, stored[n].properties, blocks(n))
                        for n in names},
              list(_batches(names, sizes, buffer_bytes)),
              lambda batch: _read(source, metadata, batch), progress)
    for side in source.iterdir():   # files beside the tensors, e.g. a two-tower tokenizer
        if side.is_file() and side.name not in (CONFIG_FILE, ".metadata") \
                and side.suffix != ".distcp":
            shutil.copy2(side, staging / side.name)
    layout = {"tp": tp, "pp": 1, "dp": 1, "virtual_stages": 1, "distributed_optimizer": False,
              "resharded_from": info["layout"]}
    (staging / CONFIG_FILE).write_text(json.dumps({**info, "layout": layout}, indent=1,
                                                  sort_keys=True) + "\n")
    final = directory.commit(iteration)
    dropped = len(metadata.state_dict_metadata) - len(stored)
    report(f"resharded checkpoint | iteration {iteration} | tp {info['layout']['tp']} -> {tp} | "
           f"path {final} | tensors {len(names)} | rng streams dropped {dropped} | "
           f"peak buffered MiB {progress.peak_batch_bytes / 2**20:.1f}")
    return final


def _safetensors_header(entries: list[tuple[str, torch.Size, torch.dtype]],
                        metadata: dict[str, str]) -> bytes:
    """The JSON header of a safetensors file (tensors laid out in the given order),
    padded with spaces to a multiple of 8 bytes, preceded by its length."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


@dataclass
class OutputTensor:
    """One tensor made from others: `make(tensors)` builds it (shape `shape`) from the whole
    tensors named in `sources`, in that order — megavit's serial parameters when writing a
    safetensors file (consolidation, export), a library's tensors when importing."""

    name: str
    shape: tuple[int, ...]
    sources: list[str]
    make: Callable[[list[torch.Tensor]], torch.Tensor] = lambda ts: ts[0]


def serial_parameters(source: Path, info: dict, metadata: Metadata) -> dict[str, tuple]:
    """{serial parameter name: (shape, its stored pieces, the dim they join along)} of the
    model `info` describes, checked against the checkpoint's entries."""
    from megavit.parallel.sharding import get_tp_shard

    stored, out = metadata.state_dict_metadata, {}
    for name, param in serial_meta_model(info, 1).named_parameters():
        shard = get_tp_shard(param)
        pieces = [f"model/{p.name}" for p in pieces_of(name, param, shard)]
        missing = [p for p in pieces if p not in stored]
        if missing:
            raise ConvertError(f"{source}: {', '.join(missing)} missing; the checkpoint does "
                               f"not fit the model of its {CONFIG_FILE}")
        out[name] = (tuple(param.shape), pieces, shard.dim if shard is not None else 0)
    return out


def write_safetensors(source: Path, output: str | os.PathLike, entries: list[OutputTensor],
                      dtype: torch.dtype | None, buffer_bytes: int, header_metadata: dict,
                      report: Callable[[str], None] = print, label: str = "convert") -> Path:
    """Stream `entries` into one safetensors file, reading the serial parameters they need
    batch by batch (at most `buffer_bytes` of output at once, a larger tensor alone);
    `dtype` None keeps the stored one. Written to FILE.partial, synced, renamed."""
    if sys.byteorder != "little":
        raise ConvertError("safetensors files are little-endian; this machine is not")
    info, _ = read_config(source)
    metadata = check_checkpoint(source)
    stored = metadata.state_dict_metadata
    table = serial_parameters(source, info, metadata)
    stored_dtype = {n: stored[pieces[0]].properties.dtype for n, (_, pieces, _) in table.items()}
    out_dtype = {e.name: dtype or stored_dtype[e.sources[0]] for e in entries}
    if any(d not in SAFETENSORS_DTYPES for d in out_dtype.values()):
        raise ConvertError(f"{source}: stored dtypes {sorted(map(str, set(out_dtype.values())))}"
                           "; choose --dtype")
    header = _safetensors_header([(e.name, e.shape, out_dtype[e.name]) for e in entries],
                                 header_metadata)
    sizes = {e.name: math.prod(e.shape) * stored_dtype[e.sources[0]].itemsize for e in entries}
    by_name = {e.name: e for e in entries}
    progress = Progress(len(entries), sum(sizes.values()), report, label)
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(header)
            for batch in _batches([e.name for e in entries], sizes, buffer_bytes):
                needed = list(dict.fromkeys(src for n in batch for src in by_name[n].sources))
                tensors = _read(source, metadata, [p for n in needed for p in table[n][1]])
                serial = {}
                for n in needed:
                    parts = [tensors.pop(p) for p in table[n][1]]
                    serial[n] = parts[0] if len(parts) == 1 else torch.cat(parts, table[n][2])
                for name in batch:
                    e = by_name[name]
                    t = e.make([serial[src] for src in e.sources])
                    if tuple(t.shape) != tuple(e.shape):
                        raise ConvertError(f"{name}: made {list(t.shape)}, expected "
                                           f"{list(e.shape)} (a mapping bug)")
                    t = t.to(out_dtype[name]).contiguous().reshape(-1)
                    f.write(memoryview(t.view(torch.uint8).numpy()))
                progress.batch_done(len(batch), sum(sizes[n] for n in batch))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return output


def consolidate(source: Path, output: str | os.PathLike, dtype: torch.dtype | None,
                buffer_bytes: int, report: Callable[[str], None] = print) -> Path:
    """The model weights of checkpoint `source` as one safetensors file `output` under the
    serial parameter names; `dtype` None keeps the stored one. Written to a temporary file
    and renamed into place."""
    info, _ = read_config(source)
    table = serial_parameters(source, info, check_checkpoint(source))
    entries = [OutputTensor(n, shape, [n]) for n, (shape, _, _) in table.items()]
    output = write_safetensors(
        source, output, entries, dtype, buffer_bytes,
        {"format": "pt", "iteration": str(info["iteration"]),
         **{f"megavit_{k}" if k != "model" else "megavit_config": json.dumps(info[k],
                                                                              sort_keys=True)
            for k in ("model", "text", "contrastive") if k in info}}, report)
    report(f"consolidated checkpoint | iteration {info['iteration']} | path {output} | "
           f"tensors {len(entries)} | MiB {output.stat().st_size / 2**20:.1f}")
    return output
