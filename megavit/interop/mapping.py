"""What a mapping between megavit and another library's layout hands the export / import
drivers (`export_hf.py`, `import_hf.py`). One module per target library and architecture
(`hf_vit.py`: transformers ViT, `timm_vit.py`: timm's ViT with parallel blocks,
`hf_clip.py`: transformers CLIPModel / SiglipModel) builds these plans; the drivers do the
reading, streaming, staging and checking, the same for all.

Both directions are lists of `OutputTensor`s (`consolidate.py`): a tensor to write, its
shape, the names of the tensors it is made from and how. Export: made from megavit's serial
parameters, written into the target's `model.safetensors`. Import: made from the tensors of
the directory's safetensors file, written as megavit's serial parameters (every one of the
model's parameters must be made, in its shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megavit.config import section_to_dict
from megavit.interop.consolidate import OutputTensor


@dataclass
class ExportPlan:
    """An export: `target` names the library class (log lines, `megavit_export.json`);
    `entries` are the tensors of `model.safetensors`; `files` the other files of the output
    directory (`config.json`, `preprocessor_config.json`, a tokenizer, ...), written as
    given; `notes` are lines the driver reports (e.g. an assumed preprocessing)."""

    target: str
    entries: list[OutputTensor]
    files: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportPlan:
    """An import: `source` names the library class; `info` the megavit model it becomes, as
    `megavit_config.json` records one ("model", and for two towers "text" and
    "contrastive"; the import driver adds "preprocessing"); `entries` make megavit's serial parameters from the directory's tensors;
    `side_files` are written beside the checkpoint's tensors (a two-tower tokenizer:
    `tokenizer.model`); `flags` are the command-line flags that build this model; `ignored`
    are name prefixes of the directory's tensors that megavit has no use for (reported when
    present; any other tensor no entry reads is an error)."""

    source: str
    info: dict
    entries: list[OutputTensor]
    flags: list[str]
    side_files: dict[str, bytes] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def serial_shapes(info: dict) -> dict[str, tuple[int, ...]]:
    """{serial parameter name: shape} of the model a checkpoint description (`info`:
    "model", and for two towers "text" and "contrastive") builds."""
    from megavit.checkpointing.pieces import serial_meta_model

    return {n: tuple(p.shape) for n, p in serial_meta_model(info, 1).named_parameters()}


def model_flags(cfg) -> list[str]:
    """The command-line flags that build the config dataclass `cfg` (a ModelConfig: the
    megavit.pretrain model flags; a TextConfig: the text tower's)."""
    flags = []
    for name, value in section_to_dict(cfg).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value not in (None, "") and "dropout" not in name and "drop_path" not in name:
            flags += [flag, str(value)]
    return flags


def token_structure_differences(cfg, target: str) -> list[str]:
    """What of megavit's token sequence a plain ViT library (`target`, e.g. "timm's
    VisionTransformer") has no place for: registers and patch merging."""
    out = []
    if cfg.num_registers:
        out.append(f"--num-registers {cfg.num_registers}: megavit does not map register "
                   f"tokens to {target} yet")
    if getattr(cfg, "distillation_token", False):
        out.append(f"--distillation-token: megavit does not map DeiT's distillation token "
                   f"and its second head to {target} yet")
    if cfg.patch_merge_layers:
        out.append(f"--patch-merge-layers {cfg.patch_merge_layers}: {target} keeps one token "
                   "grid through every block (no patch merging)")
    return out
