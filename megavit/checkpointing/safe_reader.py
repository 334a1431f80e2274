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
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megavit.errors import UserError

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint whose metadata names something outside the allowlist."""


class CheckpointReadError(UserError, RuntimeError):
    """A checkpoint data file that cannot be read (the message names the file and why)."""


class CorruptCheckpointError(CheckpointReadError):
    """A checkpoint data file whose bytes do not decode (the message names the file)."""


def _does_not_decode(error: Exception) -> bool:
    """What torch.load raises for bytes that are not a saved tensor."""
    if isinstance(error, (pickle.UnpicklingError, EOFError, UnicodeDecodeError,
                          zipfile.BadZipFile)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("PytorchStreamReader" in text
                                                 or "zip archive" in text)


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


def check_checkpoint(path: str | os.PathLike) -> Metadata:
    """Before anything is loaded: the metadata is safe, and every data file it refers to is
    there and long enough (a truncated or missing shard is named). Returns the metadata."""
    metadata = SafeFileSystemReader(os.fspath(path)).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = os.fspath(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = Path(os.fspath(path)) / name
        if not file.is_file():
            raise UnsafeCheckpointError(f"{file}: missing (the checkpoint is incomplete)")
        if file.stat().st_size < size:
            raise UnsafeCheckpointError(f"{file}: truncated ({file.stat().st_size:,} bytes, the "
                                        f"metadata needs {size:,}); not loaded")
    return metadata


def failure_causes(error: Exception) -> str:
    """One line per distinct cause of a DCP CheckpointException (its per-rank failures)."""
    causes = set()
    for failure in getattr(error, "failures", {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        causes.add(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}")
    return "; ".join(sorted(causes)) or str(error)


class SafeFileSystemReader(FileSystemReader):
    """A `FileSystemReader` whose metadata is read through the allowlist above, and whose
    data files, when their bytes do not decode, are named as corrupt."""

    def read_data(self, plan, planner):
        opened: list[str] = []
        create_stream = self.fs.create_stream

        def tracked(path, mode):
            opened.append(os.fspath(path))
            return create_stream(path, mode)

        self.fs.create_stream = tracked
        try:
            return super().read_data(plan, planner)
        except Exception as e:  # noqa: BLE001 — sorted below; anything else goes on as is
            where = opened[-1] if opened else os.fspath(self.path)
            detail = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
            if _does_not_decode(e):
                raise CorruptCheckpointError(
                    f"{where}: corrupt ({type(e).__name__}: {detail}); its bytes do not "
                    "decode, so this checkpoint cannot be loaded: load an earlier one") from e
            if isinstance(e, OSError):    # permissions, a failing file system: not the bytes
                raise CheckpointReadError(f"{where}: cannot be read ({type(e).__name__}: "
                                          f"{detail})") from e
            raise
        finally:
            self.fs.create_stream = create_stream

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
