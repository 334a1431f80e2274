"""Read the tensors of a model directory's safetensors file(s) one at a time.

A directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`
(its "weight_map": tensor name -> file), as transformers writes models above its shard size.
Tensors are read with plain file reads, not a memory map, so the process holds only the
tensors it asked for and still holds (a map would leave every page it touched resident).

The format: an 8-byte little-endian header length N, N bytes of JSON {name: {"dtype",
"shape", "data_offsets": [begin, end]}} (offsets into the data after the header), the data.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from megavit.checkpointing.offline import ConvertError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the header's tensor entries) of one safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length <= 0 or 8 + length > size:
            raise ConvertError(f"{path}: not a safetensors file (header length {length}, file "
                               f"{size} bytes)")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise ConvertError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise ConvertError(f"{path}: {name} has dtype {entry['dtype']}, which megavit "
                               "does not read")
        nbytes = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
        if end - begin != nbytes or 8 + length + end > size:
            raise ConvertError(f"{path}: {name} lies outside the file or has the wrong size "
                               "(truncated or corrupt)")
    return 8 + length, header


class SafetensorsFiles:
    """The tensors of `directory`'s model.safetensors (or its indexed shards), by name."""

    def __init__(self, directory: Path) -> None:
        if sys.byteorder != "little":
            raise ConvertError("safetensors files are little-endian; this machine is not")
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
        self.tensors: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ConvertError(f"{path}: missing")
            start, header = _header(path)
            for key, entry in header.items():
                self.tensors[key] = (path, start, entry)

    def keys(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, read from its file (a fresh CPU tensor)."""
        path, start, entry = self.tensors[name]
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        data = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(data) != len(data):
                raise ConvertError(f"{path}: {name} is cut short (truncated file)")
        return torch.frombuffer(data, dtype=dtype).reshape(shape)
