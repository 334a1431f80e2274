"""Autograd functions behind the tensor-parallel linear layers.

A fused projection has one weight but several outputs (column-parallel, e.g. [q|k|v] and
[mlp] from one [q|k|v|mlp] weight) or several inputs (row-parallel, e.g. [attention] and
[mlp] into one [attention|mlp] weight). Running one matmul per group keeps every
activation contiguous and avoids concatenating activations or gradients; these functions
also write each group's weight gradient straight into one full-size buffer (slicing a
parameter in autograd would allocate and zero a full-size gradient per slice).

    column_linear   forward: y_g = x W_g^T + b_g for each row block W_g of W
                    backward: dx = sum_g dy_g W_g, all-reduced over the TP group while the
                              weight gradients dW_g = dy_g^T x are computed (overlap; under
                              zero bubble dW waits for the W pass, `weight_grad.py`);
                              this is `copy_to_tp` fused with the matmuls. With sequence
                              parallelism: all-gather x first; backward reduce-scatters dx
    row_linear      forward: y = sum_g x_g W_g^T (+ b) for each column block W_g of W
                    backward: dx_g = dy W_g, dW_g = dy^T x_g; no communication (the
                              all-reduce of y is `reduce_from_tp`, applied by the caller)

Shapes: x [..., in]; activations keep their leading dims; weights are [out, in] as in
`F.linear`.
"""

from __future__ import annotations

from typing import Callable, Literal, Protocol, Sequence

import torch

from megavit.parallel.comm import Group

SequenceParallelMode = Literal["keep", "regather"]
"""How a TP region runs on sequence shards (None where it does not): "keep" saves the
all-gathered input of a column-parallel layer for its weight gradient, "regather" saves
only this rank's shard and all-gathers it again in backward. Row-parallel layers
reduce-scatter their output in either mode."""


class DeferredWeightGrads(Protocol):
    """What the layers need of `weight_grad.WeightGradStore`: whether dW is deferred now,
    and where to leave the closure that computes it."""

    deferring: bool

    def put(self, weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None: ...


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _ColumnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group, rows, sp_mode, store, *biases):
        ctx.group, ctx.rows, ctx.sp_mode, ctx.store = group, rows, sp_mode, store
        full = group.all_gather(x) if sp_mode else x          # [s/t, b, h] -> [s, b, h]
        ctx.save_for_backward(x if sp_mode == "regather" else full, weight)
        x2, lead = _flat(full), full.shape[:-1]
        outs, r = [], 0
        for n, b in zip(rows, biases):
            w = weight[r:r + n]
            y = full.new_empty(*lead, n)  # not a view: callers may modify it in place
            if b is not None:
                torch.addmm(b, x2, w.t(), out=y.view(-1, n))
            else:
                torch.mm(x2, w.t(), out=y.view(-1, n))
            outs.append(y)
            r += n
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        saved, weight = ctx.saved_tensors
        group, sp_mode = ctx.group, ctx.sp_mode
        defer = ctx.needs_input_grad[1] and ctx.store is not None and ctx.store.deferring
        full_shape = (saved.shape[0] * group.size, *saved.shape[1:]) if sp_mode == "regather" \
            else saved.shape
        gather = None
        if sp_mode == "regather" and not defer:   # the full input back while dx is computed
            full, gather = group.all_gather_async(saved)
        else:   # the full input ("keep", no SP), or the shard a deferred dW gathers later
            full = saved
        grads = [_flat(g) if g is not None else None for g in grads]
        dx = work = None
        if ctx.needs_input_grad[0]:
            r = 0
            for n, g in zip(ctx.rows, grads):
                if g is not None:
                    w = weight[r:r + n]
                    dx = g @ w if dx is None else dx.addmm_(g, w)
                r += n
            if dx is None:
                dx = torch.zeros(torch.Size(full_shape[:-1]).numel(), full_shape[-1],
                                 dtype=saved.dtype, device=saved.device)
            dx = dx.view(full_shape)
            # overlaps the weight gradients below
            dx, work = group.reduce_scatter_async(dx) if sp_mode else (dx, group.all_reduce_async(dx))
        if gather is not None:
            gather.wait()
        dweight = None
        if ctx.needs_input_grad[1]:
            rows = ctx.rows
            gather_in_w = defer and sp_mode == "regather"

            def weight_grad() -> torch.Tensor:
                # deferred under "regather": W keeps only the shard and gathers it now (every
                # TP rank runs its W passes in the same order)
                x2 = _flat(group.all_gather(full) if gather_in_w else full)
                out = torch.empty_like(weight)
                r = 0
                for n, g in zip(rows, grads):
                    if g is None:
                        out[r:r + n].zero_()
                    else:
                        torch.mm(g.t(), x2, out=out[r:r + n])
                    r += n
                return out

            if defer:
                ctx.store.put(weight, weight_grad)     # the W pass computes it
            else:
                dweight = weight_grad()
        dbiases = [g.sum(0) if (g is not None and ctx.needs_input_grad[6 + i]) else None
                   for i, g in enumerate(grads)]
        if work is not None:
            work.wait()
        return (dx, dweight, None, None, None, None, *dbiases)


