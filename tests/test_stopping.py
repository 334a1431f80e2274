"""Stopping early loses nothing: SIGTERM during a step or during a save, and a wall-clock
budget, each end a 2-rank run (real gloo processes, real signals) after a consistent step
with a checkpoint; resumed, the run ends with the same checkpoint, bit for bit, as a run
nobody stopped. Under torchrun, SIGTERM to torchrun itself reaches the workers, which save
and exit with 143 and one line saying where the checkpoint is.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import megavit.checkpointing.checkpointer as checkpointer
from megavit.checkpointing.offline import read_tensors
from megavit.checkpointing.safe_reader import check_checkpoint
from megavit.errors import StoppedBySignal
from megavit.parallel.state import ParallelState
from megavit.tasks.classification import ClassificationTask
from megavit.training.loop import pretrain
from tests.harness import run_distributed
from tests.scenarios import debug_config

ROOT = Path(__file__).resolve().parents[1]
ITERS = 6


def _config(save: Path, **checkpoint):
    cfg = debug_config(train_iters=ITERS)
    cfg.logging = dataclasses.replace(cfg.logging, progress_bar="off", peak_tflops=1.0,
                                      log_interval=1, eval_iters=2)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, save=str(save), load=str(save),
                                         **checkpoint)
    return cfg


class SignalledTask(ClassificationTask):
    """Rank `rank` sends itself SIGTERM inside the forward/backward of iteration `at`."""

    def __init__(self, cfg, rank: int, at: int) -> None:
        super().__init__(cfg)
        self.signal_rank, self.at, self.calls = rank, at, 0

    def forward_backward(self, run, batch, loss_scale, measure):
        self.calls += 1
        if run.pstate.rank == self.signal_rank and self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward_backward(run, batch, loss_scale, measure)


def stopped_in_a_step(pstate: ParallelState, save: str) -> dict:
    """SIGTERM on rank 1 only, in iteration 3's step: both ranks stop after iteration 3."""
    try:
        pretrain(SignalledTask(_config(Path(save)), rank=1, at=3), pstate)
    except StoppedBySignal as e:
        return {"status": e.exit_status, "message": str(e)}
    return {"status": 0, "message": "not stopped"}


def stopped_in_a_save(pstate: ParallelState, save: str) -> dict:
    """SIGTERM on rank 0 while the iteration-2 checkpoint is being written."""
    write = checkpointer.save_training_state

    def signalled(run, path, iteration):
        if pstate.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return write(run, path, iteration)

    checkpointer.save_training_state = signalled
    try:
        pretrain(ClassificationTask(_config(Path(save), save_interval=2)), pstate)
    except StoppedBySignal as e:
        return {"status": e.exit_status, "message": str(e)}
    finally:
        checkpointer.save_training_state = write
    return {"status": 0, "message": "not stopped"}


def out_of_time(pstate: ParallelState, save: str) -> dict:
    """--exit-duration-in-mins smaller than a step: stops after iteration 1, exit 0."""
    return pretrain(ClassificationTask(_config(Path(save), exit_duration_in_mins=1e-6)),
                    pstate)


def finish(pstate: ParallelState, save: str) -> dict:
    """Train to --train-iters, resuming from what `save` holds."""
    return pretrain(ClassificationTask(_config(Path(save))), pstate)


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopping")
    dirs = {name: str(root / name) for name in ("step", "save", "time", "plain")}
    first = run_distributed(2, 1, {
        "step": (stopped_in_a_step, (dirs["step"],)),
        "save": (stopped_in_a_save, (dirs["save"],)),
        "time": (out_of_time, (dirs["time"],)),
        "plain": (finish, (dirs["plain"],))})
    stopped_at = {name: sorted(p.name for p in Path(d).glob("iter_*"))
                  for name, d in dirs.items()}
    second = run_distributed(2, 1, {name: (finish, (dirs[name],))
                                    for name in ("step", "save", "time")})
    return dirs, first, stopped_at, second


def _final_state(save: str) -> dict[str, torch.Tensor]:
    checkpoint = Path(save) / f"iter_{ITERS:07d}"
    metadata = check_checkpoint(checkpoint)
    return read_tensors(checkpoint, metadata, list(metadata.state_dict_metadata))


def test_sigterm_on_one_rank_stops_every_rank_after_that_step(stopped_runs):
    dirs, first, stopped_at, _ = stopped_runs
    for result in first["step"]:
        assert result["status"] == 143, result
        assert result["message"].startswith("stopped | SIGTERM after iteration 3 | checkpoint ")
    assert stopped_at["step"] == ["iter_0000003"]


def test_sigterm_during_a_save_finishes_that_save_and_stops(stopped_runs):
    dirs, first, stopped_at, _ = stopped_runs
    for result in first["save"]:
        assert result["status"] == 143
        assert "SIGTERM after iteration 2 | checkpoint" in result["message"]
    assert stopped_at["save"] == ["iter_0000002"]
    assert not list(Path(dirs["save"]).glob(".staging-*"))


def test_the_wall_clock_budget_stops_after_a_step_and_exits_normally(stopped_runs):
    dirs, first, stopped_at, _ = stopped_runs
    assert [r["iteration"] for r in first["time"]] == [1, 1]
    assert stopped_at["time"] == ["iter_0000001"]


@pytest.mark.parametrize("name", ["step", "save", "time"])
def test_resumed_runs_end_bit_identical_to_an_unstopped_run(stopped_runs, name):
    dirs, first, _, second = stopped_runs
    assert [r["iteration"] for r in second[name]] == [ITERS, ITERS]
    expected, got = _final_state(dirs["plain"]), _final_state(dirs[name])
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert second[name][0]["eval_loss"] == first["plain"][0]["eval_loss"]


def test_sigterm_to_torchrun_saves_and_exits_143_without_a_traceback(tmp_path):
    save = tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--shutdown-timeout", "60", "-m", "megavit.pretrain", "--preset", "vit-debug",
         "--dataset", "digits", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--train-iters", "100000", "--log-interval", "1", "--progress-bar", "off",
         "--save", str(save)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if "iteration 2/100000" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()
    proc.wait(timeout=120)
    stop = [line for line in out.splitlines() if "stopped | SIGTERM after iteration" in line]
    assert len(stop) == 1, out
    iteration = int(stop[0].split("after iteration ")[1].split(" ")[0])
    assert (save / f"iter_{iteration:07d}").is_dir()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iteration)
    assert 'megavit/' not in "".join(l for l in out.splitlines(True) if 'File "' in l), out
