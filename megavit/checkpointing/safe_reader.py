"""Reading DCP checkpoints without running code from them.

torch's `FileSystemReader` reads a checkpoint's `.metadata` with plain `pickle.load`, so a
crafted file runs whatever it names. `SafeFileSystemReader` unpickles it with an allowlist:
DCP's metadata classes, `torch.Size`, dtypes and layouts, `pathlib` paths — anything else is
refused with `UnsafeCheckpointError` before it is called. Tensor data itself DCP reads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint whose metadata names something outside the allowlist."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                               torch.dtype)):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refuses to load {module}.{name}: DCP metadata never names it, so "
            "this file was made to run code; not loaded")


class SafeFileSystemReader(FileSystemReader):
    """A `FileSystemReader` whose metadata is read through the allowlist above."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(os.fspath(self.path)) / ".metadata"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (not a complete checkpoint)")
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, path).load()
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 — truncated or not a pickle at all
                raise UnsafeCheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from e
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP "
                                        "metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
