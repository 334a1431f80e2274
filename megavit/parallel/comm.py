"""The one thin layer every collective goes through.

A `Group` wraps a torch.distributed process group with its name ("tp", "dp", ...), size
and rank, and records every call (operation, bytes) in a `CommStats` shared by all groups
of one `ParallelState`. Tests and benchmarks read those counts to assert communication
volume against theory. A group of size 1 never calls torch.distributed, so the same model
code runs in a single process without a process group.

A collective that fails — most often because a peer process died (gloo/NCCL report a
reset connection at once) or hung past `--distributed-timeout-minutes` — raises
`CollectiveError` naming the operation, the group and its global ranks, also when it
fails in a handle's `wait()`.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from megavit.errors import RunFailure

# torch >= 2.13 renames the flat-tensor collectives; older builds (e.g. NGC) have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Calls and bytes per (group name, operation). `bytes` counts the input tensor of
    all_reduce / broadcast / send, and the full (gathered / pre-scatter) tensor of
    all_gather / reduce_scatter."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    enabled: bool = True

    def record(self, group: str, op: str, nbytes: int) -> None:
        if self.enabled:
            self.calls[(group, op)] += 1
            self.bytes[(group, op)] += nbytes

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def count(self, group: str, op: str) -> int:
        return self.calls[(group, op)]

    def snapshot(self) -> dict[str, int]:
        """{"tp.all_reduce": calls, ...} — a plain dict, easy to send between processes."""
        return {f"{g}.{op}": n for (g, op), n in sorted(self.calls.items())}

    def bytes_snapshot(self) -> dict[str, int]:
        """{"tp.all_reduce": bytes, ...}."""
        return {f"{g}.{op}": n for (g, op), n in sorted(self.bytes.items())}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CollectiveError(RunFailure, RuntimeError):
    """A collective or point-to-point operation failed; the message names the group."""


@contextmanager
def _named(group: "Group", op: str) -> Iterator[None]:
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:   # DistBackendError, gloo / NCCL errors, timeouts
        me = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveError(
            f"{op} on the {group.name} group (global ranks {list(group.ranks)}) failed on "
            f"rank {me}: a peer process in it most likely died or hung past "
            f"--distributed-timeout-minutes (the first rank to fail has the cause in its "
            f"log). Backend error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


class Pending:
    """An asynchronous operation's handle: `wait()` names the group if it fails."""

    def __init__(self, work: dist.Work, group: "Group", op: str) -> None:
        self.work, self.group, self.op = work, group, op

    def wait(self) -> None:
        with _named(self.group, self.op):
            self.work.wait()

    def is_completed(self) -> bool:
        return self.work.is_completed()


@dataclass
class Group:
    """A named process group. `ranks` are global ranks in group order; `rank` is this
    process's index within the group. `pg` is None for a size-1 group."""

    name: str
    ranks: tuple[int, ...]
    rank: int
    pg: dist.ProcessGroup | None
    stats: CommStats

    @property
    def size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce of `t` over this group; returns `t`."""
        if self.size > 1:
            self.stats.record(self.name, "all_reduce", _nbytes(t))
            with _named(self, "all_reduce"):
                dist.all_reduce(t, op=op, group=self.pg)
        return t

    def all_reduce_async(self, t: torch.Tensor) -> Pending | None:
        """Start an in-place sum all-reduce of `t`; returns the handle to `wait()` on
        (None for a group of one)."""
        if self.size == 1:
            return None
        self.stats.record(self.name, "all_reduce", _nbytes(t))
        with _named(self, "all_reduce"):
            return Pending(dist.all_reduce(t, group=self.pg, async_op=True), self, "all_reduce")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate `t` from every rank along dim 0: [n, ...] -> [size * n, ...]."""
        out, work = self.all_gather_async(t)
        if work is not None:
            work.wait()
        return out

    def all_gather_async(self, t: torch.Tensor, out: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, Pending | None]:
        """Start `all_gather` (into `out` if given: [size * n, ...], contiguous); returns
        (output, handle to `wait()` on before reading it)."""
        if self.size == 1:
            if out is not None and out.data_ptr() != t.data_ptr():
                out.copy_(t)
            return (t if out is None else out), None
        t = t.contiguous()
        if out is None:
            out = torch.empty((self.size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype,
                              device=t.device)
        self.stats.record(self.name, "all_gather", _nbytes(out))
        with _named(self, "all_gather"):
            return out, Pending(_all_gather_flat(out, t, group=self.pg, async_op=True), self,
                                "all_gather")

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks and keep this rank's dim-0 chunk: [size * n, ...] -> [n, ...]."""
        out, work = self.reduce_scatter_async(t)
        if work is not None:
            work.wait()
        return out

    def reduce_scatter_async(self, t: torch.Tensor, out: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, Pending | None]:
        """Start `reduce_scatter` (into `out` if given: [n / size, ...], contiguous, which may
        be this rank's chunk of `t` itself); returns (output, handle to `wait()` on)."""
        if self.size == 1:
            if out is not None and out.data_ptr() != t.data_ptr():
                out.copy_(t)
            return (t if out is None else out), None
        if t.shape[0] % self.size:
            raise ValueError(f"reduce_scatter over {self.name}: dim 0 of size {t.shape[0]} "
                             f"does not split into {self.size} chunks")
        t = t.contiguous()
        if out is None:
            out = torch.empty((t.shape[0] // self.size,) + tuple(t.shape[1:]), dtype=t.dtype,
                              device=t.device)
        self.stats.record(self.name, "reduce_scatter", _nbytes(t))
        with _named(self, "reduce_scatter"):
            return out, Pending(_reduce_scatter_flat(out, t, group=self.pg, async_op=True),
                                self, "reduce_scatter")

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In-place broadcast from group rank `src`; returns `t`."""
        if self.size > 1:
            self.stats.record(self.name, "broadcast", _nbytes(t))
            with _named(self, "broadcast"):
                dist.broadcast(t, src=self.ranks[src], group=self.pg)
        return t

    def exchange(self, sends: list[tuple[torch.Tensor, int, int]],
                 recvs: list[tuple[torch.Tensor, int, int]]) -> list[Pending]:
        """Post point-to-point sends and receives together (one batch_isend_irecv):
        each entry is (tensor, peer's rank in this group, tag). Returns the handles, sends
        first; a received tensor may be read after its handle's `wait()`."""
        ops = []
        for (t, peer, tag), fn, op in [(x, dist.isend, "send") for x in sends] + \
                                      [(x, dist.irecv, "recv") for x in recvs]:
            self.stats.record(self.name, op, _nbytes(t))
            ops.append(dist.P2POp(fn, t, self.ranks[peer], group=self.pg, tag=tag))
        if not ops:
            return []
        with _named(self, "send/recv"):
            return [Pending(w, self, "send/recv") for w in dist.batch_isend_irecv(ops)]

    @classmethod
    def single(cls, name: str, stats: CommStats, global_rank: int = 0) -> "Group":
        """A group of one process: every collective is the identity."""
        return cls(name=name, ranks=(global_rank,), rank=0, pg=None, stats=stats)
