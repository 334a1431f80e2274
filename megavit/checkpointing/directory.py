"""The save directory: complete checkpoints appear atomically, the pointer to the latest is
written last, and old ones are pruned only after a new one is complete.

    SAVE/
      iter_0000100/                        a complete checkpoint (renamed into place)
      iter_0000200/
      latest_checkpointed_iteration.txt    "200" (Megatron-LM's name), replaced atomically
      .staging-iter_0000300/               a save in progress (or one that crashed)

A save writes everything into the staging directory, syncs it, renames it to its final name
(one atomic `rename` on POSIX file systems), syncs the parent, and only then replaces the
pointer file (write to a temporary file, sync, `os.replace`, sync the parent). A crash at any
moment therefore leaves the pointer naming the previous complete checkpoint, or the new one
once it is complete; leftover staging directories are removed by the next save. Pruning
(`--keep-last-checkpoints`) runs after the pointer moved and never removes what it names.

Only the process that commits (rank 0) calls `commit`; every rank may write into `staging`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from megavit.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
_NAME = re.compile(r"iter_(\d{7,})")


class CheckpointDirectoryError(UserError, RuntimeError):
    """A save directory that cannot be used as asked; the message names the path."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Sync every file below `path`, then every directory, deepest first."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(Path(root))
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(d)


class CheckpointDirectory:
    """The checkpoints below `root` (created if missing)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointDirectoryError(f"--save {self.root}: exists and is not a directory")

    def path_of(self, iteration: int) -> Path:
        """Where the complete checkpoint of `iteration` lives."""
        return self.root / checkpoint_name(iteration)

    def staging_path(self, iteration: int) -> Path:
        """Where the checkpoint of `iteration` is written before it is committed."""
        return self.root / f".staging-{checkpoint_name(iteration)}"

    def staging(self, iteration: int) -> Path:
        """An empty directory to write the checkpoint of `iteration` into (a leftover of a
        crashed save of the same iteration is removed first)."""
        path = self.staging_path(iteration)
        if path.exists():
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True)
        except OSError as e:
            blocker = self.root
            while not blocker.exists():
                blocker = blocker.parent
            why = (f"{blocker} is a file, so the directory cannot be made"
                   if not blocker.is_dir() else f"cannot write there ({e.strerror})")
            raise CheckpointDirectoryError(f"{self.root}: {why}") from None
        return path

    def commit(self, iteration: int) -> Path:
        """Make the staged checkpoint of `iteration` the latest: sync, rename into place,
        then move the pointer. Returns the final directory."""
        staged, final = self.staging_path(iteration), self.path_of(iteration)
        if not staged.is_dir():
            raise CheckpointDirectoryError(f"{staged}: nothing staged for iteration {iteration}")
        _fsync_tree(staged)
        if final.exists():   # saved again at the same iteration: the old copy goes first
            old = self.root / f".replaced-{final.name}"
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            staged.rename(final)
            shutil.rmtree(old)
        else:
            staged.rename(final)
        _fsync_dir(self.root)
        tmp = self.root / f".{TRACKER}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / TRACKER)
        _fsync_dir(self.root)
        return final

    def latest(self) -> Path | None:
        """The checkpoint the pointer names, or None when nothing was saved yet."""
        tracker = self.root / TRACKER
        if not tracker.exists():
            return None
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointDirectoryError(f"{tracker}: expected an iteration number, found "
                                           f"{text[:40]!r}")
        path = self.path_of(int(text))
        if not path.is_dir():
            raise CheckpointDirectoryError(f"{tracker} names iteration {text}, but {path} is "
                                           "missing")
        return path

    def complete(self) -> list[tuple[int, Path]]:
        """(iteration, directory) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if p.is_dir() and (m := _NAME.fullmatch(p.name))]
        return sorted(found)

    def remove_staging(self) -> list[Path]:
        """Remove what saves that never finished left (`.staging-*`); returns it."""
        removed = sorted(self.root.glob(".staging-*")) if self.root.is_dir() else []
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def prune(self, keep: int) -> list[Path]:
        """Remove all but the newest `keep` complete checkpoints (never the latest), and
        leftovers of crashed saves; returns what was removed."""
        if keep < 1:
            raise ValueError(f"--keep-last-checkpoints must be at least 1 (got {keep})")
        latest = self.latest()
        removed = []
        for _, path in self.complete()[:-keep]:
            if path != latest:
                shutil.rmtree(path)
                removed.append(path)
        for path in self.root.glob(".staging-*"):
            shutil.rmtree(path)
            removed.append(path)
        return removed
