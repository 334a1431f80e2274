"""Export a megavit checkpoint to timm's or Hugging Face transformers' layout, tensor by
tensor, from any saved layout.

The mapping (which tensors, made how, and the config files) comes from the module of the
target (`mapping.py` lists them): `--format timm` -> `timm_vit.py`; `--format transformers`
-> `hf_vit.py` for a ViT, `hf_clip.py` for a two-tower model. Each refuses a model that
does not map with every difference listed. The checkpoint's "preprocessing" section goes
to the mapping, which writes it as the library reads it (`preprocessor_configs.py`); a
checkpoint written before megavit recorded it exports megavit's image-file reading, with a
warning. This driver streams the checkpoint into `model.safetensors`
(`consolidate.write_safetensors`: at most `--buffer-mb` read at once, a progress line per
batch), writes the mapping's other files, and stages all of it in OUTPUT.partial/, renamed
into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from megavit.checkpointing.checkpointer import CONFIG_FILE
from megavit.checkpointing.offline import ConvertError, read_config
from megavit.config import ModelConfig
from megavit.data.preprocessing import Preprocessing, checkpoint_preprocessing
from megavit.interop.consolidate import write_safetensors
from megavit.interop.mapping import ExportPlan

FORMATS = ("timm", "transformers")


def export_plan(fmt: str, info: dict, cfg: ModelConfig, dtype: torch.dtype | None,
                source: Path | None = None) -> ExportPlan:
    """The mapping of the checkpoint `source` (`info`: its megavit_config.json) onto `fmt`,
    with its preprocessing (a note in `notes` where it is assumed)."""
    pre, note = checkpoint_preprocessing(info, cfg, str(source / CONFIG_FILE) if source
                                         else CONFIG_FILE)
    plan = _mapping_plan(fmt, info, cfg, dtype, source, pre)
    plan.notes += [note] if note else []
    if "segmentation" in info:
        plan.notes.append(f"a segmentation checkpoint: its backbone (patch embedding, blocks, "
                          f"final norm) is exported as a feature model; the feature pyramid "
                          f"and decoder (neck.*, decode_head.*) have no {fmt} counterpart and "
                          "are left out")
    distilled = info.get("distillation", {})
    if distilled.get("feature_widths") or distilled.get("pooled_width"):
        plan.notes.append(f"a distilled student: its projections to the teacher's widths "
                          f"(feature_projections.*, pooled_projection.*) serve only the "
                          f"distillation loss, have no {fmt} counterpart and are left out; "
                          "the logits are unchanged")
    return plan


def _mapping_plan(fmt: str, info: dict, cfg: ModelConfig, dtype: torch.dtype | None,
                  source: Path | None, pre: Preprocessing) -> ExportPlan:
    if fmt == "timm":
        if "text" in info:
            raise ConvertError("--format timm: a two-tower checkpoint; timm holds image "
                               "models (use --format transformers for CLIPModel / SiglipModel)")
        from megavit.interop import timm_vit

        return timm_vit.export_plan(info, cfg, dtype, pre)
    if fmt != "transformers":
        raise ConvertError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if "text" in info:
        from megavit.interop import hf_clip

        return hf_clip.export_plan(info, cfg, dtype, source, pre)
    from megavit.interop import hf_vit

    return hf_vit.export_plan(info, cfg, dtype, pre)


def export_checkpoint(source: Path, fmt: str, output: str | os.PathLike,
                      dtype: torch.dtype | None, buffer_bytes: int,
                      report: Callable[[str], None] = print) -> Path:
    """Write `output`/ (model.safetensors, config.json and the mapping's other files) for
    the library `fmt`; a failure leaves nothing."""
    info, cfg = read_config(source)
    try:
        plan = export_plan(fmt, info, cfg, dtype, source)
    except ConvertError as e:
        raise ConvertError(f"{source}: {e}") from None
    final = Path(output)
    if final.exists():
        raise ConvertError(f"--output {final}: exists; choose a new directory")
    if not final.parent.is_dir():
        raise ConvertError(f"--output {final}: its parent directory does not exist")
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for note in plan.notes:
        report(f"export | warning: {note}")
    try:
        write_safetensors(source, staging / "model.safetensors", plan.entries, dtype,
                          buffer_bytes, {"format": "pt"}, report, "export")
        for name, data in plan.files.items():
            (staging / name).write_bytes(data)
        (staging / "megavit_export.json").write_text(json.dumps(
            {"source": str(source), "iteration": info["iteration"], "target": plan.target,
             **{k: info[k] for k in ("model", "text", "contrastive", "preprocessing")
                if k in info}},
            indent=1, sort_keys=True) + "\n")
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"exported | {plan.target} | iteration {info['iteration']} | path {final} | "
           f"tensors {len(plan.entries)}")
    return final
