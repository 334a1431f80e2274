"""`--save` / `--load` for the training loop: the directory protocol of `directory.py`
around the training state of `training_state.py`.

Saving (every rank calls `save_checkpoint`): rank 0 prepares `.staging-iter_N/`, every rank
writes its part of the DCP checkpoint into it, then rank 0 syncs and renames it into place,
moves the pointer and prunes (`--keep-last-checkpoints`); barriers (all-reduces on the world
group) separate the phases, so no rank goes on before the checkpoint is complete.
Resuming (`resume`): every rank reads the pointer of `--load` and loads the training state
it names, at whatever layout this run has.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from megavit.checkpointing.checkpointable import Checkpointable
from megavit.checkpointing.directory import CheckpointDirectory, CheckpointDirectoryError
from megavit.checkpointing.model_state import CheckpointLoadError, check_pieces
from megavit.checkpointing.pieces import serial_meta_model
from megavit.checkpointing.training_state import load_training_state, save_training_state

CONFIG_FILE = "megavit_config.json"


_MAY_CHANGE = {"hidden_dropout", "attention_dropout", "drop_path_rate", "lock_image_tower",
               "image_checkpoint", "contrastive_queue_size", "image_text_data",
               "image_text_path", "fatal_data_errors", "tokenizer_model", "zero_shot_transfer",
               "num_workers", "siglip_chunks"}


def config_defaults(section: str) -> dict:
    """The defaults of a config section's fields (a checkpoint written before a field
    existed was built with its default)."""
    from megavit.config import ContrastiveConfig, ModelConfig, TextConfig, section_to_dict

    kind = {"model": ModelConfig, "text": TextConfig,
            "contrastive": ContrastiveConfig}.get(section)
    return section_to_dict(kind()) if kind else {}


def config_differences(section: str, saved: dict, current: dict,
                       may_change: Callable[[str], bool]) -> list[str]:
    """"--flag A in the checkpoint, B here" for each field of `current` that the `saved`
    section (its missing fields taken at their defaults) has otherwise, but those
    `may_change` allows."""
    saved = {**config_defaults(section), **saved}    # fields added since it was written
    return [f"--{k.replace('_', '-')} {saved.get(k)!r} in the checkpoint, {v!r} here"
            for k, v in current.items() if saved.get(k) != v and not may_change(k)]


def check_model_config(checkpoint: Path, run: Checkpointable) -> None:
    """Refuse a checkpoint of another model, naming every field that differs (the fields of
    `_MAY_CHANGE` — regularisation and, for two towers, data and LiT settings — may change
    between runs)."""
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        raise CheckpointLoadError(f"{path}: missing; not a megavit checkpoint")
    saved_info = json.loads(path.read_text())
    current_info = run.describe()
    differ = []
    for section in ("model", "text", "contrastive"):
        saved, current = saved_info.get(section), current_info.get(section)
        if saved is None and current is None:
            continue
        if saved is None or current is None:
            differ.append(f"a {'two-tower' if saved is not None else 'ViT'} checkpoint, a "
                          f"{'two-tower' if current is not None else 'ViT'} run here")
            continue
        differ += config_differences(section, saved, current, _MAY_CHANGE.__contains__)
        differ += [f"{k} {saved[k]!r} in the checkpoint, unknown here"
                   for k in saved if k not in current]
    if differ:
        raise CheckpointLoadError(f"{checkpoint}: a different model, not loaded: "
                                  + "; ".join(differ))


def preprocessing_change(saved_info: dict, current_info: dict) -> str | None:
    """A note when the run's images are prepared otherwise than the checkpoint's were (its
    "preprocessing" section: data, not the model, so it never refuses a load; a checkpoint
    written before the section existed has none), else None."""
    saved, current = saved_info.get("preprocessing"), current_info.get("preprocessing")
    if saved is None or saved == current:
        return None
    return (f"the checkpoint was trained on images preprocessed as {saved}; this run's are "
            f"{current} and its checkpoints record that")

def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the latest one of a --save directory."""
    if (path / CONFIG_FILE).is_file():
        return path
    latest = CheckpointDirectory(path).latest()
    if latest is None:
        raise CheckpointDirectoryError(f"{path}: neither a checkpoint nor a --save directory "
                                       "with one")
    return latest


def _barrier(run: Checkpointable) -> None:
    run.pstate.world.all_reduce(torch.zeros(1, device=run.pstate.device))


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def save_checkpoint(run: Checkpointable, save_dir: str, iteration: int, keep: int,
                    info: Callable[[str], None]) -> Path:
    """Save the state to continue at `iteration` as SAVE/iter_<iteration>; returns it."""
    start = time.perf_counter()
    directory = CheckpointDirectory(save_dir)
    main = run.pstate.rank == 0
    staging = directory.staging_path(iteration)
    if main:
        staging = directory.staging(iteration)
        (staging / CONFIG_FILE).write_text(json.dumps({**run.describe(), "iteration": iteration},
                                                      indent=1, sort_keys=True) + "\n")
        for name, data in run.checkpoint_files().items():     # e.g. a two-tower run's tokenizer
            (staging / name).write_bytes(data)
    _barrier(run)
    save_training_state(run, staging, iteration)
    _barrier(run)
    final = directory.path_of(iteration)
    if main:
        final = directory.commit(iteration)
        if keep:
            directory.prune(keep)
    _barrier(run)
    info(f"saved checkpoint | iteration {iteration} | path {final} | size_mb "
         f"{_size_mb(final):.1f} | seconds {time.perf_counter() - start:.2f}")
    return final


def resume(run: Checkpointable, load_dir: str | None, info: Callable[[str], None]) -> int:
    """Load the latest checkpoint of `load_dir` into `run`; returns the iteration to
    continue at (0 when there is nothing to load)."""
    if not load_dir:
        return 0
    latest = CheckpointDirectory(load_dir).latest()
    if latest is None:
        info(f"no checkpoint in {load_dir}: starting from scratch")
        return 0
    start = time.perf_counter()
    check_model_config(latest, run)
    for name, data in run.checkpoint_files().items():     # e.g. the tokenizer: its ids index the embedding
        if (latest / name).is_file() and (latest / name).read_bytes() != data:
            raise CheckpointLoadError(f"{latest / name}: differs from this run's {name}; the "
                                      "checkpoint was trained with another one, not loaded")
    description = run.describe()
    check_pieces(latest, serial_meta_model(description, 1), prefix="model/")
    saved_info = json.loads((latest / CONFIG_FILE).read_text())
    saved = saved_info["layout"]
    same = saved == description["layout"]
    iteration = load_training_state(run, latest, same_layout=same)
    if note := preprocessing_change(saved_info, description):
        info(note)
    if not same:
        info(f"checkpoint saved at {saved}; this run's layout differs: weights and optimizer "
             "state resharded, dropout RNG streams start afresh")
    info(f"loaded checkpoint | iteration {iteration} | path {latest} | seconds "
         f"{time.perf_counter() - start:.2f}")
    return iteration
