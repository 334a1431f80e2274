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
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from megavit.checkpointing.checkpointable import Checkpointable
from megavit.checkpointing.directory import (TRACKER, CheckpointDirectory,
                                             CheckpointDirectoryError)
from megavit.checkpointing.model_config import (CONFIG_FILE, check_model_config,
                                                read_checkpoint_info)
from megavit.checkpointing.model_state import CheckpointLoadError, check_pieces
from megavit.checkpointing.pieces import serial_meta_model
from megavit.checkpointing.training_state import load_training_state, save_training_state



def preprocessing_change(saved_info: dict, current_info: dict) -> str | None:
    """A note when the run's images are prepared otherwise than the checkpoint's were (its
    "preprocessing" section: data, not the model, so it never refuses a load; a checkpoint
    written before the section existed has none), else None."""
    saved, current = saved_info.get("preprocessing"), current_info.get("preprocessing")
    if saved is None or saved == current:
        return None
    return (f"the checkpoint was trained on images preprocessed as {saved}; this run's are "
            f"{current} and its checkpoints record that")

def teacher_change(saved_info: dict, current_info: dict) -> str | None:
    """A note when a distillation run resumes with another teacher than the checkpoint's
    (their megavit_config.json hashes differ), else None: the teacher is a flag of the
    run, not part of the student's state, so it never refuses a load."""
    saved, current = saved_info.get("distillation"), current_info.get("distillation")
    if not saved or not current:
        return None
    key = "teacher_config_sha256"
    if saved.get(key) == current.get(key):
        return None
    def where(section: dict) -> str:
        return section.get("teacher_checkpoint") or f"cache {section.get('teacher_cache')}"
    return (f"the checkpoint was distilled from the teacher at {where(saved)} "
            f"(config sha256 {str(saved.get(key))[:12]}); this run's teacher is "
            f"{where(current)} (sha256 {str(current.get(key))[:12]}) and trains on from here")


def resolve_checkpoint(path: Path, flag: str = "") -> Path:
    """A checkpoint directory itself, or the latest one of a --save directory. Errors name
    `path` (after `flag`, e.g. '--load', when given) and what it is instead."""
    latest = checkpoint_to_load(flag, str(path))
    if latest is None:
        why = "no such directory" if not path.exists() else "it is empty"
        raise CheckpointDirectoryError(f"{_named(flag, path)}: neither a checkpoint nor a --save "
                                       f"directory with one ({why})")
    return latest


def _named(flag: str, path: str | Path) -> str:
    return f"{flag} {path}" if flag else str(path)


def _barrier(run: Checkpointable) -> None:
    run.pstate.world.all_reduce(torch.zeros(1, device=run.pstate.device))


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def save_checkpoint(run: Checkpointable, save_dir: str, iteration: int, keep: int,
                    info: Callable[[str], None]) -> Path:
    """Save the state to continue at `iteration` as SAVE/iter_<iteration>; returns it."""
    try:
        return _save(run, save_dir, iteration, keep, info)
    except BaseException:   # e.g. Ctrl-C twice, a failed collective: leave no half save
        if run.pstate.rank == 0:
            shutil.rmtree(CheckpointDirectory(save_dir).staging_path(iteration),
                          ignore_errors=True)
        raise


def _save(run: Checkpointable, save_dir: str, iteration: int, keep: int,
          info: Callable[[str], None]) -> Path:
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


def checkpoint_to_load(flag: str, path: str, info: Callable[[str], None] = print,
                       save_dir: str | None = None) -> Path | None:
    """The checkpoint that `flag` (--load, --pretrained-checkpoint) names with `path`: a
    checkpoint directory itself (iter_N/), the latest of a --save directory, or — when the
    pointer file is missing (a save killed between its rename and the pointer) — the
    newest complete iter_N/ in it, with a note. None for a missing or empty directory (or
    one holding only an unfinished first save), and for the run's own --save directory
    (`save_dir`) holding no checkpoint yet whatever else it holds (metrics, logs), with a
    note. CheckpointDirectoryError naming what any other directory holds."""
    root = Path(path)
    if (root / CONFIG_FILE).is_file():
        return root
    if not root.is_dir():
        if root.exists():
            raise CheckpointDirectoryError(f"{_named(flag, path)}: a file, not a checkpoint "
                                           "directory")
        return None
    directory = CheckpointDirectory(root)
    latest = directory.latest()
    if latest is not None:
        return latest
    complete = [p for _, p in directory.complete() if (p / CONFIG_FILE).is_file()
                and (p / ".metadata").is_file()]
    if complete:
        info(f"{flag} {path}: no {TRACKER} (a save stopped before writing it); using the "
             f"newest complete checkpoint, {complete[-1].name}")
        return complete[-1]
    entries = sorted(p.name for p in root.iterdir())
    others = [e for e in entries if not e.startswith(".staging-")]
    if not others:
        return None
    if save_dir and os.path.realpath(save_dir) == os.path.realpath(root):
        info(f"{flag} {path}: no checkpoint yet (it holds {', '.join(others[:4])}"
             f"{' ...' if len(others) > 4 else ''})")
        return None
    raise CheckpointDirectoryError(_not_a_checkpoint(flag, root, entries))


