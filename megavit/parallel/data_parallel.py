"""Gradients of data-parallel replicas: contiguous buffers, buckets, and their reduction,
optionally overlapped with backward.

Every trainable parameter gets a `main_grad`: a view into one flat gradient buffer (fp32,
or fp16 for --fp16 without `--accumulate-allreduce-grads-in-fp32`; bf16 always uses fp32). A hook after each gradient accumulation adds `param.grad` into `main_grad` and
frees `param.grad`. The buffer is cut into buckets of about `bucket_size` elements, in the
order gradients become ready in backward (the reverse of the model's order), each padded
to a multiple of the DP size:

    bucket 0 (last blocks, head) | bucket 1 | ... | bucket n (first blocks, embedding) | partial

When every parameter of a bucket has received its gradient of the step's last micro-batch
(it has accumulated M of them), the bucket is reduced over DP — all-reduced, or with the
sharded optimizer reduce-scattered so each rank keeps its 1/d of it — after being scaled by
1/d so the result is the mean. With `overlap` the reduction starts right then, while
backward goes on; otherwise all buckets are reduced once backward is over. `finish()` waits
for all of them. Parameters whose gradient is partial over TP (QK-norms; LayerNorms and
biases under sequence parallelism) sit in their own last bucket, summed over TP before it
is reduced over DP.

With the sharded optimizer, parameters are views into a flat parameter buffer laid out like
the gradients, so each rank's updated shard can be all-gathered into place
(`all_gather_params`).

Before a bucket is communicated, its local gradients can be checked for NaN / inf: a
non-finite value is then reported with this rank and the parameter's name rather than
spread over all replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megavit.parallel.comm import Group
from megavit.parallel.partial_grad import has_partial_grad


@dataclass
class Bucket:
    index: int
    start: int                     # element offsets into the flat buffers
    end: int                       # (end - start) divisible by the DP size
    params: list[nn.Parameter]
    partial: bool = False          # the TP-partial parameters' bucket
    pending: set = field(default_factory=set)   # ids of parameters not ready this step
    handle: object = None          # the reduction in flight
    launched: bool = False


@dataclass
class Segment:
    """The part of one parameter inside this rank's shard of a bucket."""

    name: str
    param: nn.Parameter
    bucket: int
    param_range: tuple[int, int]   # flat offsets within the parameter
    buffer_range: tuple[int, int]  # flat offsets within the buffers


