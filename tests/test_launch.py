"""Launchers: torchrun, mpirun/mpiexec and srun environments, and the real entry point
started by each, compared with the serial run.

The end-to-end runs train vit-debug on digits for 3 steps with --log-interval 1 and compare
every logged loss with the in-process serial run of the same flags (1e-5 relative).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megavit.config import parse_args
from megavit.parallel.launcher import LaunchError, detect_launch
from megavit.parallel.state import serial_state
from megavit.tasks.classification import ClassificationTask
from megavit.training.loop import pretrain

FLAGS = ["--preset", "vit-debug", "--num-channels", "1", "--dataset", "digits",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
         "--log-interval", "1", "--lr", "5e-3", "--seed", "11", "--progress-bar", "off",
         "--eval-iters", "2"]


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h"},
     (3, 8, 1, "torchrun", 1)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (2, 4, 0, "mpi", 1)),
    ({"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "3"},
     (5, 6, 1, "mpi", 3)),
    ({"SLURM_PROCID": "7", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16",
      "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, (7, 16, 3, "slurm", 8)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}, (0, 1, 0, "single", 1)),  # sbatch script
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_RANK": "1",
      "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     (1, 2, 0, "mpi", 2)),                                       # mpirun inside an allocation
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1",
      "LOCAL_WORLD_SIZE": "2"}, (1, 2, 0, "torchrun", 2)),      # torchrun inside a step
    ({}, (0, 1, 0, "single", 1)),
])
def test_detect_launch(env, expected):
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher,
            info.local_world_size) == expected


def test_malformed_launcher_variable_is_named():
    with pytest.raises(LaunchError, match="OMPI_COMM_WORLD_SIZE='two' is not an integer"):
        detect_launch({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "two"})


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines())
            if r["kind"] == "train"]


def _eval(path: Path) -> dict:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "eval"][-1]


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("serial") / "m.jsonl"
    pretrain(ClassificationTask(parse_args(FLAGS + ["--metrics-file", str(path)])), serial_state())
    assert len(_losses(path)) == 3 and _eval(path)["eval_images"] == 16   # 2 batches of 8
    return path


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI", "SLURM_", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} not found (make test installs it)"
    return found


def _check_run(cmd: list[str], metrics: Path, serial_run: Path) -> str:
    """The launched run's losses and final evaluation equal the serial run's."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _losses(metrics) == pytest.approx(_losses(serial_run), rel=1e-5)
    got, ref = _eval(metrics), _eval(serial_run)
    assert got["eval_images"] == ref["eval_images"]
    assert got["eval_accuracy"] == ref["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    return proc.stdout


def test_mpiexec_two_ranks_tp2_matches_serial(tmp_path, serial_run):
    metrics = tmp_path / "m.jsonl"
    out = _check_run([_tool("mpiexec"), "--oversubscribe", "-n", "2", sys.executable, "-m",
                      "megavit.pretrain", *FLAGS, "--tensor-model-parallel-size", "2",
                      "--metrics-file", str(metrics)], metrics, serial_run)
    assert "world 2 = tp 2 x dp 1 (launcher: mpi" in out


def test_torchrun_two_ranks_dp2_matches_serial(tmp_path, serial_run):
    metrics = tmp_path / "m.jsonl"
    out = _check_run([_tool("torchrun"), "--nproc-per-node", "2", "-m", "megavit.pretrain",
                      *FLAGS, "--metrics-file", str(metrics)], metrics, serial_run)
    assert "world 2 = tp 1 x dp 2 (launcher: torchrun" in out


def test_torchrun_two_pipeline_stages_match_serial(tmp_path, serial_run):
    """PP=2 (one block per stage): the loss and evaluation come from the last stage."""
    metrics = tmp_path / "m.jsonl"
    out = _check_run([_tool("torchrun"), "--nproc-per-node", "2", "-m", "megavit.pretrain",
                      *FLAGS, "--pipeline-model-parallel-size", "2", "--print-schedule",
                      "--metrics-file", str(metrics)], metrics, serial_run)
    assert "world 2 = pp 2 x tp 1 x dp 1 (launcher: torchrun" in out
    assert "pipeline: 2 stages, 1F1B, blocks per stage {0: 1, 1: 1}" in out
    assert "theory (P-1)/(v*m+P-1) = 0.200 (P=2, v=1, m=4)" in out


def test_vit22b_script_smoke_switch_runs_on_cpu(tmp_path):
    """SMOKE=1 examples/pretrain_vit22b.sh: the same torchrun launch, shrunk to vit-debug
    on 4 CPU processes (TP=2 x PP=2)."""
    root = Path(__file__).resolve().parents[1]
    env = {**_clean_env(), "SMOKE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.run(["bash", str(root / "examples" / "pretrain_vit22b.sh"),
                           "--metrics-file", str(metrics), "--train-iters", "4",
                           "--log-interval", "2"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world 4 = pp 2 x tp 2 x dp 1 (launcher: torchrun" in proc.stdout
    assert "sequence parallel keep | recompute selective" in proc.stdout
    assert len(_losses(metrics)) == 2
