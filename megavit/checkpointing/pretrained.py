"""Fine-tuning from weights only (`--finetune`, `--pretrained-checkpoint`).

The optimizer, loss scaler, iteration, data position and lr schedule of the checkpoint are
not read: the run starts at iteration 0 with the weights of the checkpoint, from any saved
layout into any layout (the pieces of `model_state.py` are layout-independent). Two
differences from the checkpoint's model are allowed, every other one is refused field by
field as on resume:

    --num-classes     the classifier (`head.weight`, `head.bias`) keeps its fresh init
                      (from the run's seed, as in every layout); a checkpoint's classifier
                      is dropped when this run has another or none
    --img-h / --img-w learned position tables (`pos_embed.weight`, also a two-tower
                      model's `image.pos_embed.weight`) are read at the checkpoint's grid
                      and resized by bicubic interpolation to this run's grid; learned-2d
                      row / column tables along their axis; rope-2d has no table

    notes = load_pretrained_weights(run, Path("runs/pretrain/ckpt"), log.info)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from megavit.checkpointing.checkpointable import Checkpointable
from megavit.checkpointing.errors import CheckpointLoadError
from megavit.checkpointing.model_config import finetune_differences, read_checkpoint_info
from megavit.checkpointing.model_state import (check_loadable, load_state, model_state_dict,
                                               write_back)
from megavit.parallel.full_sharding import assign
from megavit.checkpointing.pieces import piece_blocks, serial_meta_model
from megavit.checkpointing.safe_reader import check_checkpoint
from megavit.models.vit import resize_axis_table, resize_pos_embed

CLASSIFIER = ("head.weight", "head.bias")
POSITION_TABLE = "pos_embed.weight"
AXIS_TABLES = {"pos_embed.row_weight": 0, "pos_embed.col_weight": 1}   # learned-2d: axis
RESOLUTION_FIELDS = ("img_h", "img_w")


def _grid(model_section: dict) -> tuple[int, int]:
    patch = model_section["patch_dim"]
    return model_section["img_h"] // patch, model_section["img_w"] // patch


def _plan(saved_info: dict, current_info: dict, stored: dict[str, torch.Size],
          expected: dict[str, torch.Size], checkpoint: Path, reset_classifier: bool
          ) -> tuple[set[str], set[str], list[str]]:
    """(pieces to leave at their init, position tables to resize, log notes) for loading
    the `stored` pieces into a model with the `expected` ones; CheckpointLoadError naming
    every other difference."""
    saved_model, model = saved_info["model"], current_info["model"]
    classes_differ = (saved_model.get("num_classes") != model.get("num_classes")
                      or reset_classifier)
    # the grid, not the table's shape: 32x16 px and 16x32 px hold as many patches
    grid_differs = _grid(saved_model) != _grid(model)
    fresh = {k for k in expected if classes_differ and k in CLASSIFIER}
    resize = {k for k in expected if grid_differs and k in stored
              and k.endswith((POSITION_TABLE, *AXIS_TABLES))}
    problems = []
    for name, shape in expected.items():
        if name in fresh or name in resize:
            continue
        if name not in stored:
            problems.append(f"{name} missing")
        elif stored[name] != shape:
            problems.append(f"{name} {list(stored[name])} (model: {list(shape)})")
    dropped = sorted(k for k in stored if k not in expected and k in CLASSIFIER)
    problems += [f"{k} not in this model" for k in sorted(stored) if k not in expected
                 and k not in CLASSIFIER]
    if problems:
        raise CheckpointLoadError(f"{checkpoint}: tensors do not fit this model, nothing was "
                                  "loaded: " + "; ".join(problems))
    notes = []
    if classes_differ:
        why = ("--reset-classifier" if saved_model.get("num_classes") == model.get("num_classes")
               else f"{saved_model.get('num_classes')} classes in the checkpoint, "
               f"{model.get('num_classes')} here")
        notes.append(f"classifier re-initialised: {why}"
                     + (f" (its {', '.join(dropped)} dropped)" if dropped and not fresh else ""))
    if resize:
        old, new = _grid(saved_model), _grid(model)
        notes.append(f"position table resized from {old[0]}x{old[1]} to {new[0]}x{new[1]} "
                     f"patches ({saved_model['img_h']}x{saved_model['img_w']} -> "
                     f"{model['img_h']}x{model['img_w']} px, bicubic; learned-2d tables "
                     "along their axis; rope-2d has none): "
                     + ", ".join(sorted(resize)))
    elif grid_differs:
        old, new = _grid(saved_model), _grid(model)
        notes.append(f"grid {old[0]}x{old[1]} -> {new[0]}x{new[1]} patches: no position table "
                     f"to resize ({model.get('position_embedding_type', 'learned')} positions "
                     "are computed for the new grid)")
    return fresh, resize, notes


@torch.no_grad()
def load_pretrained_weights(run: Checkpointable, checkpoint: Path,
                            info: Callable[[str], None], reset_classifier: bool = False) -> None:
    """Load the weights of `checkpoint` (a checkpoint directory) into `run`'s model; the
    fp32 masters follow. Every rank calls it; the checks run on every rank alike, so a
    refusal is raised everywhere before any tensor is read."""
    start = time.perf_counter()
    check_loadable(checkpoint)
    saved_info = read_checkpoint_info(checkpoint)
    current_info = run.describe()
    if differ := finetune_differences(saved_info, current_info):
        raise CheckpointLoadError(f"{checkpoint}: a different model, not loaded: "
                                  + "; ".join(differ))
    stored = {k[len("model/"):]: torch.Size(md.size) for k, md in
              check_checkpoint(checkpoint).state_dict_metadata.items()
              if k.startswith("model/")}
    expected = {k: shape for k, (shape, _) in
                piece_blocks(serial_meta_model(current_info, 1), 1).items()}
    fresh, resize, notes = _plan(saved_info, current_info, stored, expected, checkpoint,
                                 reset_classifier)
    gathered: list = []
    local = model_state_dict(run.model, run.pstate, gathered)
    params = dict(run.model.named_parameters())
    state = {f"model/{k}": v for k, v in local.items() if k not in fresh and k not in resize}
    tables = {k: torch.empty(stored[k], dtype=params[k].dtype, device=params[k].device)
              for k in local if k in resize}     # replicated over TP: read whole, resized
    state.update({f"model/{k}": v for k, v in tables.items()})
    load_state(state, checkpoint, run.pstate, "model")
    write_back(gathered)
    if tables:
        old, new = _grid(saved_info["model"]), _grid(current_info["model"])
        for name, table in tables.items():
            axis = next((a for suffix, a in AXIS_TABLES.items() if name.endswith(suffix)), None)
            assign(params[name], resize_pos_embed(table, old, new) if axis is None
                   else resize_axis_table(table, new[axis]))
    run.optimizer.copy_params_to_masters()
    for note in notes:
        info(note)
    info(f"loaded pretrained weights | iteration 0 (the checkpoint's "
         f"{saved_info.get('iteration', '?')} not continued) | path {checkpoint} | seconds "
         f"{time.perf_counter() - start:.2f}")
