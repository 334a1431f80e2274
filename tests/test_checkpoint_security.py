"""Nothing from a checkpoint runs code: DCP metadata goes through an allowlist
(megavit/checkpointing/safe_reader.py), tensors through torch.load(weights_only=True)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from megavit.checkpointing.model_state import load_model, save_model
from megavit.checkpointing.safe_reader import UnsafeCheckpointError
from megavit.parallel.state import serial_state
from megavit.tasks.classification import classification_run
from tests.scenarios import debug_config


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model():
    return classification_run(debug_config(), serial_state()).model


def test_a_malicious_metadata_pickle_is_refused_and_never_runs(tmp_path):
    path = tmp_path / "ckpt"
    save_model(_model(), serial_state(), path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Exploit(str(marker))))
    with pytest.raises(UnsafeCheckpointError,
                       match="refuses to load (posix|os).system: .* not loaded"):
        load_model(_model(), serial_state(), path)
    assert not marker.exists()


def test_truncated_metadata_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt"
    save_model(_model(), serial_state(), path)
    data = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsafeCheckpointError, match="unreadable checkpoint metadata"):
        load_model(_model(), serial_state(), path)


def test_a_valid_checkpoint_still_loads_through_the_allowlist(tmp_path):
    path = tmp_path / "ckpt"
    save_model(_model(), serial_state(), path)
    load_model(_model(), serial_state(), path)


def test_truncated_or_missing_shard_is_named_before_anything_loads(tmp_path):
    path = tmp_path / "ckpt"
    save_model(_model(), serial_state(), path)
    shard = next(path.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsafeCheckpointError, match=f"{shard.name}: truncated .* not loaded"):
        load_model(model, serial_state(), path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    shard.unlink()
    with pytest.raises(UnsafeCheckpointError, match=f"{shard.name}: missing"):
        load_model(model, serial_state(), path)
