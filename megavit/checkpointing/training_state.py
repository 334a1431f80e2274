"""The whole training state as one DCP checkpoint: weights, optimizer, scaler, iteration.

    model/<piece>                 the parameters (`model_state.py`)
    optimizer/<key>/<piece>       Adam's exp_avg and exp_avg_sq, and the fp32 master weights
                                  when parameters are 16-bit — all shaped like the parameters
    optimizer/step                Adam's step count (the same for every parameter)
    scaler                        [scale, clean steps, allowances] (absent without a scaler)
    iteration                     the next iteration to run; the data order and the lr follow
                                  from it, so it is also the data position
    rng/rank<r>/<stream>          rank r's dropout RNG streams (default and model-parallel):
                                  loaded only at the layout they were saved at (elsewhere the
                                  streams start afresh; drop-path needs none: it is keyed)

Optimizer state is stored shaped like the parameters, never as ZeRO-1 flat shards, so it
loads under any layout and with or without the distributed optimizer. Sharded, each rank
fills its ranges of one flat buffer per key and the buffer is all-gathered over dp (saving)
or read whole and cut back to the rank's ranges (loading): a transient full copy of this
rank's TP/PP part per key.

`checkpointer.py` wraps this in the directory protocol of `directory.py`.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp

from megavit.checkpointing.checkpointable import Checkpointable
from megavit.checkpointing.model_state import (check_loadable, load_state, model_state_dict,
                                               pieces_state, write_back)

MOMENTS = ("exp_avg", "exp_avg_sq")


def _keys(run: Checkpointable) -> tuple[str, ...]:
    """The optimizer tensors saved: the moments, and the fp32 masters of a 16-bit run
    (fully sharded, the masters are the sharded parameters themselves, saved also here so
    the checkpoint reads the same as a ZeRO-1 one)."""
    precision = run.cfg.precision
    masters = run.optimizer.separate_masters or (
        run.buffers.strategy == "full" and (precision.bf16 or precision.fp16))
    return MOMENTS + (("master",) if masters else ())


def _ensure_adam_state(run: Checkpointable) -> None:
    """Adam creates its state at the first step; a run about to load one needs it now."""
    for m in run.optimizer.masters:
        state = run.optimizer.adamw.state[m]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=m.device)
            for key in MOMENTS:
                state[key] = torch.zeros_like(m, memory_format=torch.preserve_format)


def _segment_tensor(run: Checkpointable, master: torch.Tensor, key: str) -> torch.Tensor:
    t = master.detach() if key == "master" else run.optimizer.adamw.state[master][key]
    return t.reshape(-1)


def _flat_buffers(run: Checkpointable, gather: bool) -> dict[str, torch.Tensor]:
    """One flat buffer per key laid out like the gradient buffer; with `gather`, filled
    with this rank's optimizer state (all-gathered over dp when sharded)."""
    buffers = run.buffers
    out = {}
    for key in _keys(run):
        flat = torch.zeros(buffers.numel, dtype=torch.float32, device=run.pstate.device)
        if gather:
            for s, m in zip(run.optimizer.segments, run.optimizer.masters):
                a, b = s.buffer_range
                flat[a:b].copy_(_segment_tensor(run, m, key))
            if buffers.shard:
                buffers.gather_shards(flat)
        out[key] = flat
    return out


def _optimizer_state_dict(run: Checkpointable, flats: dict[str, torch.Tensor]) -> dict:
    buffers, out = run.buffers, {}
    for key, flat in flats.items():
        shaped = []
        for name, p in run.model.named_parameters():
            if id(p) in buffers.offsets:
                start = buffers.offsets[id(p)]
                shaped.append((name, p, flat[start:start + p.numel()].view(p.shape)))
        out.update({f"optimizer/{key}/{k}": v
                    for k, v in pieces_state(shaped, run.pstate).items()})
    return out


def _scalars(run: Checkpointable, iteration: int) -> dict[str, torch.Tensor]:
    device = run.pstate.device
    first = run.optimizer.masters[0] if run.optimizer.masters else None
    step = run.optimizer.adamw.state[first]["step"] if first is not None and \
        run.optimizer.adamw.state[first] else torch.zeros(())
    # A rank with nothing to train (a locked image tower's pipeline stage) has no Adam step;
    # every rank stores the same value, whichever copy DCP keeps (one MAX all-reduce).
    step = run.pstate.world.all_reduce(step.detach().clone().float().reshape(1).to(device),
                                       op=torch.distributed.ReduceOp.MAX).reshape(())
    out = {"iteration": torch.tensor(float(iteration), device=device),
           "optimizer/step": step}
    if run.scaler is not None:
        st = run.scaler.state_dict()
        out["scaler"] = torch.tensor([st["scale"], st.get("clean_steps", 0),
                                      st.get("allowances", 0)], dtype=torch.float64,
                                     device=device)
    return out


def _rng_states(run: Checkpointable) -> dict[str, torch.Tensor]:
    rng = run.rng
    if rng is None:
        return {}
    return {f"rng/rank{run.pstate.rank}/{name or 'default'}": state
            for name, state in rng.get_states().items()}


def save_training_state(run: Checkpointable, path: str | os.PathLike, iteration: int) -> None:
    """Everything needed to continue at `iteration`, into the directory `path` (every rank
    calls it)."""
    _ensure_adam_state(run)
    state = {f"model/{k}": v for k, v in model_state_dict(run.model, run.pstate).items()}
    state.update(_optimizer_state_dict(run, _flat_buffers(run, gather=True)))
    state.update(_scalars(run, iteration))
    state.update(_rng_states(run))
    with warnings.catch_warnings():   # no_dist: "assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=os.fspath(path), no_dist=run.pstate.mesh is None)


@torch.no_grad()
def load_training_state(run: Checkpointable, path: str | os.PathLike,
                        same_layout: bool = False) -> int:
    """Load a state written by `save_training_state` at any layout into `run`; returns the
    iteration to continue at. `same_layout`: it was saved at this run's layout, so the
    dropout RNG streams are restored too."""
    check_loadable(path)
    _ensure_adam_state(run)
    flats = _flat_buffers(run, gather=False)
    gathered: list = []
    state = {f"model/{k}": v for k, v in
             model_state_dict(run.model, run.pstate, gathered).items()}
    state.update(_optimizer_state_dict(run, flats))
    scalars = _scalars(run, 0)
    state.update(scalars)
    rng = _rng_states(run) if same_layout else {}
    state.update(rng)
    load_state(state, path, run.pstate, "run")
    write_back(gathered)
    for s, m in zip(run.optimizer.segments, run.optimizer.masters):
        a, b = s.buffer_range
        adam = run.optimizer.adamw.state[m]
        adam["step"].copy_(scalars["optimizer/step"].to(adam["step"].dtype))
        for key in _keys(run):
            _segment_tensor(run, m, key).copy_(flats[key][a:b])
    if "master" in flats:     # 16-bit parameters follow their loaded fp32 masters
        run.optimizer.copy_masters_to_params()
    if rng:
        prefix = f"rng/rank{run.pstate.rank}/"
        restored = {("" if k == prefix + "default" else k[len(prefix):]): v
                    for k, v in rng.items()}
        run.rng.set_states(restored)
    if run.scaler is not None:
        scale, clean, allowances = scalars["scaler"].tolist()
        run.scaler.load_state_dict({"scale": scale, "clean_steps": int(clean),
                                    "allowances": int(allowances)})
    return int(scalars["iteration"].item())