class _RowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, cols, store, *inputs):
        ctx.cols, ctx.store = cols, store
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, *inputs)
        out = inputs[0].new_empty(*inputs[0].shape[:-1], weight.shape[0])
        y, c = out.view(-1, weight.shape[0]), 0  # `out` is returned, not a view
        for i, (n, x) in enumerate(zip(cols, inputs)):
            w = weight[:, c:c + n]
            if i > 0:
                y.addmm_(_flat(x), w.t())
            elif bias is not None:
                torch.addmm(bias, _flat(x), w.t(), out=y)
            else:
                torch.mm(_flat(x), w.t(), out=y)
            c += n
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, *inputs = ctx.saved_tensors
        g = _flat(grad)
        cols = ctx.cols
        dinputs, c = [], 0
        for i, (n, x) in enumerate(zip(cols, inputs)):
            w = weight[:, c:c + n]
            dinputs.append((g @ w).view(x.shape) if ctx.needs_input_grad[4 + i] else None)
            c += n

        def weight_grad() -> torch.Tensor:
            out, c = torch.empty_like(weight), 0
            for n, x in zip(cols, inputs):
                torch.mm(g.t(), _flat(x), out=out[:, c:c + n])
                c += n
            return out

        dweight = None
        if ctx.needs_input_grad[0]:
            if ctx.store is not None and ctx.store.deferring:
                ctx.store.put(weight, weight_grad)     # the W pass computes it
            else:
                dweight = weight_grad()
        dbias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return (dweight, dbias, None, None, *dinputs)


def column_linear(x: torch.Tensor, weight: torch.Tensor, group: Group, rows: Sequence[int],
                  biases: Sequence[torch.Tensor | None],
                  sequence_parallel: SequenceParallelMode | None = None,
                  weight_grads: DeferredWeightGrads | None = None
                  ) -> tuple[torch.Tensor, ...]:
    """Outputs [..., rows[g]] for each consecutive row block of `weight` [sum(rows), in].

    `sequence_parallel` None: x [s, b, in] replicated; backward all-reduces dx over `group`.
    "keep" or "regather": x [s/t, b, in] is this rank's sequence shard, all-gathered in
    forward; backward reduce-scatters dx. "keep" saves the gathered input for the weight
    gradient (one all-gather each way); "regather" saves only the shard and all-gathers it
    again in backward, overlapped with the input gradient (activation memory / t).
    `weight_grads`: a `weight_grad.WeightGradStore`; while it defers, backward leaves dW
    to its W pass."""
    if sequence_parallel not in (None, "keep", "regather"):
        raise ValueError(f"unknown sequence-parallel mode {sequence_parallel!r}")
    if group.size == 1:
        sequence_parallel = None
    return _ColumnLinear.apply(x, weight, group, tuple(rows), sequence_parallel, weight_grads,
                               *biases)


def row_linear(inputs: Sequence[torch.Tensor], weight: torch.Tensor, cols: Sequence[int],
               bias: torch.Tensor | None = None,
               weight_grads: DeferredWeightGrads | None = None) -> torch.Tensor:
    """sum_g inputs[g] @ weight[:, block g]^T (+ bias): [..., out]. No communication.
    `weight_grads`: as for `column_linear`."""
    return _RowLinear.apply(weight, bias, tuple(cols), weight_grads, *inputs)
