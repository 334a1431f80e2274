"""megavit's serial weights streamed into one safetensors file, tensor by tensor: never the
whole model in memory.

`write_safetensors` writes a list of `OutputTensor`s (a tensor, its shape, the serial
parameters it is made from and how) after a header computed up front, reading the stored
pieces batch by batch (at most `buffer_bytes` of output at once); export (`export_hf.py`)
streams through it. `consolidate` (`tools/checkpoint_convert.py --to-safetensors`) writes
the model's weights under the serial model's parameter names (fused pieces joined back
into their parameters), in a chosen dtype, with the model config in the header — the
input of export to other libraries.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.metadata import Metadata

from megavit.checkpointing.checkpointer import CONFIG_FILE
from megavit.checkpointing.offline import (ConvertError, Progress, batched, read_config,
                                           read_tensors)
from megavit.checkpointing.pieces import pieces_of, serial_meta_model
from megavit.checkpointing.safe_reader import check_checkpoint

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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
            for batch in batched([e.name for e in entries], sizes, buffer_bytes):
                needed = list(dict.fromkeys(src for n in batch for src in by_name[n].sources))
                tensors = read_tensors(source, metadata, [p for n in needed for p in table[n][1]])
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
            for k in ("model", "text", "contrastive", "preprocessing") if k in info}}, report)
    report(f"consolidated checkpoint | iteration {info['iteration']} | path {output} | "
           f"tensors {len(entries)} | MiB {output.stat().st_size / 2**20:.1f}")
    return output
