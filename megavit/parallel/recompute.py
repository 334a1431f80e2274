"""Activation recomputation: run a region without keeping its intermediate activations,
and run it again in backward.

`recompute(fn, *args, rng=tracker)` keeps only the region's tensor inputs (saved with
`save_for_backward`, so `torch.autograd.graph.saved_tensors_hooks` sees exactly what is
kept) and the RNG streams as they were: the CPU's and the input devices' default generators,
and the tracker's named streams. In backward it restores those streams, re-runs `fn` with autograd
on, back-propagates through it, then puts the streams back, so dropout inside the region
draws the same masks twice and the run continues as if nothing had been recomputed.

Megatron's semantics for the layers recomputed (`--recompute-granularity`):
    selective   the attention core of every block (QK-norms, softmax(QK^T)V)
    full        uniform: chunks of N consecutive blocks, only each chunk's input kept
                block:   the first N blocks of the stage, each on its own
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from megavit.parallel.random import RNGTracker


def _device_states(tensors) -> dict[torch.device, torch.Tensor]:
    """The default generators' states of the CUDA devices the region's inputs live on."""
    devices = {t.device for t in tensors if t.is_cuda}
    return {d: torch.cuda.get_rng_state(d) for d in devices}


def _set_device_states(states: dict[torch.device, torch.Tensor]) -> None:
    for d, state in states.items():
        torch.cuda.set_rng_state(state, d)


class _Recompute(torch.autograd.Function):
    # `anchor` is an empty tensor that requires grad: it makes the output require grad even
    # when no input does (frozen embeddings, a detached stage input), so backward always
    # reaches the region and its parameters get their gradients.
    @staticmethod
    def forward(ctx, fn, rng, layout, anchor, *tensors):
        ctx.fn, ctx.rng, ctx.layout = fn, rng, layout
        ctx.cpu_state = torch.get_rng_state()
        ctx.device_states = _device_states(tensors)
        ctx.rng_states = rng.get_states() if rng is not None else None
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            out = fn(*_place(layout, tensors))
        ctx.single = torch.is_tensor(out)
        return out if ctx.single else tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        cpu_now, devices_now = torch.get_rng_state(), _device_states(tensors)
        states_now = ctx.rng.get_states() if ctx.rng is not None else None
        torch.set_rng_state(ctx.cpu_state)
        _set_device_states(ctx.device_states)
        if ctx.rng is not None:
            ctx.rng.set_states(ctx.rng_states)
        try:
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            with torch.enable_grad():
                out = ctx.fn(*_place(ctx.layout, inputs))
        finally:
            torch.set_rng_state(cpu_now)
            _set_device_states(devices_now)
            if ctx.rng is not None:
                ctx.rng.set_states(states_now)
        outs = (out,) if ctx.single else tuple(out)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None,
                *(i.grad if i.requires_grad else None for i in inputs))


_TENSOR = object()


def _place(layout: tuple, tensors) -> list:
    """Put the tensors back among the other arguments."""
    it = iter(tensors)
    return [next(it) if a is _TENSOR else a for a in layout]


def recompute(fn: Callable[..., Any], *args: Any, rng: RNGTracker | None = None) -> Any:
    """fn(*args), keeping only the tensor arguments (and RNG states) for backward and
    running `fn` again there. Non-tensor arguments (ints, None, flags) pass through."""
    layout = tuple(_TENSOR if torch.is_tensor(a) else a for a in args)
    tensors = [a for a in args if torch.is_tensor(a)]
    anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
    return _Recompute.apply(fn, rng, layout, anchor, *tensors)