def _not_a_checkpoint(flag: str, root: Path, entries: list[str]) -> str:
    """What a directory without a checkpoint holds, and where a checkpoint may be."""
    shown = ", ".join(e + ("/" if (root / e).is_dir() else "") for e in entries[:6])
    more = f" and {len(entries) - 6} more" if len(entries) > 6 else ""
    below = sorted(str(t.parent) for t in root.glob(f"*/{TRACKER}"))
    below += sorted(str(t.parent) for t in root.glob(f"*/*/{TRACKER}"))
    hint = f"; did you mean {_named(flag, below[0])}?" if below else ""
    return (f"{_named(flag, root)}: neither a checkpoint (no {CONFIG_FILE}) nor a --save "
            "directory "
            f"(no {TRACKER}); it holds {shown}{more}{hint}")


def resume(run: Checkpointable, load_dir: str | None, info: Callable[[str], None],
           finetune: bool = False, pretrained: str | None = None,
           reset_classifier: bool = False, save_dir: str | None = None) -> int:
    """Start `run` as the checkpoint flags say; returns the iteration to continue at.

    --load's checkpoint: the whole training state (resume), or with `finetune` its weights
    only (iteration 0). A missing or empty --load starts from scratch (the --load = --save
    restart pattern), or from `pretrained`'s weights (--pretrained-checkpoint)."""
    from megavit.checkpointing.pretrained import load_pretrained_weights

    latest = checkpoint_to_load("--load", load_dir, info, save_dir) if load_dir else None
    if finetune:
        if latest is None:
            raise CheckpointDirectoryError(f"--finetune: --load {load_dir} holds no checkpoint "
                                           "to take the weights from")
        load_pretrained_weights(run, latest, info, reset_classifier)
        return 0
    if latest is not None:
        return resume_training_state(run, latest, info)
    if load_dir:
        info(f"no checkpoint in {load_dir}: " + (f"fine-tuning from --pretrained-checkpoint "
                                                 f"{pretrained}" if pretrained else
                                                 "starting from scratch"))
    if pretrained:
        source = checkpoint_to_load("--pretrained-checkpoint", pretrained, info)
        if source is None:
            raise CheckpointDirectoryError(f"--pretrained-checkpoint {pretrained}: no "
                                           "checkpoint there (missing or empty directory)")
        load_pretrained_weights(run, source, info, reset_classifier)
    return 0


def resume_training_state(run: Checkpointable, latest: Path, info: Callable[[str], None]
                          ) -> int:
    """Load the whole training state of checkpoint `latest` into `run`; returns the
    iteration to continue at."""
    start = time.perf_counter()
    check_model_config(latest, run)
    for name, data in run.checkpoint_files().items():     # e.g. the tokenizer: its ids index the embedding
        if (latest / name).is_file() and (latest / name).read_bytes() != data:
            raise CheckpointLoadError(f"{latest / name}: differs from this run's {name}; the "
                                      "checkpoint was trained with another one, not loaded")
    description = run.describe()
    check_pieces(latest, serial_meta_model(description, 1), prefix="model/")
    saved_info = read_checkpoint_info(latest)
    # the dropout streams follow the rank layout; a checkpoint from before the sharding
    # strategy was recorded used the default one
    saved = {"sharding": "optimizer", **saved_info["layout"]}
    same = saved == description["layout"]
    iteration = load_training_state(run, latest, same_layout=same)
    for note in (preprocessing_change(saved_info, description),
                 teacher_change(saved_info, description)):
        if note:
            info(note)
    if not same:
        info(f"checkpoint saved at {saved}; this run's layout differs: weights and optimizer "
             "state resharded, dropout RNG streams start afresh")
    if changed := schedule_changes(saved_info.get("schedule"), description.get("schedule")):
        info(f"resumed with another schedule: {changed}; the lr and the data order from "
             f"iteration {iteration} on follow this run's flags")
    info(f"loaded checkpoint | iteration {iteration} | path {latest} | seconds "
         f"{time.perf_counter() - start:.2f}")
    return iteration


def schedule_changes(saved: dict | None, current: dict | None) -> str:
    """"--train-iters 100 in the checkpoint, 200 here; ..." for the schedule flags that
    differ (empty when none does, or the checkpoint predates recording them)."""
    if not saved or not current:
        return ""
    return "; ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} in the checkpoint, {v!r} here"
                     for k, v in current.items() if k in saved and saved[k] != v)
