"""The save directory (megavit/checkpointing/directory.py): atomic commits, the pointer
written last, pruning, and a save killed at random moments never leaving the pointer on an
incomplete checkpoint."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from megavit.checkpointing.directory import (TRACKER, CheckpointDirectory,
                                             CheckpointDirectoryError, checkpoint_name)

FILES, SIZE = 3, 1 << 20


def save(directory: CheckpointDirectory, iteration: int) -> None:
    staged = directory.staging(iteration)
    for k in range(FILES):
        (staged / f"shard_{k}.bin").write_bytes(bytes([iteration % 256]) * SIZE)
    directory.commit(iteration)


def assert_complete(path: Path) -> None:
    iteration = int(path.name.split("_")[1])
    for k in range(FILES):
        data = (path / f"shard_{k}.bin").read_bytes()
        assert data == bytes([iteration % 256]) * SIZE, f"{path}/shard_{k}.bin incomplete"


def test_commit_moves_the_pointer_and_prune_keeps_the_newest(tmp_path):
    d = CheckpointDirectory(tmp_path / "ckpt")
    assert d.latest() is None and d.complete() == []
    for it in (100, 200, 300):
        save(d, it)
        assert d.latest() == tmp_path / "ckpt" / checkpoint_name(it)
    d.staging(400)                                   # a save that crashed
    removed = d.prune(keep=2)
    assert {p.name for p in removed} == {"iter_0000100", ".staging-iter_0000400"}
    assert [it for it, _ in d.complete()] == [200, 300]
    assert (tmp_path / "ckpt" / TRACKER).read_text() == "300\n"
    save(d, 300)                                     # saved again at the same iteration
    assert_complete(d.latest())
    assert not list((tmp_path / "ckpt").glob(".*"))  # no staging or temporary files left


def test_bad_pointer_and_paths_are_clear_errors(tmp_path):
    d = CheckpointDirectory(tmp_path)
    (tmp_path / TRACKER).write_text("banana\n")
    with pytest.raises(CheckpointDirectoryError, match="expected an iteration number"):
        d.latest()
    (tmp_path / TRACKER).write_text("700\n")
    with pytest.raises(CheckpointDirectoryError, match="names iteration 700, but .* is missing"):
        d.latest()
    with pytest.raises(CheckpointDirectoryError, match="nothing staged for iteration 5"):
        d.commit(5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointDirectoryError, match="is not a directory"):
        CheckpointDirectory(tmp_path / "file")
    with pytest.raises(ValueError, match="--keep-last-checkpoints"):
        d.prune(0)


def _saver(root: Path, ready: int) -> None:
    """Save iteration after iteration into `root` (pruning to 2), from the newest complete
    one on; writes b"ready" to the fd `ready` first. Never returns."""
    d = CheckpointDirectory(root)
    latest = d.latest()
    it = int(latest.name.split("_")[1]) if latest else 0
    os.write(ready, b"ready")
    while True:
        it += 1
        save(d, it)
        d.prune(keep=2)


def test_killed_saves_leave_the_pointer_on_a_complete_checkpoint(tmp_path):
    """12 saver processes in a row on one directory (forked from this one), each killed
    (SIGKILL) at a random moment; after each, the pointer names a complete checkpoint, and
    saving resumes."""
    rng = random.Random(0)
    root = tmp_path / "ckpt"
    seen = []
    for _ in range(12):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:                       # the saver: runs until it is killed
            try:
                os.close(read_end)
                _saver(root, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        assert os.read(read_end, 5) == b"ready"
        os.close(read_end)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        latest = CheckpointDirectory(root).latest()
        if latest is not None:
            assert_complete(latest)
            seen.append(int(latest.name.split("_")[1]))
    assert seen == sorted(seen) and len(set(seen)) >= 4, seen   # progress across kills
