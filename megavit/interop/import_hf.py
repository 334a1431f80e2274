"""Import a timm or Hugging Face transformers directory (config.json + model.safetensors) as
a megavit checkpoint that `--load` starts from, tensor by tensor.

The mapping comes from the module of the source (`mapping.py`): a config.json with an
"architecture" is timm's (`timm_vit.py`); transformers' `model_type` "vit" -> `hf_vit.py`,
"clip" / "siglip" -> `hf_clip.py`. Each turns the config into megavit's model description
and lists how each megavit parameter is made from the directory's tensors; what cannot map
is a ConvertError naming it. This driver checks the directory against the mapping (every
tensor it needs present, every tensor present used, every made tensor shaped as the model
says), then writes iteration 0 of a --save directory: the weights, fp32 masters equal to
them, zero Adam moments, Adam step 0 and the default loss-scaler state — so
`--load` with the printed model flags starts fine-tuning there at any TP / PP / DP layout.
The directory's preprocessing (timm: config.json's pretrained_cfg; transformers:
preprocessor_config.json) becomes the checkpoint's "preprocessing" section
(`preprocessor_configs.imported_preprocessing`); where it is missing or says what megavit
cannot describe, none is recorded and a line says why.

The pieces are stored in the blocks a `tp`-way run reads (any layout loads them; at that
TP size each rank reads exactly its own). Memory: parameters are made and written in batches of at most `buffer_bytes` of output (a larger
parameter alone) from tensors read one file read at a time (`safetensors_files.py`: no
memory map), so an import holds one batch, not the model. The layout is recorded as
imported, so dropout streams start afresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.metadata import TensorProperties

from megavit.checkpointing.directory import CheckpointDirectory
from megavit.checkpointing.offline import ConvertError, Progress, batched
from megavit.checkpointing.reshard import StoredTensor, write_dcp
from megavit.config import ModelConfig, PrecisionConfig
from megavit.interop.consolidate import OutputTensor
from megavit.interop.mapping import ImportPlan
from megavit.interop.preprocessor_configs import imported_preprocessing
from megavit.interop.safetensors_files import SafetensorsFiles


def import_plan(directory: Path, config: dict) -> ImportPlan:
    """The mapping that reads `directory` (config.json already parsed as `config`)."""
    if "architecture" in config:
        from megavit.interop import timm_vit

        return timm_vit.import_plan(config)
    model_type = config.get("model_type")
    if model_type == "vit":
        from megavit.interop import hf_vit

        return hf_vit.import_plan(config)
    if model_type in ("clip", "siglip"):
        from megavit.interop import hf_clip

        return hf_clip.import_plan(directory, config)
    raise ConvertError(f"{directory / 'config.json'}: model_type {model_type!r}; megavit "
                       "imports transformers' 'vit', 'clip' and 'siglip' models and timm ViTs "
                       "(a config.json with \"architecture\")")


def _check_sources(src: Path, plan: ImportPlan, present: set[str],
                   report: Callable[[str], None]) -> None:
    """Every tensor the mapping reads is in the file; every tensor in it is read or
    knowingly dropped."""
    wanted = {s for e in plan.entries for s in e.sources}
    if missing := sorted(wanted - present):
        raise ConvertError(f"{src}: tensor{'s' * (len(missing) > 1)} "
                           f"{', '.join(missing[:8])}{' ...' * (len(missing) > 8)} missing "
                           f"({plan.source} needs {len(missing)} more)")
    dropped = sorted(n for n in present - wanted if any(n.startswith(p) for p in plan.ignored))
    if unused := sorted(present - wanted - set(dropped)):
        raise ConvertError(f"{src}: {len(unused)} tensor(s) megavit's model would not use "
                           f"({', '.join(unused[:8])}{' ...' * (len(unused) > 8)}); not the "
                           f"{plan.source} its config.json describes")
    if dropped:
        report(f"dropped | {len(dropped)} tensor(s) megavit has no use for: "
               + ", ".join(dropped))


def _entries_by_parameter(src: Path, plan: ImportPlan, serial: dict[str, torch.nn.Parameter]
                          ) -> dict[str, OutputTensor]:
    """{megavit parameter: the entry that makes it}: exactly one each, shaped like it."""
    by_name = {e.name: e for e in plan.entries}
    if len(by_name) != len(plan.entries):
        raise ConvertError(f"{plan.source}: a mapping that makes a parameter twice (a bug)")
    if missing := [n for n in serial if n not in by_name]:
        raise ConvertError(f"{src}: nothing maps to megavit's {', '.join(missing)}")
    for name, param in serial.items():
        if tuple(by_name[name].shape) != tuple(param.shape):
            raise ConvertError(f"{src}: {name} would be {list(by_name[name].shape)}, the "
                               f"config says {list(param.shape)}")
    return by_name


def _training_state_layout(serial: dict[str, torch.nn.Parameter], blocks: dict,
                           scalars: dict[str, torch.Tensor]
                           ) -> tuple[dict[str, StoredTensor], dict[str, str], dict[str, str]]:
    """What iteration 0 stores — per piece of each parameter: the weights, the fp32 master
    and the two Adam moments (fp32, in the TP blocks of `blocks`); then the scalars — and
    for each stored name its parameter and piece."""
    from megavit.checkpointing.pieces import pieces_of
    from megavit.parallel.sharding import get_tp_shard

    fp32 = TensorProperties(dtype=torch.float32)
    stored: dict[str, StoredTensor] = {}
    owner: dict[str, str] = {}
    piece_of: dict[str, str] = {}
    for name, param in serial.items():
        for piece in pieces_of(name, param, get_tp_shard(param)):
            for fqn in (f"model/{piece.name}", f"optimizer/master/{piece.name}",
                        f"optimizer/exp_avg/{piece.name}", f"optimizer/exp_avg_sq/{piece.name}"):
                stored[fqn] = StoredTensor(piece.global_shape, fp32, blocks[piece.name][1])
                owner[fqn], piece_of[fqn] = name, piece.name
    for fqn, value in scalars.items():
        stored[fqn] = StoredTensor(value.shape, TensorProperties(dtype=value.dtype),
                                   [((0,) * value.dim(), tuple(value.shape))])
    return stored, owner, piece_of


def import_directory(directory: str | os.PathLike, save: str | os.PathLike, tp: int = 1,
                     buffer_bytes: int = 1 << 30,
                     report: Callable[[str], None] = print) -> tuple[Path, ImportPlan]:
    """Write DIR's model as iteration 0 of the --save directory `save`, stored for a
    `tp`-way tensor-parallel run; returns the checkpoint's path and the mapping used."""
    from megavit.checkpointing.checkpointer import CONFIG_FILE
    from megavit.checkpointing.pieces import piece_blocks, serial_meta_model

    src = Path(directory)
    if not src.is_dir():
        raise ConvertError(f"--input {src}: " + ("a file; give the model's directory (config.json "
                                                 "and model.safetensors)" if src.exists()
                                                 else "no such directory"))
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src / 'config.json'}: missing")
    if not any((src / n).is_file() for n in ("model.safetensors",
                                             "model.safetensors.index.json")):
        hint = " (a pickle-only checkpoint is not read: convert it to safetensors)" \
            if any(src.glob("*.bin")) or any(src.glob("*.pth")) else ""
        raise ConvertError(f"{src / 'model.safetensors'}: missing{hint}")
    try:
        config = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise ConvertError(f"{src / 'config.json'}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{src / 'config.json'}: not a model configuration (a JSON object)")
    try:
        plan = import_plan(src, config)
    except KeyError as e:
        raise ConvertError(f"{src / 'config.json'}: {e} missing") from None
    section, why_not = imported_preprocessing(src, config, ModelConfig(**plan.info["model"]))
    if section is not None:
        plan.info["preprocessing"] = section
    else:
        report(f"preprocessing | not recorded: {why_not}; tools will assume megavit's "
               "image-file reading")
    serial = dict(serial_meta_model(plan.info, 1).named_parameters())
    try:
        blocks = piece_blocks(serial_meta_model(plan.info, tp), tp)
    except ValueError as e:
        raise ConvertError(f"--tensor-model-parallel-size {tp}: {e}") from None
    by_name = _entries_by_parameter(src, plan, serial)
    precision = PrecisionConfig()
    scalars = {"iteration": torch.tensor(0.0), "optimizer/step": torch.tensor(0.0),
               "scaler": torch.tensor([precision.initial_loss_scale, 0.0,
                                       float(precision.hysteresis)], dtype=torch.float64)}
    stored, owner, piece_of = _training_state_layout(serial, blocks, scalars)
    sizes = {n: 4 * s.size.numel() if n in owner else 8 for n, s in stored.items()}

    out = CheckpointDirectory(save)
    if out.latest() is not None or out.path_of(0).exists():
        raise ConvertError(f"--save {save}: already holds checkpoints; import into a new "
                           "directory (the import would become its latest)")
    created = not Path(save).exists()
    files = SafetensorsFiles(src)
    _check_sources(src, plan, files.keys(), report)

    def read(batch: list[str]) -> dict[str, torch.Tensor]:
        made: dict[str, dict[str, torch.Tensor]] = {}
        tensors = {}
        for fqn in batch:
            if fqn not in owner:
                tensors[fqn] = scalars[fqn]
                continue
            name = owner[fqn]
            if name not in made:
                made[name] = _make_pieces(src, by_name[name], serial[name], files.get)
            piece = made[name][piece_of[fqn]]
            tensors[fqn] = piece if fqn.startswith(("model/", "optimizer/master/")) \
                else torch.zeros_like(piece)
        return tensors

    staging = out.staging(0)
    names = list(stored)     # a parameter's entries are consecutive: made once a batch
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            write_dcp(staging, stored, list(batched(names, sizes, buffer_bytes)), read,
                      Progress(len(names), sum(sizes.values()), report, "import"))
        for name, data in plan.side_files.items():
            (staging / name).write_bytes(data)
        (staging / CONFIG_FILE).write_text(json.dumps({
            **plan.info, "iteration": 0, "precision": dataclasses.asdict(precision),
            "layout": {"tp": tp, "pp": 1, "dp": 1, "virtual_stages": 1,
                       "distributed_optimizer": False,
                       "imported_from": f"{plan.source} {src}"}},
            indent=1, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(save, ignore_errors=True)
        raise
    return out.commit(0), plan


def _make_pieces(src: Path, entry: OutputTensor, param: torch.nn.Parameter,
                 get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """{piece name: whole piece} of one serial parameter, made by its mapping entry from
    the source tensors `get` returns."""
    from megavit.checkpointing.pieces import pieces_of
    from megavit.parallel.sharding import get_tp_shard

    try:
        w = entry.make([get(s) for s in entry.sources]).float()
    except (RuntimeError, ValueError, IndexError) as e:    # a source of another shape
        raise ConvertError(f"{src}: {entry.name} cannot be made from "
                           f"{', '.join(entry.sources)} ({e}); the tensors do not fit "
                           "config.json") from None
    if tuple(w.shape) != tuple(entry.shape):
        raise ConvertError(f"{src}: {entry.name} would be {list(w.shape)} from "
                           f"{', '.join(entry.sources)}, the config says {list(entry.shape)}")
    return {p.name: p.local.contiguous() for p in pieces_of(entry.name, w, get_tp_shard(param))}
