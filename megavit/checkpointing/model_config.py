"""Is a checkpoint's model this run's model? `megavit_config.json` (the run's `describe()`)
compared section by section ("model", and for two towers "text" and "contrastive"), each
difference named as the flag that differs.

Some fields may change between runs (`MAY_CHANGE`: regularisation, and for two towers data
and LiT settings); fine-tuning from weights only may also change the class count and the
image size (`FINETUNE_MAY_CHANGE`, see `pretrained.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from megavit.checkpointing.checkpointable import Checkpointable
from megavit.checkpointing.errors import CheckpointLoadError

CONFIG_FILE = "megavit_config.json"


MAY_CHANGE = {"hidden_dropout", "attention_dropout", "drop_path_rate", "lock_image_tower",
              "image_checkpoint", "contrastive_queue_size", "image_text_data",
              "image_text_path", "fatal_data_errors", "tokenizer_model", "zero_shot_transfer",
              "num_workers", "siglip_chunks"}
FINETUNE_MAY_CHANGE = {"num_classes", "img_h", "img_w"}


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


def read_checkpoint_info(checkpoint: Path) -> dict:
    """A checkpoint's `megavit_config.json`; CheckpointLoadError naming the file when it is
    missing, does not parse, or lacks the "model", "layout" and "iteration" it records."""
    path = checkpoint / CONFIG_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointLoadError(f"{path}: missing; not a megavit checkpoint") from None
    except (OSError, ValueError) as e:     # also a UnicodeDecodeError or JSONDecodeError
        raise CheckpointLoadError(f"{path}: unreadable ({e}); the checkpoint is damaged: "
                                  "load an earlier one") from None
    if not (isinstance(info, dict) and isinstance(info.get("model"), dict)
            and isinstance(info.get("layout"), dict) and isinstance(info.get("iteration"), int)):
        raise CheckpointLoadError(f"{path}: not a megavit checkpoint description (no \"model\", "
                                  "\"layout\" or \"iteration\"); the checkpoint is damaged: "
                                  "load an earlier one")
    return info


def check_model_config(checkpoint: Path, run: Checkpointable) -> None:
    """Refuse a checkpoint of another model, naming every field that differs (the fields of
    `MAY_CHANGE` — regularisation and, for two towers, data and LiT settings — may change
    between runs)."""
    differ = model_differences(read_checkpoint_info(checkpoint), run.describe(),
                               MAY_CHANGE.__contains__)
    if differ:
        raise CheckpointLoadError(f"{checkpoint}: a different model, not loaded: "
                                  + "; ".join(differ))


def finetune_differences(saved_info: dict, current_info: dict) -> list[str]:
    """What keeps weights of `saved_info`'s model from fine-tuning `current_info`'s."""
    allowed = MAY_CHANGE | FINETUNE_MAY_CHANGE
    return model_differences(saved_info, current_info, allowed.__contains__)


def model_differences(saved_info: dict, current_info: dict,
                      may_change: Callable[[str], bool]) -> list[str]:
    """Every difference of two descriptions' model sections but those `may_change` allows
    (only the kind when one is a ViT and the other two towers)."""
    kinds = ["two-tower" if "text" in info else "ViT" for info in (saved_info, current_info)]
    if kinds[0] != kinds[1]:
        return [f"a {kinds[0]} checkpoint, a {kinds[1]} run here"]
    differ = []
    for section in ("model", "text", "contrastive"):
        saved, current = saved_info.get(section), current_info.get(section)
        if saved is None and current is None:
            continue
        differ += config_differences(section, saved, current, may_change)
        differ += [f"{k} {saved[k]!r} in the checkpoint, unknown here"
                   for k in saved if k not in current]
    return differ
