"""A dead or hung peer becomes an error that names the group, not a hang.

Two real gloo processes train; at iteration 1 rank 1 either dies (SIGKILL, as when a node
is lost) or hangs. Rank 0 must stop with a `CollectiveError` naming the operation, the
group and its global ranks: at once when the peer died (the connection resets), and after
the collective timeout (here 5 s) when it hung. The harness in tests/harness.py stops at
the first failing rank, so these tests run their own two processes.

Under `torchrun --max-restarts 1` with `--load` = `--save`, a worker killed mid-run is
restarted with its peer, the run resumes from the latest complete checkpoint and finishes
with the same final checkpoint, bit for bit, as a run nobody killed (the same training loop
and flags in two gloo processes of tests/harness.py).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megavit.parallel.comm import CollectiveError
from megavit.parallel.launcher import LaunchInfo, _torchrun_store
from megavit.parallel.state import build_parallel_state
from megavit.tasks.classification import classification_run
from tests.scenarios import debug_config
from tests.test_checkpoint_cli import COMMON, ROOT
from tests.test_checkpoint_convert import stored

TIMEOUT_S = 5


def _worker(rank: int, store: str, failure: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    pstate = build_parallel_state(1, torch.device("cpu"))
    run = classification_run(debug_config(train_iters=3), pstate)
    start = time.monotonic()
    try:
        for it, micro in enumerate(run.batches(0, 3)):
            def fail(model, it=it):
                if it == 1 and rank == 1:
                    if failure == "dies":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(4 * TIMEOUT_S)     # hangs
            run.step(it, micro, on_gradients=fail)
        results.put((rank, "finished", time.monotonic() - start))
    except CollectiveError as e:
        results.put((rank, str(e), time.monotonic() - start))


@pytest.mark.parametrize("failure,within", [("dies", TIMEOUT_S), ("hangs", 3 * TIMEOUT_S)])
def test_surviving_rank_stops_with_the_group_named(failure, within):
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, os.path.join(tmp, "store"), failure,
                                                   results)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            rank, message, seconds = results.get(timeout=60)
        finally:
            for p in procs:
                p.kill()
                p.join()
    assert rank == 0
    assert "on the dp group (global ranks [0, 1]) failed on rank 0" in message, message
    assert "--distributed-timeout-minutes" in message
    assert seconds < within, f"rank 0 needed {seconds:.1f} s"


def test_each_torchrun_attempt_meets_in_its_own_key_space():
    """torchrun's agent keeps its store across restarts; keys of a killed attempt (gloo
    addresses, NCCL ids) must not be read by the next one."""
    master = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    info = LaunchInfo(0, 1, 0, "torchrun")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    first = _torchrun_store(info, datetime.timedelta(seconds=5),
                            {**env, "TORCHELASTIC_RESTART_COUNT": "0"})
    first.set("rank0_address", "stale")
    second = _torchrun_store(info, datetime.timedelta(seconds=5),
                             {**env, "TORCHELASTIC_RESTART_COUNT": "1"})
    assert not second.check(["rank0_address"])
    assert first.check(["rank0_address"])


ITERS = 100      # saves at 25, 50, 75, 100; the kill lands soon after 25
KILL_AFTER = 25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _flags(save: Path) -> list[str]:
    """DP=2 (two processes) for ITERS iterations, saving every 25 and resuming from the latest."""
    return [*COMMON, "--train-iters", str(ITERS), "--lr-decay-iters", str(ITERS),
            "--log-interval", "25", "--save", str(save), "--save-interval", "25",
            "--keep-last-checkpoints", "2", "--load", str(save)]


def _kill_a_worker(proc: subprocess.Popen, save: Path, problems: list[str]) -> None:
    """SIGKILL one of torchrun's two workers once the checkpoint of iteration KILL_AFTER
    exists (what went wrong goes to `problems`)."""
    deadline = time.monotonic() + 120
    while not (save / f"iter_{KILL_AFTER:07d}").is_dir():
        if proc.poll() is not None or time.monotonic() > deadline:
            problems.append(f"no checkpoint of iteration {KILL_AFTER} while the run went on")
            return
        time.sleep(0.02)
    workers = _children(proc.pid)
    if len(workers) != 2:
        problems.append(f"torchrun's workers: {workers}")
        return
    os.kill(workers[-1], signal.SIGKILL)


def test_torchrun_restarts_a_killed_rank_and_finishes_like_an_uninterrupted_run(tmp_path):
    """The killed run (torchrun, one restart allowed; a thread kills a worker after the
    first checkpoint) and the uninterrupted reference (the same flags through the same
    training loop in two gloo processes) run at the same time."""
    import threading

    from tests.harness import run_distributed, training_loop

    save = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "--max-restarts", "1", "-m", "megavit.pretrain",
           *_flags(save)]
    problems: list[str] = []
    with open(tmp_path / "killed.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**env, "OMP_NUM_THREADS": "1"})
        killer = threading.Thread(target=_kill_a_worker, args=(proc, save, problems))
        killer.start()
        try:
            straight = run_distributed(2, 1, {"straight": (training_loop, (_flags(
                tmp_path / "straight"),))})["straight"][0]
        finally:
            killer.join()
            returncode = proc.wait(timeout=120)
        log.seek(0)
        killed = log.read()
    assert not problems, problems + [killed]
    assert returncode == 0, killed
    assert "loaded checkpoint" not in straight
    assert "no checkpoint in" in killed                     # the first attempt
    resumed = [line for line in killed.splitlines() if "loaded checkpoint | iteration" in line]
    assert len(resumed) == 1, killed                        # the restarted attempt
    assert int(resumed[0].split("iteration ")[1].split()[0]) < ITERS
    final = f"iter_{ITERS:07d}"
    a, b = stored(tmp_path / "straight" / final), stored(save / final)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    done = [next(line for line in log.splitlines() if "] done | iteration" in line)
            for log in (straight, killed)]
    assert done[0].split("| train_seconds")[0] == done[1].split("| train_seconds")[0]
    assert done[0].split("| loss")[1].split("| images_per_second")[0] == \
        done[1].split("| loss")[1].split("| images_per_second")[0]
