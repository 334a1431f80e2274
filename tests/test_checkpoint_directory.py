"""The save directory (megavit/checkpointing/directory.py): atomic commits, the pointer
written last, pruning, and a save killed at random moments never leaving the pointer on an
incomplete checkpoint."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megavit.checkpointing.directory import (TRACKER, CheckpointDirectory,
                                             CheckpointDirectoryError, checkpoint_name)

ROOT = Path(__file__).resolve().parents[1]
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


SAVER = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_checkpoint_directory import save
from megavit.checkpointing.directory import CheckpointDirectory
d = CheckpointDirectory(sys.argv[1])
latest = d.latest()
it = int(latest.name.split("_")[1]) if latest else 0
print("ready", flush=True)
while True:
    it += 1
    save(d, it)
    d.prune(keep=2)
"""


def test_killed_saves_leave_the_pointer_on_a_complete_checkpoint(tmp_path):
    """12 saver processes in a row on one directory, each killed (SIGKILL) at a random
    moment; after each, the pointer names a complete checkpoint, and saving resumes."""
    rng = random.Random(0)
    root = tmp_path / "ckpt"
    seen = []
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = CheckpointDirectory(root).latest()
        if latest is not None:
            assert_complete(latest)
            seen.append(int(latest.name.split("_")[1]))
    assert seen == sorted(seen) and len(set(seen)) >= 4, seen   # progress across kills
