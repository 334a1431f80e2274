"""Randomness that the parallel layout cannot change, and named RNG streams for dropout.

Two kinds of randomness:

- Keyed (`counter_uniform`): a number per (key, index) from a hash, no generator state.
  Parameter init (key: seed and parameter name; index: element of the full tensor) and
  drop-path (key: seed and layer; index: the global sample id) use it, so they are the same
  in every layout and in a recomputed forward.
- Streams (`RNGTracker`): dropout draws from torch's generator of the compute device. The
  default stream is seeded identically on every rank (dropout on activations replicated over
  TP draws the same mask everywhere); the "model-parallel" stream is seeded per TP rank
  (seed + 2718 + tp rank, as in Megatron), for dropout on TP-sharded activations such as
  each rank's attention heads or sequence shard. `fork("model-parallel")` swaps it in for a
  region. Recomputation saves and restores all streams, so a recomputed region draws the
  same masks (see megavit.parallel.recompute).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

MODEL_PARALLEL = "model-parallel"
_MP_SEED_OFFSET = 2718


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (16-bit limbs)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: full avalanche of the input bits."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64, one per int64 `index` (>= 0), determined by
    (key, index) alone: the same on every device and for every way of slicing `index`."""
    k1, k2 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    lo, hi = index & 0xFFFFFFFF, index >> 32
    a = _fmix32(lo ^ k1)
    a = _fmix32(a ^ _mul32(hi ^ k2, 0x9E3779B1))
    b = _fmix32(a ^ k2 ^ 0x632BE5AB)           # a second word for 53-bit resolution
    return ((a.double() * 2.0**21 + (b >> 11).double()) + 0.5) / 2.0**53


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Named generator states for the compute device, swapped in by `fork`.

    `seed_default` seeds torch's generator for `device` (and the CPU's); the
    "model-parallel" stream starts from seed + 2718 + tp_rank."""

    def __init__(self, seed: int, tp_rank: int, device: torch.device) -> None:
        self.device = device
        self.states: dict[str, torch.Tensor] = {}
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        self.add(MODEL_PARALLEL, seed + _MP_SEED_OFFSET + tp_rank)

    def add(self, name: str, seed: int) -> None:
        """A new stream `name` starting from `seed` (the current stream is untouched)."""
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} exists already")
        current = _get_state(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.states[name] = gen.get_state()
        _set_state(self.device, current)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL) -> Iterator[None]:
        """Run the block with stream `name` as the device generator; the stream advances."""
        outside = _get_state(self.device)
        _set_state(self.device, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(self.device, outside)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Every stream, plus the default ('' key), for a later `set_states`."""
        return {"": _get_state(self.device), **{k: v.clone() for k, v in self.states.items()}}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        _set_state(self.device, states[""])
        self.states = {k: v.clone() for k, v in states.items() if k}
