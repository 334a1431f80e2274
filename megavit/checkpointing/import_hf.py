"""Import a Hugging Face transformers `ViTForImageClassification` directory (config.json +
model.safetensors) as a megavit checkpoint that `--load` starts from.

The reverse of `export_hf.py`'s mapping. transformers' class token has a position embedding
(row 0) and megavit's has none; since nothing else reads that row, megavit's class token is
cls + position row 0, which computes exactly the same. The checkpoint is a whole training
state at iteration 0: the weights, fp32 masters equal to them, zero Adam moments, Adam step 0
and the default loss-scaler state — so `megavit.pretrain --load DIR` with the printed model
flags starts fine-tuning from it at any TP / PP / DP layout (the layout is recorded as
imported, so dropout streams start afresh).

Memory: the imported model is held once in memory while it is written (the export direction
streams; importing ViT-22B-sized checkpoints tensor by tensor is issue 9's remaining part).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from megavit.checkpointing.convert import ConvertError
from megavit.checkpointing.directory import CheckpointDirectory
from megavit.config import ModelConfig, PrecisionConfig


def model_config_of(config: dict) -> ModelConfig:
    """megavit's ModelConfig for a transformers ViTConfig (as read from config.json);
    ConvertError listing whatever cannot map."""
    problems = []
    if config.get("model_type") != "vit":
        problems.append(f"model_type {config.get('model_type')!r}, not 'vit'")
    if "ViTForImageClassification" not in (config.get("architectures") or []):
        problems.append(f"architectures {config.get('architectures')}, not "
                        "ViTForImageClassification (a classifier is needed)")
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {config.get('hidden_act')!r}; megavit's MLP uses exact gelu")
    size = config.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        problems.append(f"image_size {size}: only square images map")
    if problems:
        raise ConvertError("this transformers model does not map onto megavit: "
                           + "; ".join(problems))
    labels = config.get("id2label") or {}
    return ModelConfig(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                       num_attention_heads=config["num_attention_heads"],
                       ffn_hidden_size=config["intermediate_size"],
                       patch_dim=config["patch_size"], img_h=size, img_w=size,
                       num_channels=config.get("num_channels", 3),
                       num_classes=len(labels) or config.get("num_labels", 2),
                       block_type="sequential", qk_layernorm=False,
                       add_qkv_bias=config.get("qkv_bias", True), add_mlp_bias=True,
                       add_proj_bias=True, norm_bias=True,
                       norm_epsilon=config.get("layer_norm_eps", 1e-12),
                       position_embedding_type="learned", pooling="cls")


def _serial_weights(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """megavit's serial parameters from transformers' tensors (on-disk Hub names)."""
    h, e = cfg.hidden_size, "vit.embeddings."
    pos = tensors[e + "position_embeddings"][0]                      # [s + 1, h]
    out = {"cls_token": tensors[e + "cls_token"].reshape(h) + pos[0],
           "pos_embed.weight": pos[1:],
           "patch_embed.proj.weight": tensors[e + "patch_embeddings.projection.weight"]
           .reshape(h, -1),
           "patch_embed.proj.bias": tensors[e + "patch_embeddings.projection.bias"]}
    for i in range(cfg.num_layers):
        hf, mv = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        qkv = [f"{hf}attention.attention.{x}" for x in ("query", "key", "value")]
        out[mv + "qkv.weight"] = torch.cat([tensors[q + ".weight"] for q in qkv])
        if cfg.add_qkv_bias:
            out[mv + "qkv.bias"] = torch.cat([tensors[q + ".bias"] for q in qkv])
        for theirs, ours in (("attention.output.dense", "proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("intermediate.dense", "fc1"),
                             ("output.dense", "fc2")):
            for kind in ("weight", "bias"):
                out[f"{mv}{ours}.{kind}"] = tensors[f"{hf}{theirs}.{kind}"]
    for theirs, ours in (("vit.layernorm", "norm"), ("classifier", "head")):
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = tensors[f"{theirs}.{kind}"]
    return out


def import_transformers(directory: str | os.PathLike, save: str | os.PathLike) -> Path:
    """Write DIR's model as iteration 0 of the --save directory `save`; returns the
    checkpoint's path."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    from megavit.checkpointing.checkpointer import CONFIG_FILE
    from megavit.checkpointing.pieces import meta_model, pieces_of
    from megavit.parallel.sharding import get_tp_shard

    src = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (src / name).is_file():
            hint = " (a pickle-only checkpoint is not read: convert it to safetensors)" \
                if name == "model.safetensors" and any(src.glob("*.bin")) else ""
            raise ConvertError(f"{src / name}: missing{hint}")
    cfg = model_config_of(json.loads((src / "config.json").read_text()))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        weights = _serial_weights(tensors, cfg)
    except KeyError as e:
        raise ConvertError(f"{src / 'model.safetensors'}: tensor {e} missing") from None
    state: dict[str, torch.Tensor] = {}
    for name, param in meta_model(cfg, 1).named_parameters():
        if name not in weights:
            raise ConvertError(f"{src}: nothing maps to megavit's {name}")
        w = weights[name].float()
        if tuple(w.shape) != tuple(param.shape):
            raise ConvertError(f"{src}: {name} would be {list(w.shape)}, the config says "
                               f"{list(param.shape)}")
        for piece in pieces_of(name, w, get_tp_shard(param)):
            block = piece.local.contiguous()
            state[f"model/{piece.name}"] = block
            state[f"optimizer/master/{piece.name}"] = block.clone()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"optimizer/{key}/{piece.name}"] = torch.zeros_like(block)
    precision = PrecisionConfig()
    state.update({"iteration": torch.tensor(0.0), "optimizer/step": torch.tensor(0.0),
                  "scaler": torch.tensor([precision.initial_loss_scale, 0.0,
                                          float(precision.hysteresis)], dtype=torch.float64)})
    out = CheckpointDirectory(save)
    if out.path_of(0).exists():
        raise ConvertError(f"--save {save}: already holds iteration 0")
    staging = out.staging(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=os.fspath(staging), no_dist=True)
    (staging / CONFIG_FILE).write_text(json.dumps({
        "model": dataclasses.asdict(cfg), "iteration": 0,
        "precision": dataclasses.asdict(precision),
        "layout": {"tp": 1, "pp": 1, "dp": 1, "virtual_stages": 1,
                   "distributed_optimizer": False,
                   "imported_from": f"transformers ViTForImageClassification {src}"}},
        indent=1, sort_keys=True) + "\n")
    return out.commit(0)


def model_flags(cfg: ModelConfig) -> list[str]:
    """The megavit.pretrain model flags that build `cfg`."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None and "dropout" not in f.name and "drop_path" not in f.name:
            flags += [flag, str(value)]
    return flags
