"""How each parameter's full (serial) tensor maps to this rank's local tensor, and the
seeded initialisation that makes every layout start from the serial weights.

A tensor-parallel parameter carries a `TPShard`: along `dim`, the full tensor is the
concatenation of `segments` (their full sizes), and each segment is split evenly over the
TP ranks. A plain column-parallel weight [out, in] has one segment; the ViT-22B fused input
projection has four, [q | k | v | mlp], so each rank holds its heads' q, k, v and its slice
of the MLP: local rows [q_r | k_r | v_r | mlp_r]. Parameters without a `TPShard` are
replicated on every TP rank.

Every parameter also carries an init function. `initialize_parameters` generates each full
tensor from a generator seeded by (seed, global parameter name) alone and keeps this rank's
piece, so TP=4 starts from exactly the TP=1 weights.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from megavit.parallel.comm import Group

InitFn = Callable[[torch.Tensor, torch.Generator], None]


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


def set_init(param: torch.Tensor, init: InitFn) -> None:
    param.init_fn = init  # type: ignore[attr-defined]


def trunc_normal(std: float) -> InitFn:
    """Truncated normal with the given std, cut at two std."""

    def init(t: torch.Tensor, g: torch.Generator) -> None:
        nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std, generator=g)

    return init


def constant(value: float) -> InitFn:
    def init(t: torch.Tensor, g: torch.Generator) -> None:
        t.fill_(value)

    return init


def lecun_normal() -> InitFn:
    """Truncated normal with std sqrt(1 / fan_in) (fan_in: product of all dims but the
    first), as used for patch embeddings."""

    def init(t: torch.Tensor, g: torch.Generator) -> None:
        fan_in = t[0].numel() if t.dim() > 1 else t.numel()
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # undo truncation's std loss
        nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std, generator=g)

    return init


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (run seed, global parameter name), stable across processes."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Replace meta-device parameters by uninitialised ones on `device`, keeping their
    attributes (`tp_shard`, `init_fn`, ...), which `Module.to_empty` would drop."""
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
    """Initialise every parameter of `module` from (seed, prefix + its name).

    The full tensor is generated on the CPU (the same stream on every device), then this
    rank's piece is copied in. A module on the meta device is first materialised on
    `device` (one full parameter in host memory at a time).
    """
    if device is not None:
        _materialize(module, torch.device(device))
    for name, param in module.named_parameters():
        init = getattr(param, "init_fn", None)
        if init is None:
            raise RuntimeError(f"parameter {prefix}{name} has no init function (set_init)")
        shard = get_tp_shard(param)
        full_shape = shard.full_shape(param.shape) if shard else param.shape
        full = torch.empty(full_shape, dtype=torch.float32)
        init(full, torch.Generator().manual_seed(param_seed(seed, prefix + name)))
        param.copy_(shard.shard(full) if shard else full)


@torch.no_grad()
def full_state(module: nn.Module, tp: Group, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter of `module` (or its gradient, zeros where it has none) at its full
    serial shape, keyed by global name. A collective on `tp`: every TP rank must call it."""
    out = {}
    for name, p in module.named_parameters():
        t = p.detach() if not grads else (p.grad if p.grad is not None else torch.zeros_like(p))
        out[name] = gather_tp(t, get_tp_shard(p), tp).clone()
    return out
