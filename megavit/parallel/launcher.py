"""Read rank, world size and local rank from whichever launcher started this process, and
start the default process group.

Supported launchers, in the order they are recognised:

- torchrun (or torch.distributed.run): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
- mpirun / mpiexec (Open MPI: OMPI_COMM_WORLD_*; MPICH / Intel MPI: PMI_RANK, PMI_SIZE,
  MPI_LOCALRANKID) and Slurm's srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID;
  the batch script itself is one process). These set no MASTER_ADDR: rank 0 starts the TCP
  store on a free port and shares its address and port with the others through mpi4py
  (under srun this needs an MPI with PMI/PMIx support, e.g. `srun --mpi=pmix`).
  MASTER_ADDR, when set, overrides the address.
- nothing: a single process; no process group is started.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch.distributed as dist

from megavit.errors import UserError


class LaunchError(UserError, RuntimeError):
    """The launcher's environment cannot start a process group; the message says why."""


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "mpi", "slurm" or "single"
    local_world_size: int = 1  # processes on this node


# (rank, world size, local rank, local world size) variables of each MPI flavour
_MPI_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise LaunchError(f"environment variable {key} is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {key}={value!r} is not an integer") from None


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Which launcher started us, and our rank, world size and local rank."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                          _int(env, "LOCAL_RANK", 0), "torchrun",
                          _int(env, "LOCAL_WORLD_SIZE", 1))
    for rank_key, size_key, local_key, local_size_key in _MPI_VARS:
        if rank_key in env and size_key in env:
            return LaunchInfo(_int(env, rank_key), _int(env, size_key),
                              _int(env, local_key, 0), "mpi", _int(env, local_size_key, 1))
    # Only a job *step* (srun) counts: an sbatch script itself also sees SLURM_PROCID and
    # the allocation's SLURM_NTASKS, but runs as one process.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return LaunchInfo(_int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"),
                          _int(env, "SLURM_LOCALID", 0), "slurm",
                          _slurm_local_tasks(env))
    return LaunchInfo(0, 1, 0, "single")


def _slurm_local_tasks(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE is like '4(x2),3'."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    try:
        return max(int(part.split("(")[0]) for part in spec.split(","))
    except ValueError:
        return 1


def _rank0_address(env: Mapping[str, str]) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    host = socket.gethostname()
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def _torchrun_store(info: LaunchInfo, timeout: timedelta,
                    env: Mapping[str, str]) -> dist.Store:
    """The store torchrun's workers meet in, under a prefix per restart.

    torchrun's agent hosts the store (static rendezvous, the default) and keeps it across
    `--max-restarts`: keys written by the killed attempt's processes — gloo's listening
    addresses, NCCL's unique ids, for the default group and every subgroup — would be read
    by the restarted ones, which then connect to dead ports. Each attempt
    (TORCHELASTIC_RESTART_COUNT) gets its own key space instead."""
    host, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500))
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(host, port, info.world_size, is_master=False, timeout=timeout)
    else:
        store = dist.TCPStore(host, port, info.world_size, is_master=info.rank == 0,
                              timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"megavit/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                            store)


def _mpi_store(info: LaunchInfo, timeout: timedelta, env: Mapping[str, str]) -> dist.TCPStore:
    """A TCPStore whose server runs on rank 0, its address and port shared over MPI."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(
            f"started by {info.launcher} without torchrun: mpi4py is needed to share rank "
            f"0's address (pip install mpi4py), or launch with torchrun ({e})"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        raise LaunchError(
            f"the {info.launcher} environment says rank {info.rank} of {info.world_size}, but "
            f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}; is mpi4py built against "
            "the MPI that launched this job?"
        )
    hosts = comm.allgather(socket.gethostname())
    store = None
    if info.rank == 0:
        addr = _rank0_address(env)
        if addr.startswith("127.") and len(set(hosts)) > 1:
            comm.bcast(None, root=0)
            raise LaunchError(
                f"rank 0's host name resolves to {addr}, which other nodes cannot reach; "
                "export MASTER_ADDR=<rank 0's routable address>"
            )
        store = dist.TCPStore("0.0.0.0", int(env.get("MASTER_PORT", 0)), info.world_size,
                              is_master=True, timeout=timeout, wait_for_workers=False)
        comm.bcast((addr, store.port), root=0)
    else:
        where = comm.bcast(None, root=0)
        if where is None:
            raise LaunchError("rank 0 could not start the rendezvous (see its error)")
        store = dist.TCPStore(where[0], where[1], info.world_size, is_master=False,
                              timeout=timeout)
    return store


def init_process_group(backend: str, timeout: timedelta,
                       env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Start the default process group from the launcher's environment (no-op for a
    single process or when one is already running). Returns the launch info."""
    env = os.environ if env is None else env
    info = detect_launch(env)
    if dist.is_initialized():
        return LaunchInfo(dist.get_rank(), dist.get_world_size(), info.local_rank,
                          info.launcher, info.local_world_size)
    if info.world_size == 1:
        return info
    store = _torchrun_store(info, timeout, env) if info.launcher == "torchrun" \
        else _mpi_store(info, timeout, env)
    dist.init_process_group(backend, store=store, rank=info.rank,
                            world_size=info.world_size, timeout=timeout)
    return info
