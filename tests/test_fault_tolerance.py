"""A dead or hung peer becomes an error that names the group, not a hang.

Two real gloo processes train; at iteration 1 rank 1 either dies (SIGKILL, as when a node
is lost) or hangs. Rank 0 must stop with a `CollectiveError` naming the operation, the
group and its global ranks: at once when the peer died (the connection resets), and after
the collective timeout (here 5 s) when it hung. The harness in tests/harness.py stops at
the first failing rank, so these tests run their own two processes.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from megavit.parallel.comm import CollectiveError
from megavit.parallel.state import build_parallel_state
from megavit.training.trainer import TrainingRun
from tests.scenarios import debug_config

TIMEOUT_S = 5


def _worker(rank: int, store: str, failure: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    pstate = build_parallel_state(1, torch.device("cpu"))
    run = TrainingRun.build(debug_config(train_iters=3), pstate)
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
