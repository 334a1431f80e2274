"""How each parameter's full (serial) tensor maps to this rank's local tensor, and the
seeded initialisation that makes every layout start from the serial weights.

A tensor-parallel parameter carries a `TPShard`: along `dim`, the full tensor is the
concatenation of `segments` (their full sizes), and each segment is split evenly over the
TP ranks. A plain column-parallel weight [out, in] has one segment; the ViT-22B fused input
projection has four, [q | k | v | mlp], so each rank holds its heads' q, k, v and its slice
of the MLP: local rows [q_r | k_r | v_r | mlp_r]. Parameters without a `TPShard` are
replicated on every TP rank.

Every parameter also carries an init (`TruncNormal`, `LecunNormal`, `Constant`).
`initialize_parameters` draws each element from a counter-based generator keyed by (seed,
global parameter name) and the element's index in the full tensor, so TP=4 starts from
exactly the TP=1 weights, and each rank computes only its own piece.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from megavit.parallel.comm import Group
from megavit.parallel.random import counter_uniform

@dataclass(frozen=True)
class TPShard:
    """Along `dim`, the full tensor = cat(segments); segment i is split into `world`
    equal chunks and rank `rank` keeps chunk `rank` of each, in segment order."""

    dim: int
    segments: tuple[int, ...]
    world: int
    rank: int

    def __post_init__(self) -> None:
        for s in self.segments:
            if s % self.world:
                raise ValueError(f"segment of size {s} does not split over {self.world} ranks")

    @property
    def local_segments(self) -> tuple[int, ...]:
        return tuple(s // self.world for s in self.segments)

    def full_shape(self, local_shape: Iterable[int]) -> torch.Size:
        shape = list(local_shape)
        shape[self.dim] = sum(self.segments)
        return torch.Size(shape)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's local piece of `full`."""
        pieces = [
            seg.narrow(self.dim, self.rank * (n // self.world), n // self.world)
            for seg, n in zip(full.split(list(self.segments), self.dim), self.segments)
        ]
        return torch.cat(pieces, self.dim) if len(pieces) > 1 else pieces[0].clone()

    def unshard(self, locals_: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's local piece (in rank order)."""
        per_rank = [t.split(list(self.local_segments), self.dim) for t in locals_]
        segs = [torch.cat([p[i] for p in per_rank], self.dim) for i in range(len(self.segments))]
        return torch.cat(segs, self.dim)


def set_tp_shard(param: torch.Tensor, shard: TPShard | None) -> None:
    param.tp_shard = shard  # type: ignore[attr-defined]


def get_tp_shard(param: torch.Tensor) -> TPShard | None:
    return getattr(param, "tp_shard", None)


def is_replicated(param: torch.Tensor) -> bool:
    """True when every TP rank holds the whole parameter (norms, biases after a
    row-parallel reduction, embeddings, heads)."""
    return get_tp_shard(param) is None


def gather_tp(local: torch.Tensor, shard: TPShard | None, group: Group) -> torch.Tensor:
    """The full tensor, assembled from every TP rank's `local` (a collective on `group`:
    every rank must call it). A replicated tensor is returned as it is."""
    if shard is None or group.size == 1:
        return local
    moved = local.movedim(shard.dim, 0).contiguous()
    gathered = group.all_gather(moved).chunk(group.size, 0)
    return shard.unshard([g.movedim(0, shard.dim) for g in gathered])


# ---------------------------------------------------------------------------------------
# Seeded initialisation
# ---------------------------------------------------------------------------------------
#
# Every element of every full (serial) parameter gets a uniform number from a counter-based
# generator: a hash of (seed, parameter name) and the element's index in the full tensor.
# A rank computes only the elements of its own shard, on its own device, and gets exactly
# the numbers the serial model has there; no rank ever holds a full 22B-model tensor.


def _global_flat_index(local_shape: torch.Size, full_shape: torch.Size,
                       shard: TPShard | None, device: torch.device) -> torch.Tensor:
    """The index in the flattened full tensor of every element of this rank's piece."""
    strides = [1] * len(full_shape)
    for i in range(len(full_shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * full_shape[i + 1]
    flat = torch.zeros((), dtype=torch.long, device=device)
    for dim, size in enumerate(local_shape):
        pos = torch.arange(size, dtype=torch.long, device=device)
        if shard is not None and dim == shard.dim:   # local position -> global position
            pieces, full_off = [], 0
            for n, local_n in zip(shard.segments, shard.local_segments):
                pieces.append(torch.arange(local_n, device=device) + full_off + shard.rank * local_n)
                full_off += n
            pos = torch.cat(pieces)
        view = [1] * len(local_shape)
        view[dim] = size
        flat = flat + (pos * strides[dim]).view(view)
    return flat.expand(local_shape)


def _normal_icdf(p: torch.Tensor) -> torch.Tensor:
    return torch.erfinv(2 * p - 1) * math.sqrt(2.0)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2.0)))


@dataclass(frozen=True)
class TruncNormal:
    """Normal(0, std) truncated to [-2 std, 2 std], by inverting the CDF."""

    std: float

    def sample(self, u: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
        lo, hi = _normal_cdf(-2.0), _normal_cdf(2.0)
        return _normal_icdf(lo + u * (hi - lo)) * self.std


@dataclass(frozen=True)
class LecunNormal:
    """Truncated normal with std sqrt(1 / fan_in) after truncation (fan_in: the full
    tensor's elements per output row), as used for input (e.g. patch) embeddings."""

    def sample(self, u: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
        fan_in = math.prod(full_shape[1:]) if len(full_shape) > 1 else full_shape[0]
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # undo truncation's std loss
        return TruncNormal(std).sample(u, full_shape)


@dataclass(frozen=True)
class Constant:
    value: float


Init = TruncNormal | LecunNormal | Constant


def set_init(param: torch.Tensor, init: Init) -> None:
    param.init = init  # type: ignore[attr-defined]


def trunc_normal(std: float) -> Init:
    return TruncNormal(std)


def constant(value: float) -> Init:
    return Constant(value)


def lecun_normal() -> Init:
    return LecunNormal()


def param_seed(seed: int, name: str) -> int:
    """A 63-bit key from (run seed, global parameter name), stable across processes."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Replace meta-device parameters by uninitialised ones on `device`, keeping their
    attributes (`tp_shard`, `init`, ...), which `Module.to_empty` would drop."""
    for mod in module.modules():
        for pname, p in mod._parameters.items():
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
                new.__dict__.update(p.__dict__)
                mod._parameters[pname] = new
        for bname, b in mod._buffers.items():
            if b is not None and b.is_meta:
                mod._buffers[bname] = torch.zeros_like(b, device=device)


@torch.no_grad()
def initialize_parameters(module: nn.Module, seed: int, device: torch.device | str | None = None,
                          prefix: str = "") -> None:
    """Initialise every parameter of `module` from (seed, prefix + its name): each element
    from `counter_uniform` at its index in the full tensor, computed on the parameter's
    device for this rank's piece only. A module on the meta device is first materialised on
    `device`; afterwards, modules with an `init_buffers()` method fill their buffers."""
    if device is not None:
        _materialize(module, torch.device(device))
    for name, param in module.named_parameters():
        init = getattr(param, "init", None)
        if init is None:
            raise RuntimeError(f"parameter {prefix}{name} has no init (set_init)")
        if isinstance(init, Constant):
            param.fill_(init.value)
            continue
        shard = get_tp_shard(param)
        full_shape = shard.full_shape(param.shape) if shard else param.shape
        index = _global_flat_index(param.shape, full_shape, shard, param.device)
        u = counter_uniform(param_seed(seed, prefix + name), index)
        param.copy_(init.sample(u, full_shape))
    for mod in module.modules():
        if hasattr(mod, "init_buffers"):
            mod.init_buffers()


@torch.no_grad()
def full_state(module: nn.Module, tp: Group,
               grads: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of `module` at its full serial shape, keyed by global name — or,
    given `grads` ({id(parameter): gradient}), every gradient (zeros where none). A
    collective on `tp`: every TP rank must call it (and on dp, for parameters FSDP2 shards
    over dp)."""
    from megavit.parallel.full_sharding import local_tensor

    out = {}
    for name, p in module.named_parameters():
        t = local_tensor(p) if grads is None else grads.get(
            id(p), torch.zeros(p.shape, dtype=p.dtype, device=p.device))
        out[name] = gather_tp(t.to(p.dtype), get_tp_shard(p), tp).clone()
    return out