def bucket_layout(params: list[nn.Parameter], bucket_size: int, dp_size: int
                  ) -> list[tuple[list[nn.Parameter], int, bool]]:
    """How trainable `params` (in model order) are cut into buckets: (members, elements
    padded to a multiple of `dp_size`, whether it is the TP-partial bucket), in the order
    gradients become ready (the model's reversed), the TP-partial parameters last. A bucket
    closes once it holds `bucket_size` elements or its group ends."""
    ordinary = [p for p in reversed(params) if not has_partial_grad(p)]
    partial = [p for p in reversed(params) if has_partial_grad(p)]
    out = []
    for group, is_partial in ((ordinary, False), (partial, True)):
        current: list[nn.Parameter] = []
        size = 0
        for i, p in enumerate(group):
            current.append(p)
            size += p.numel()
            if size >= bucket_size or i == len(group) - 1:
                out.append((current, -(-size // dp_size) * dp_size, is_partial))
                current, size = [], 0
    return out


class DataParallelBuffers:
    """Gradient (and, when sharded, parameter) buffers of this rank's parameters, and their
    reduction over `dp`. Call `start_step(M)` before backward of a step's M micro-batches
    and `finish()` after; `events` records the order of launches (for tests)."""

    strategy = "optimizer"    # --data-parallel-sharding-strategy

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], dp: Group, tp: Group,
                 grad_dtype: torch.dtype, bucket_size: int, shard: bool = False,
                 overlap: bool = False, check_finite: bool = False) -> None:
        self.dp, self.tp, self.shard, self.overlap = dp, tp, shard, overlap
        self.check_finite = check_finite
        params = [(n, p) for n, p in named_params if p.requires_grad]
        self.names = {id(p): n for n, p in params}
        self.buckets: list[Bucket] = []
        offset = 0
        for members, padded, is_partial in bucket_layout([p for _, p in params], bucket_size,
                                                         dp.size):
            self.buckets.append(Bucket(len(self.buckets), offset, offset + padded, members,
                                       is_partial))
            offset += padded
        self.numel = offset
        device = params[0][1].device if params else torch.device("cpu")
        self.grad_buffer = torch.zeros(offset, dtype=grad_dtype, device=device)
        self.param_buffer = None
        self.offsets: dict[int, int] = {}
        self.bucket_of: dict[int, Bucket] = {}
        for bucket in self.buckets:
            pos = bucket.start
            for p in bucket.params:
                self.offsets[id(p)] = pos
                self.bucket_of[id(p)] = bucket
                p.main_grad = self.grad_buffer[pos:pos + p.numel()].view_as(p)
                pos += p.numel()
        if shard:
            self.param_buffer = torch.zeros(offset, dtype=params[0][1].dtype, device=device)
            for _, p in params:
                view = self.param_buffer[self.offsets[id(p)]:self.offsets[id(p)] + p.numel()]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
        self.microbatches = 1
        self.counts: dict[int, int] = {}
        self.events: list[tuple[str, int]] = []
        self._finite: list[tuple[Bucket, torch.Tensor]] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in params]

    # ---- the step ----------------------------------------------------------------------

    def start_step(self, num_microbatches: int) -> None:
        """Zero the gradients and expect `num_microbatches` backward passes."""
        self.grad_buffer.zero_()
        self.microbatches = num_microbatches
        self.counts = {}
        self._finite = []
        self.events = []
        for bucket in self.buckets:
            bucket.pending = {id(p) for p in bucket.params}
            bucket.handle, bucket.launched = None, False

    def _on_grad(self, p: nn.Parameter) -> None:
        if p.grad is None:   # a backward that left this gradient to a later pass (zero
            return           # bubble's W: `weight_grad.py`), which calls this hook again
        bucket = self.bucket_of[id(p)]
        if bucket.launched:
            # e.g. a parameter used both inside and outside a recomputed region gets two
            # gradients per micro-batch: its bucket would be reduced without the last one
            raise RuntimeError(
                f"{self.names[id(p)]} received a gradient after its bucket was reduced (more "
                f"than one gradient per micro-batch?); train without --overlap-grad-reduce")
        p.main_grad.add_(p.grad)
        p.grad = None
        n = self.counts.get(id(p), 0) + 1
        self.counts[id(p)] = n
        if n == self.microbatches:
            bucket.pending.discard(id(p))
            if self.overlap and not bucket.pending and not bucket.partial:
                self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        data = self.grad_buffer[bucket.start:bucket.end]
        if self.check_finite:   # a device flag, no host sync here
            self._finite.append((bucket, torch.isfinite(data).all()))
        if bucket.partial:
            self.tp.all_reduce(data)
        if self.dp.size > 1:
            data.div_(self.dp.size)
            if self.shard:
                _, bucket.handle = self.dp.reduce_scatter_async(data, out=self.shard_of(bucket))
            else:
                bucket.handle = self.dp.all_reduce_async(data)
        bucket.launched = True
        self.events.append(("reduce", bucket.index))

    def finish(self) -> None:
        """Reduce the buckets not yet reduced and wait for every reduction."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None

    def non_finite(self) -> list[str]:
        """After `finish()`: the parameters with NaN/inf gradients in the buckets that had
        them on this rank before they were communicated (one host sync). A NaN stays where
        it was through the elementwise reduction, and outside this rank's shard the buffer
        keeps the local values, so the positions still name the parameters."""
        if not self._finite or bool(torch.stack([f for _, f in self._finite]).all()):
            return []
        return [self.names[id(p)] for bucket, finite in self._finite if not bool(finite)
                for p in bucket.params if not bool(torch.isfinite(p.main_grad).all())]

    # ---- shards (sharded optimizer) ---------------------------------------------------

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """This DP rank's element range of `bucket` in the buffers."""
        size = (bucket.end - bucket.start) // self.dp.size
        start = bucket.start + self.dp.rank * size
        return start, start + size

    def shard_of(self, bucket: Bucket) -> torch.Tensor:
        start, end = self.shard_range(bucket)
        return self.grad_buffer[start:end]

    def segments(self) -> list[Segment]:
        """The pieces of parameters inside this rank's shards (sharded optimizer), or one
        whole-parameter segment per parameter (otherwise)."""
        out = []
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket) if self.shard else (bucket.start, bucket.end)
            for p in bucket.params:
                start = self.offsets[id(p)]
                a, b = max(lo, start), min(hi, start + p.numel())
                if a < b:
                    out.append(Segment(self.names[id(p)], p, bucket.index,
                                       (a - start, b - start), (a, b)))
        return out

    def grad_view(self, s: Segment) -> torch.Tensor:
        """Segment `s`'s (reduced) gradient: a flat view of the gradient buffer."""
        return self.grad_buffer[s.buffer_range[0]:s.buffer_range[1]]

    def param_view(self, s: Segment) -> torch.Tensor:
        """Segment `s` in the parameter buffer (sharded optimizer): a flat view."""
        return self.param_buffer[s.buffer_range[0]:s.buffer_range[1]]

    def gather_shards(self, flat: torch.Tensor, into: torch.Tensor | None = None) -> None:
        """Every rank's shard of each bucket of `flat` (a tensor laid out like the buffers)
        into `into` (default: `flat` itself, in place): one all-gather per bucket on dp."""
        into = flat if into is None else into
        if self.dp.size == 1:
            if into is not flat:
                into.copy_(flat)
            return
        handles = []
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket)
            _, h = self.dp.all_gather_async(flat[lo:hi], out=into[bucket.start:bucket.end])
            handles.append(h)
        for h in handles:
            h.wait()

    def all_gather_params(self) -> None:
        """Every rank's updated parameter shard into every rank's parameter buffer."""
        self.gather_shards(self.param_buffer)

    def full_grads(self) -> dict[int, torch.Tensor]:
        """{id(parameter): its reduced gradient}, whole even when sharded (the shards are
        all-gathered into a copy; a collective on dp): for inspection, not for training."""
        buffer = self.grad_buffer
        if self.shard and self.dp.size > 1:
            buffer = torch.empty_like(self.grad_buffer)
            self.gather_shards(self.grad_buffer, into=buffer)
        return {id(p): buffer[self.offsets[id(p)]:self.offsets[id(p)] + p.numel()].view_as(p)
                for b in self.buckets for p in b.params}

    def bytes_per_parameter(self) -> dict[str, float]:
        """Bytes this rank keeps per parameter it trains, for parameters and gradients."""
        n = sum(p.numel() for b in self.buckets for p in b.params)
        if n == 0:     # nothing trained on this rank (e.g. a frozen pipeline stage)
            return {"params": 0.0, "grads": 0.0}
        params = sum(p.numel() * p.element_size() for b in self.buckets for p in b.params)
        return {"params": params / n,
                "grads": self.grad_buffer.numel() * self.grad_buffer.element_size() / n}
