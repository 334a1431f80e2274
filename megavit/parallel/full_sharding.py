"""Full sharding (ZeRO-3) through PyTorch FSDP2: parameters, gradients and optimizer state
split over the data-parallel ranks, composed with megavit's tensor and pipeline parallelism.

    --data-parallel-sharding-strategy full

The composition is torchtitan's order: tensor parallelism first (each rank's parameters are
already its TP pieces, plain tensors), then `fully_shard` on every block, then on each model
chunk (the roots; a pipeline stage with virtual stages has several). Each TP-local parameter
becomes a DTensor on the DP mesh, sharded along dim 0: DP rank r holds rows
[r*c, min((r+1)*c, n)) with c = ceil(n/d) — a contiguous flat range of the TP-local tensor,
which is how the optimizer and checkpoints see it (`Segment.param_range`). A block's
parameters are all-gathered over dp just before its forward (and again before its backward
when they were freed after forward), and its gradients reduce-scattered right after its
backward, overlapped with the blocks still to run; under pipelining the parameters stay
gathered between forward and backward (`reshard_after_forward=False`: the 1F1B schedule
interleaves micro-batches, and gathering again for every backward would double the traffic).

Precision: the sharded parameters are fp32 and are the optimizer's masters; with --bf16 or
--fp16 FSDP2's `MixedPrecisionPolicy` all-gathers them cast to 16 bits and reduces the
gradients in fp32. Every micro-batch's backward reduce-scatters and accumulates into the
sharded gradient (FSDP2 averages over dp, as the ZeRO-1 buffers do).

`FullyShardedGradients` takes the place of `DataParallelBuffers` in a run: it gives the
optimizer its segments (this rank's rows of each parameter), the sharded gradients and
parameters as flat views, sums TP-partial gradients over tp after backward, and lets a
checkpoint gather a parameter-shaped tensor from the shards (`gather_shards`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import nn

from megavit.parallel.comm import CommStats, Group
from megavit.parallel.data_parallel import Segment
from megavit.parallel.partial_grad import has_partial_grad

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# The attributes megavit hangs on a parameter (TP layout, init, weight decay, partial
# gradient); fully_shard builds new Parameter objects, so they are copied over.
_ATTRIBUTES = ("tp_shard", "init", "no_weight_decay", "tp_partial_grad")


def is_fully_sharded(p: torch.Tensor) -> bool:
    """Whether FSDP2 shards parameter `p` (a DTensor on the dp mesh)."""
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor)


@dataclass
class Unit:
    """One FSDP unit (a block, or a chunk's own parameters): for the start-up lines."""

    name: str
    params: list[nn.Parameter]


def apply_full_sharding(chunks: list[nn.Module], dp_mesh: "DeviceMesh",
                        param_dtype: torch.dtype, pipelined: bool) -> list[Unit]:
    """`fully_shard` every block of each chunk, then the chunk, on `dp_mesh` (the DP
    dimension of the run's mesh). Parameters must be fp32 (the masters); `param_dtype` is
    what forward and backward compute in. Returns the units, innermost first."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = {(c, name): {a: getattr(p, a) for a in _ATTRIBUTES if hasattr(p, a)}
             for c, chunk in enumerate(chunks) for name, p in chunk.named_parameters()}
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    units = []
    for c, chunk in enumerate(chunks):
        for name, block in chunk.blocks.items():
            fully_shard(block, mesh=dp_mesh, mp_policy=policy,
                        reshard_after_forward=not pipelined)
            units.append(Unit(f"blocks.{name}", list(block.parameters())))
        inside = {id(p) for u in units for p in u.params}
        fully_shard(chunk, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
        units.append(Unit("embedding and head", [p for p in chunk.parameters()
                                                 if id(p) not in inside]))
        if param_dtype != torch.float32:   # buffers (padding masks, fixed positions) too
            for module in chunk.modules():
                for key, b in module._buffers.items():
                    if b is not None and b.is_floating_point():
                        module._buffers[key] = b.to(param_dtype)
        for name, p in chunk.named_parameters():
            p.__dict__.update(names[(c, name)])
    return units


def row_range(p: torch.Tensor) -> tuple[int, int]:
    """This DP rank's flat element range of the TP-local tensor behind the DTensor `p`
    (dim-0 shard: rows [r*c, min((r+1)*c, n)), c = ceil(n/d))."""
    from torch.distributed.tensor import Shard

    (placement,) = p.placements
    assert isinstance(placement, Shard) and placement.dim == 0, placement
    n, d = p.shape[0], p.device_mesh.size()
    r = p.device_mesh.get_local_rank()
    chunk = -(-n // d)
    row = math.prod(p.shape[1:])      # from the shape: indexing a DTensor would gather it
    lo, hi = min(r * chunk, n), min((r + 1) * chunk, n)
    return lo * row, hi * row


class FullyShardedGradients:
    """The gradient side of a fully sharded run, shaped like `DataParallelBuffers` where
    the optimizer, the step and checkpoints use it: `segments()` (this rank's rows of each
    trained parameter), `grad_view` / `param_view` (flat fp32 views of the sharded gradient
    and parameter), `start_step`, `finish`, `non_finite`, `gather_shards`, `offsets` and
    `numel` (a flat layout of the TP-local parameters, in model order, for checkpoints)."""

    shard = True
    strategy = "full"

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], units: list[Unit],
                 dp: Group, tp: Group, check_finite: bool = False) -> None:
        self.dp, self.tp, self.check_finite = dp, tp, check_finite
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.units = units
        self.buckets = units    # what the start-up lines count
        self.offsets: dict[int, int] = {}
        offset = 0
        for _, p in self.params:
            self.offsets[id(p)] = offset
            offset += p.numel()
        self.numel = offset

    # ---- the step ----------------------------------------------------------------------

    def start_step(self, num_microbatches: int) -> None:
        """Drop last step's gradients; FSDP2 accumulates each micro-batch's shard."""
        for _, p in self.params:
            p.grad = None

    def finish(self) -> None:
        """After backward (FSDP2 has waited for its reduce-scatters): give parameters that
        got no gradient a zero one, and sum the TP-partial gradients over tp."""
        for _, p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if has_partial_grad(p):
                self.tp.all_reduce(p.grad.to_local())

    def non_finite(self) -> list[str]:
        """The parameters whose (already reduced) gradient shard holds a NaN or inf."""
        if not self.check_finite or not self.params:
            return []
        finite = [torch.isfinite(p.grad.to_local()).all() for _, p in self.params]
        if bool(torch.stack(finite).all()):     # one host sync on the usual path
            return []
        return [n for (n, _), ok in zip(self.params, finite) if not bool(ok)]

    # ---- what the optimizer and checkpoints read -----------------------------------------

    def segments(self) -> list[Segment]:
        out = []
        for name, p in self.params:
            a, b = row_range(p)
            if a < b:
                start = self.offsets[id(p)]
                out.append(Segment(name, p, 0, (a, b), (start + a, start + b)))
        return out

    def grad_view(self, s: Segment) -> torch.Tensor:
        return s.param.grad.to_local().detach().reshape(-1)

    def param_view(self, s: Segment) -> torch.Tensor:
        return s.param.to_local().detach().view(-1)

    def all_gather_params(self) -> None:
        """Nothing to do: FSDP2 gathers the parameters before each forward."""

    def gather_shards(self, flat: torch.Tensor) -> None:
        """Every rank's rows of every parameter into `flat` (laid out by `offsets`): one
        all-gather per parameter on dp, of shards padded to c rows."""
        for _, p in self.params:
            start = self.offsets[id(p)]
            a, b = row_range(p)
            chunk = -(-p.shape[0] // self.dp.size) * math.prod(p.shape[1:])
            piece = torch.zeros(chunk, dtype=flat.dtype, device=flat.device)
            piece[:b - a].copy_(flat[start + a:start + b])
            whole = self.dp.all_gather(piece)
            flat[start:start + p.numel()].copy_(whole[:p.numel()])

    def full_grads(self) -> dict[int, torch.Tensor]:
        """{id(parameter): its reduced gradient at TP-local shape}, gathered over dp (a
        collective on dp): for inspection, not for training."""
        return {id(p): (p.grad.full_tensor() if p.grad is not None else
                        torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device))
                for _, p in self.params}

    def bytes_per_parameter(self) -> dict[str, float]:
        """Bytes this rank keeps between steps per parameter it trains: its fp32 shards of
        parameters and gradients (the gathered 16-bit or fp32 copies live only while a unit
        runs)."""
        n = sum(p.numel() for _, p in self.params)
        if n == 0:
            return {"params": 0.0, "grads": 0.0}
        held = sum(p.to_local().numel() * p.to_local().element_size() for _, p in self.params)
        return {"params": held / n, "grads": held / n}


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The TP-local tensor of parameter `p`: itself, or gathered over dp when FSDP2 shards
    it (a collective on dp)."""
    return p.detach().full_tensor() if is_fully_sharded(p) else p.detach()


@torch.no_grad()
def scatter_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's rows of the TP-local tensor `full` into the DTensor `p`'s shard."""
    a, b = row_range(p)
    p.to_local().view(-1).copy_(full.reshape(-1)[a:b])


def assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """Set parameter `p` to the TP-local tensor `full`: its rows when fully sharded, else
    a copy."""
    if is_fully_sharded(p):
        scatter_into(p, full)
    else:
        with torch.no_grad():
            p.copy_(full)


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds of parameter `p` (its shard when fully sharded)."""
    return p.to_local().numel() if is_fully_sharded(p) else p.numel()


class CollectiveBytes:
    """Counts FSDP2's own collectives (which bypass megavit's `Group` layer) into a
    `CommStats` under the counting layer's conventions: "dp.all_gather" the gathered output,
    "dp.reduce_scatter" the pre-scatter input, in bytes (megavit's own collectives on the
    other groups are counted by the layer already and are left alone). A torch dispatch
    mode: enter it around the steps to count (tests and benchmarks; training does not)."""

    _OPS = MappingProxyType({
        "_allgather_base_": ("all_gather", 0), "_reduce_scatter_base_": ("reduce_scatter", 1),
        "allgather_into_tensor_coalesced_": ("all_gather", 0),
        "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1)})

    def __init__(self, stats: CommStats, group: Group) -> None:
        """Count the collectives on `group`'s process group (the run's dp group: FSDP2's
        mesh dimension is the same group) under its name."""
        import torch.distributed as dist
        from torch.utils._python_dispatch import TorchDispatchMode

        counter, name_of = self, group.name
        mine = group.pg.group_name if group.pg is not None else None

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._overloadpacket.__name__
                if (func.namespace == "c10d" and name in CollectiveBytes._OPS
                        and dist.ProcessGroup.unbox(args[2]).group_name == mine):
                    op, which = CollectiveBytes._OPS[name]
                    tensors = args[which]
                    tensors = tensors if isinstance(tensors, (list, tuple)) else [tensors]
                    for t in tensors:
                        counter.stats.record(name_of, op, t.numel() * t.element_size())
                return func(*args, **(kwargs or {}))

        self.stats, self._mode = stats, _Mode()

    def __enter__(self) -> "CollectiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
