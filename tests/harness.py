"""Run a function in N real torch.distributed (gloo) processes and collect the results.

Workers are forked (cheap after `import torch`), each with one intra-op thread, a
FileStore rendezvous in a temporary directory, and a `ParallelState` for the asked
tensor-parallel size. `run_distributed` runs several jobs in one process group, so a
layout's group starts once for many checks:

    results = run_distributed(world_size=4, tp=2, jobs={"equiv": (fn, args), ...})
    results["equiv"][rank]   # what fn(pstate, *args) returned on that rank

`run_in_processes(jobs)` runs independent single-process computations (serial references,
precision curves) side by side in forked processes, so they use both cores too.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist

from megavit.parallel.state import build_parallel_state

Job = tuple[Callable[..., Any], tuple]


def _worker(rank: int, world_size: int, tp: int, pp: int, store_path: str,
            jobs: dict[str, Job], conn) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=120))
        pstate = build_parallel_state(tp, torch.device("cpu"), pp_size=pp)
        out = {}
        for name, (fn, args) in jobs.items():
            pstate.stats.reset()
            out[name] = fn(pstate, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        conn.send(("ok", buf.getvalue()))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 — report any failure to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_distributed(world_size: int, tp: int, jobs: dict[str, Job], timeout: float = 300.0,
                    pp: int = 1) -> dict[str, list[Any]]:
    """Run every job in `world_size` gloo processes laid out as (pp, dp, tp); returns
    {job: [result per global rank]}."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        pipes, procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(rank, world_size, tp, pp, store, jobs, child))
            p.start()
            child.close()
            pipes.append(parent)
            procs.append(p)
        results, errors = {}, []
        try:
            waiting = dict(enumerate(pipes))
            deadline = time.monotonic() + timeout
            while waiting and not errors:
                ready = wait(list(waiting.values()), timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    errors.append(f"ranks {sorted(waiting)} gave no result within {timeout:.0f} s")
                    break
                for rank in [r for r, c in waiting.items() if c in ready]:
                    try:
                        status, payload = waiting.pop(rank).recv()
                    except EOFError:
                        status, payload = "error", "the process died without a result"
                    if status == "ok":
                        try:
                            results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
                        except Exception as e:  # noqa: BLE001 — e.g. a type the loader refuses
                            errors.append(f"--- rank {rank} --- its result cannot be loaded: {e}")
                    else:
                        errors.append(f"--- rank {rank} ---\n{payload}")
        finally:
            for p in procs:  # after a failure the others may be stuck in a collective
                p.join(timeout=0 if errors else 30)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise RuntimeError("distributed workers failed:\n" + "\n".join(errors))
    return {name: [results[r][name] for r in range(world_size)] for name in jobs}


def training_loop(pstate, flags: list[str]) -> str:
    """`python -m megavit.pretrain FLAGS`'s training (megavit.training.loop.pretrain on a
    ClassificationTask) in this worker's process group: what it printed."""
    import contextlib

    from megavit.config import parse_args, validate
    from megavit.tasks.classification import ClassificationTask
    from megavit.training.loop import pretrain

    cfg = parse_args(flags)
    validate(cfg, world_size=pstate.world_size)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(ClassificationTask(cfg), pstate)
    return out.getvalue()


def _serial_worker(jobs: dict[str, Job], conn) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()
        torch.save({name: fn(*args) for name, (fn, args) in jobs.items()}, buf)
        conn.send(("ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 — report any failure to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_in_processes(jobs: dict[str, Job], processes: int = 2,
                     timeout: float = 300.0) -> dict[str, Any]:
    """Independent single-process computations side by side: {name: fn(*args)}, the jobs
    dealt in turn to `processes` forked processes (one thread each, no process group)."""
    ctx = mp.get_context("fork")
    names = list(jobs)
    shares = [{n: jobs[n] for n in names[i::processes]} for i in range(processes)]
    pipes, procs = [], []
    for share in shares:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_serial_worker, args=(share, child))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    results, errors = {}, []
    try:
        deadline = time.monotonic() + timeout
        for i, conn in enumerate(pipes):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                errors.append(f"process {i} gave no result within {timeout:.0f} s")
                continue
            try:
                status, payload = conn.recv()
            except EOFError:
                status, payload = "error", "the process died without a result"
            if status == "ok":
                results.update(torch.load(io.BytesIO(payload), weights_only=True))
            else:
                errors.append(f"--- process {i} ---\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=0 if errors else 30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("worker processes failed:\n" + "\n".join(errors))
    return {name: results[name] for name in jobs}
