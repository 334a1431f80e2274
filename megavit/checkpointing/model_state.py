"""Model weights through `torch.distributed.checkpoint` (DCP), readable at any layout.

Each rank describes the parameters of its pipeline stage as pieces (`pieces.py`): serial
names and shapes, this rank's block of each. In a process group every piece is a DTensor on
the stage's (dp, tp) mesh — replicated over dp (DCP writes one copy), sharded over tp along
its dimension — built on a *view* of the local parameter, so loading writes straight into
the model. Pipeline stages own disjoint names. Written at one layout, the same files load at
any TP / DP / PP / virtual-PP layout (and in one process): DCP reads, for each piece, the
blocks that overlap what this rank now owns. Loading checks every name and shape against the
checkpoint before any data is read, so a mismatch leaves the model untouched.

`training_state.py` adds the optimizer, the loss scaler, RNG and the iteration to this state.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from megavit.checkpointing.errors import CheckpointLoadError
from megavit.checkpointing.pieces import meta_model, piece_blocks, pieces_of
from megavit.checkpointing.safe_reader import (CheckpointReadError, SafeFileSystemReader,
                                               check_checkpoint, failure_causes)
from megavit.parallel.full_sharding import is_fully_sharded, local_tensor, scatter_into
from megavit.parallel.sharding import get_tp_shard
from megavit.parallel.state import ParallelState


def pieces_state(tensors: list[tuple[str, torch.Tensor, torch.Tensor]],
                 pstate: ParallelState) -> dict[str, torch.Tensor]:
    """{piece name: this rank's block} for (parameter name, parameter, tensor shaped like
    the parameter) triples: DTensors on the stage's (dp, tp) mesh over views of the tensors
    when distributed, the tensors' pieces themselves in one process."""
    out: dict[str, torch.Tensor] = {}
    mesh = pstate.mesh["dp", "tp"] if pstate.mesh is not None else None
    for name, param, tensor in tensors:
        shard = get_tp_shard(param)
        for piece in pieces_of(name, tensor, shard):
            if mesh is None:
                out[piece.name] = piece.local
                continue
            from torch.distributed.tensor import DTensor, Replicate, Shard

            placements = [Replicate(), Shard(shard.dim) if shard is not None else Replicate()]
            stride = torch.empty(piece.global_shape, device="meta").stride()
            out[piece.name] = DTensor.from_local(piece.local, mesh, placements,
                                                 run_check=False, shape=piece.global_shape,
                                                 stride=stride)
    return out


def model_state_dict(model: nn.Module, pstate: ParallelState,
                     gathered: list | None = None) -> dict[str, torch.Tensor]:
    """{piece name: this rank's block of it} for every parameter of this rank's stage.
    A parameter fully sharded over dp (FSDP2) is gathered to its TP-local shape first (a
    collective on dp; a transient copy): loading into such a state fills the copies, so
    pass a list as `gathered` and hand it to `write_back` after loading."""
    tensors = [(n, p, local_tensor(p)) for n, p in model.named_parameters()]
    if gathered is not None:
        gathered.extend(tensors)
    return pieces_state(tensors, pstate)


def write_back(gathered: list) -> None:
    """After loading into a state built with `gathered`: each fully sharded parameter takes
    this rank's rows of its loaded copy (the others were filled in place)."""
    for _, param, tensor in gathered:
        if is_fully_sharded(param):
            scatter_into(param, tensor)


def save_model(model: nn.Module, pstate: ParallelState, path: str | os.PathLike) -> None:
    """Write the model's weights to the directory `path` (every rank calls it)."""
    dcp.save(model_state_dict(model, pstate), checkpoint_id=os.fspath(path),
             no_dist=pstate.mesh is None)


def check_loadable(path: str | os.PathLike) -> None:
    """Before any state is prepared: the directory exists and its files are safe, complete
    and not truncated."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    check_checkpoint(path)


def check_pieces(path: str | os.PathLike, serial_model: nn.Module, prefix: str = "") -> None:
    """The checkpoint's entries under `prefix` are exactly the pieces of `serial_model` (the
    whole model as one process builds it, e.g. on the meta device), with its shapes:
    anything missing, extra or differently shaped is named (DCP alone would skip extra
    entries silently)."""
    expected = {prefix + k: shape for k, (shape, _) in piece_blocks(serial_model, 1).items()}
    stored = {k: torch.Size(md.size) for k, md in check_checkpoint(path)
              .state_dict_metadata.items() if k.startswith(prefix)}

    def some(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    problems = []
    if missing := sorted(expected.keys() - stored.keys()):
        problems.append(f"{len(missing)} missing ({some(missing)})")
    if extra := sorted(stored.keys() - expected.keys()):
        problems.append(f"{len(extra)} not in this model ({some(extra)})")
    if shapes := sorted(f"{k} {list(stored[k])} (model: {list(v)})" for k, v in expected.items()
                        if k in stored and stored[k] != v):
        problems.append(f"{len(shapes)} shaped differently ({some(shapes)})")
    if problems:
        raise CheckpointLoadError(f"{path}: tensors do not fit this model, nothing was loaded: "
                                  + "; ".join(problems))


@torch.no_grad()
def load_state(state: dict[str, torch.Tensor], path: str | os.PathLike, pstate: ParallelState,
               what: str) -> None:
    """DCP-load `state` (tensors or DTensors over views, filled in place) from `path`
    through the allowlisting reader; a missing or differently shaped piece raises
    `CheckpointLoadError` on every rank before any data is read."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():   # no_dist: "assuming ... a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=os.fspath(path),
                     storage_reader=SafeFileSystemReader(os.fspath(path)),
                     no_dist=pstate.mesh is None)
    except CheckpointException as e:
        for failure in getattr(e, "failures", {}).values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, CheckpointReadError):
                raise type(cause)(str(cause)) from e
        raise CheckpointLoadError(f"{path}: does not fit this {what}, nothing was loaded: "
                                  + failure_causes(e)) from e


def load_model(model: nn.Module, pstate: ParallelState, path: str | os.PathLike) -> None:
    """Read weights written by `save_model` at any layout into `model`, in place."""
    check_loadable(path)
    check_pieces(path, meta_model(model.cfg, 1))
    gathered: list = []
    load_state(model_state_dict(model, pstate, gathered), path, pstate, "model")
    write_back(gathered)
