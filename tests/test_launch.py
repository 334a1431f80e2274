"""Launchers: torchrun, mpirun/mpiexec and srun environments, and the real entry point
started by each, compared with the serial run.

The end-to-end runs train vit-debug on digits for 3 steps with --log-interval 1 and compare
every logged loss with the in-process serial run of the same flags (1e-5 relative).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megavit.config import parse_args
from megavit.parallel.launcher import LaunchError, detect_launch
from megavit.parallel.state import serial_state
from megavit.tasks.classification import ClassificationTask
from megavit.training.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The module's four launches, started together (each its own port and metrics file;
    alone, a launch leaves a core idle while its launcher or workers start):
    {name: (the finished launch, its metrics file)}."""
    base = tmp_path_factory.mktemp("launch")
    torchrun = [_tool("torchrun"), "--nproc-per-node", "2"]
    pretrain = ["-m", "megavit.pretrain", *FLAGS]
    smoke_env = {**_clean_env(), "SMOKE": "1", "MASTER_PORT": str(_free_port()),
                 "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    commands = {   # name: (command, environment)
        "mpiexec": ([_tool("mpiexec"), "--oversubscribe", "-n", "2", sys.executable, *pretrain,
                     "--tensor-model-parallel-size", "2"], _clean_env()),
        "torchrun_dp2": ([*torchrun, "--master-port", str(_free_port()), *pretrain],
                         _clean_env()),
        "torchrun_pp2": ([*torchrun, "--master-port", str(_free_port()), *pretrain,
                          "--pipeline-model-parallel-size", "2", "--print-schedule"],
                         _clean_env()),
        "vit22b_smoke": (["bash", str(ROOT / "examples" / "pretrain_vit22b.sh"),
                          "--train-iters", "4", "--log-interval", "2"], smoke_env),
    }
    procs = {}
    for name, (cmd, env) in commands.items():
        metrics = base / f"{name}.jsonl"
        out, err = open(base / f"{name}.out", "w+"), open(base / f"{name}.err", "w+")
        procs[name] = (subprocess.Popen([*cmd, "--metrics-file", str(metrics)], stdout=out,
                                        stderr=err, text=True, env=env, cwd=base), metrics,
                       out, err)
    done = {}
    deadline = time.monotonic() + 300
    for name, (proc, metrics, out, err) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.seek(0)
        err.seek(0)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out.read(),
                                                  err.read()), metrics)
        out.close()
        err.close()
    return done


def _check_run(launch: tuple[subprocess.CompletedProcess, Path], serial_run: Path) -> str:
    """The launched run's losses and final evaluation equal the serial run's."""
    proc, metrics = launch
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _losses(metrics) == pytest.approx(_losses(serial_run), rel=1e-5)
    got, ref = _eval(metrics), _eval(serial_run)
    assert got["eval_images"] == ref["eval_images"]
    assert got["eval_accuracy"] == ref["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    return proc.stdout


def test_mpiexec_two_ranks_tp2_matches_serial(launched, serial_run):
    out = _check_run(launched["mpiexec"], serial_run)
    assert "world 2 = tp 2 x dp 1 (launcher: mpi" in out


def test_torchrun_two_ranks_dp2_matches_serial(launched, serial_run):
    out = _check_run(launched["torchrun_dp2"], serial_run)
    assert "world 2 = tp 1 x dp 2 (launcher: torchrun" in out


def test_torchrun_two_pipeline_stages_match_serial(launched, serial_run):
    """PP=2 (one block per stage): the loss and evaluation come from the last stage."""
    out = _check_run(launched["torchrun_pp2"], serial_run)
    assert "world 2 = pp 2 x tp 1 x dp 1 (launcher: torchrun" in out
    assert "pipeline: 2 stages, 1F1B, blocks per stage {0: 1, 1: 1}" in out
    assert "theory (P-1)/(v*m+P-1) = 0.200 (P=2, v=1, m=4)" in out


def test_vit22b_script_smoke_switch_runs_on_cpu(launched):
    """SMOKE=1 examples/pretrain_vit22b.sh: the same torchrun launch, shrunk to vit-debug
    on 4 CPU processes (TP=2 x PP=2)."""
    proc, metrics = launched["vit22b_smoke"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world 4 = pp 2 x tp 2 x dp 1 (launcher: torchrun" in proc.stdout
    assert "sequence parallel keep | recompute selective" in proc.stdout
    assert len(_losses(metrics)) == 2
