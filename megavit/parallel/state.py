"""`ParallelState`: the process-group layout of one run, built once and passed explicitly.

The world is a 3-D mesh with dims (pp, dp, tp), tp innermost so the ranks of one
tensor-parallel group are neighbours (the same node under torchrun's numbering):

    global rank = (pp_rank * dp_size + dp_rank) * tp_size + tp_rank

Groups are built with `torch.distributed.device_mesh.init_device_mesh`; the pp group links
the stages that hold consecutive parts of the model for one (dp, tp) position.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megavit.parallel.comm import CommStats, Group
from megavit.parallel.launcher import LaunchInfo, init_process_group


@dataclass
class ParallelState:
    """This process's place in the (pp, dp, tp) mesh and its named groups."""

    rank: int
    world_size: int
    tp: Group
    dp: Group
    pp: Group
    world: Group   # every rank (agreements such as "a gradient overflowed somewhere")
    device: torch.device
    stats: CommStats
    launch: LaunchInfo
    mesh: object | None = None  # the DeviceMesh, when distributed
    # Point-to-point channels of this rank's pipeline, one 2-rank communicator each:
    # "act_send" (to the next stage), "act_recv" (from the previous), "grad_send" (to the
    # previous), "grad_recv" (from the next). Empty without pipelining.
    pp_channels: dict[str, Group] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        """The one rank that prints logs and writes metrics: on the last pipeline stage
        (where the loss is), data- and tensor-parallel rank 0."""
        return self.pp.rank == self.pp.size - 1 and self.dp.rank == 0 and self.tp.rank == 0

    def describe(self) -> str:
        pp = f"pp {self.pp.size} x " if self.pp.size > 1 else ""
        return (f"world {self.world_size} = {pp}tp {self.tp.size} x dp {self.dp.size} "
                f"(launcher: {self.launch.launcher}, device: {self.device.type})")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def serial_state(device: torch.device | str = "cpu") -> ParallelState:
    """One process, no process group: every collective is the identity."""
    stats = CommStats()
    return ParallelState(
        rank=0, world_size=1, tp=Group.single("tp", stats), dp=Group.single("dp", stats),
        pp=Group.single("pp", stats), world=Group.single("world", stats),
        device=torch.device(device), stats=stats,
        launch=LaunchInfo(0, 1, 0, "single"),
    )


def build_parallel_state(tp_size: int, device: torch.device,
                         launch: LaunchInfo | None = None, pp_size: int = 1) -> ParallelState:
    """Carve the running default process group into the (pp, dp, tp) mesh."""
    if not dist.is_initialized():
        if tp_size != 1 or pp_size != 1:
            raise ValueError(f"tensor-parallel size {tp_size} x pipeline size {pp_size} needs "
                             "a process group")
        return serial_state(device)
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp_size * pp_size):
        raise ValueError(f"world size {world} is not divisible by tensor-parallel size "
                         f"{tp_size} x pipeline size {pp_size}")
    mesh = init_device_mesh(device.type, (pp_size, world // (tp_size * pp_size), tp_size),
                            mesh_dim_names=("pp", "dp", "tp"))
    stats = CommStats()

    def group(name: str) -> Group:
        sub = mesh[name]
        pg = sub.get_group()
        ranks = tuple(dist.get_process_group_ranks(pg))
        return Group(name=name, ranks=ranks, rank=sub.get_local_rank(),
                     pg=pg if len(ranks) > 1 else None, stats=stats)

    launch = launch or LaunchInfo(rank, world, 0, "external")
    pp = group("pp")
    everyone = Group(name="world", ranks=tuple(range(world)), rank=rank,
                     pg=dist.group.WORLD if world > 1 else None, stats=stats)
    return ParallelState(rank=rank, world_size=world, tp=group("tp"), dp=group("dp"),
                         pp=pp, world=everyone, device=device, stats=stats, launch=launch,
                         mesh=mesh, pp_channels=_pipeline_channels(mesh, pp, stats))


def _pipeline_channels(mesh, pp: Group, stats: CommStats) -> dict[str, Group]:
    """One communicator per directed channel between neighbouring stages (activations
    k -> k+1, gradients k -> k-1, around the ring), for every pipeline of the mesh.

    With NCCL a send blocks its communicator's stream until the peer receives it; with one
    communicator per direction and pair, a channel's stream holds only its sends on one
    side and the matching receives, in the same order, on the other, so only the
    schedule's own (acyclic) data dependencies can make a stage wait — see
    tests/nccl_model.py. Every rank creates every channel, in the same order."""
    P = pp.size
    if P == 1:
        return {}
    columns = mesh.mesh.reshape(P, -1).T.tolist()   # each: global ranks of stages 0..P-1
    mine = {}
    for column in columns:
        for k in range(P):
            for kind, peer in (("act", (k + 1) % P), ("grad", (k - 1) % P)):
                ranks = [column[k], column[peer]]            # sender, receiver
                pg = dist.new_group(sorted(ranks))
                if dist.get_rank() in ranks:
                    me = ranks.index(dist.get_rank())
                    channel = Group(name="pp", ranks=tuple(ranks), rank=me, pg=pg, stats=stats)
                    mine[f"{kind}_{'send' if me == 0 else 'recv'}"] = channel
    return mine


def init_parallel_state(tp_size: int, backend: str = "auto", device: str = "auto",
                        timeout_minutes: float = 10.0, pp_size: int = 1) -> ParallelState:
    """Start the process group from the launcher's environment (torchrun, mpirun, srun, or
    none) and build the mesh. Backend 'auto' is nccl on GPU, gloo on CPU."""
    from megavit.parallel.launcher import detect_launch

    info = detect_launch()
    dev = resolve_device(device, info.local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    info = init_process_group(backend, timedelta(minutes=timeout_minutes))
    return build_parallel_state(tp_size, dev, info, pp_size)


def destroy_parallel_state(pstate: ParallelState | None = None, barrier: bool = True) -> None:
    """Tear down every process group while Python is fully alive.

    Drops this state's references to its groups and mesh first: a gloo group destroyed
    only at interpreter exit can have a worker thread release a tensor after Python has
    begun finalising, which aborts the process (seen under mpirun). `barrier=False` on an
    error path, where the other ranks may never reach a barrier."""
    if pstate is not None:
        for group in (pstate.tp, pstate.dp, pstate.pp, pstate.world,
                      *pstate.pp_channels.values()):
            group.pg = None
        pstate.mesh = None
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()
