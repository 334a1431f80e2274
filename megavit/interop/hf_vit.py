"""megavit's sequential-block ViT with a class token <-> transformers' `ViTModel` /
`ViTForImageClassification`, in both directions.

    megavit (serial names)                transformers (on-disk names; ViTModel: no "vit.")
    patch_embed.proj.weight [h, c*p*p]    vit.embeddings.patch_embeddings.projection.weight
                                          [h, c, p, p] (the same (c, p, p) flattening)
    cls_token [h]                         vit.embeddings.cls_token [1, 1, h]
    pos_embed.weight [s, h]               vit.embeddings.position_embeddings [1, s + 1, h]
    blocks.i.qkv.weight [3h, h] (q|k|v)   vit.encoder.layer.i.attention.attention.
                                          {query,key,value} (rows split)
    blocks.i.proj / norm1 / norm2 / fc1 / fc2
                                          .attention.output.dense / layernorm_before /
                                          layernorm_after / intermediate.dense / output.dense
    norm, head                            vit.layernorm, classifier

transformers' class token has a position (row 0) and megavit's has none. Export writes a
zero row; import folds the row into the class token (nothing else reads it), which computes
exactly the same. A model without a classifier (`--num-classes 0`) exports as `ViTModel`,
whose `last_hidden_state[:, 0]` is megavit's features; load it with
`ViTModel.from_pretrained(DIR, add_pooling_layer=False)` (megavit has no tanh pooler, and
importing a ViTModel drops the pooler, saying so). The export's preprocessor_config.json
(`ViTImageProcessor`) holds the checkpoint's preprocessing, so
`AutoImageProcessor.from_pretrained(DIR)` prepares images as megavit's training did.

The names are transformers' on-disk (Hub) names, which `save_pretrained` writes and every
version reads (5.x renames some in memory and converts when loading);
tests/test_export_hf.py loads the files with the real classes and requires nothing missing,
unexpected or mismatched.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import torch

from megavit.checkpointing.offline import ConvertError
from megavit.config import ModelConfig
from megavit.data.preprocessing import Preprocessing
from megavit.interop.consolidate import OutputTensor
from megavit.interop.mapping import (ExportPlan, ImportPlan, model_flags, serial_shapes,
                                     token_structure_differences)
from megavit.interop.preprocessor_configs import hf_image_processor

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}   # megavit -> transformers
# transformers' hidden_act -> megavit's activation ("gelu_new" is the same tanh formula)
FROM_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_PER_BLOCK = (("attention.output.dense", "proj"), ("layernorm_before", "norm1"),
              ("layernorm_after", "norm2"), ("intermediate.dense", "fc1"),
              ("output.dense", "fc2"))


def differences(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` from mapping onto transformers' ViT (empty: it maps)."""
    wanted = {"block_type": "sequential", "pooling": "cls", "qk_layernorm": False,
              "add_qkv_bias": True, "add_proj_bias": True, "add_mlp_bias": True,
              "norm_bias": True, "position_embedding_type": "learned",
              "normalization": "layernorm", "pre_norm": False, "attention_type": "full",
              "attention_type_per_layer": ""}
    out = [f"--{k.replace('_', '-')} is {getattr(cfg, k)!r}; transformers' ViT has {v!r}"
           for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.img_h != cfg.img_w:
        out.append(f"images are {cfg.img_h}x{cfg.img_w}; transformers' ViT takes square ones")
    return out + token_structure_differences(cfg, "transformers' ViT")


def _names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(transformers name, megavit name) of every 1:1 tensor: what both directions share."""
    prefix = "vit." if cfg.num_classes else ""
    pairs = [(f"{prefix}embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias")]
    for i in range(cfg.num_layers):
        for theirs, ours in _PER_BLOCK:
            for kind in ("weight", "bias"):
                pairs.append((f"{prefix}encoder.layer.{i}.{theirs}.{kind}",
                              f"blocks.{i}.{ours}.{kind}"))
    for kind in ("weight", "bias"):
        pairs.append((f"{prefix}layernorm.{kind}", f"norm.{kind}"))
        if cfg.num_classes:
            pairs.append((f"classifier.{kind}", f"head.{kind}"))
    return pairs


def _qkv(cfg: ModelConfig, i: int, kind: str) -> list[str]:
    prefix = "vit." if cfg.num_classes else ""
    return [f"{prefix}encoder.layer.{i}.attention.attention.{x}.{kind}"
            for x in ("query", "key", "value")]


def export_plan(info: dict, cfg: ModelConfig, dtype: torch.dtype | None,
                pre: Preprocessing) -> ExportPlan:
    """`ViTForImageClassification` (or `ViTModel` without a classifier) with a
    `ViTImageProcessor` doing `pre`; ConvertError listing every difference when `cfg` does
    not map."""
    if problems := differences(cfg):
        raise ConvertError("this ViT does not map onto transformers' ViT: "
                           + "; ".join(problems))
    from transformers import ViTConfig

    h, c, p = cfg.hidden_size, cfg.num_channels, cfg.patch_dim
    s = cfg.grid[0] * cfg.grid[1]
    shapes = serial_shapes({"model": dataclasses.asdict(cfg)})

    def rows(k: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        return lambda ts: ts[0][k * h:(k + 1) * h]

    e = ("vit." if cfg.num_classes else "") + "embeddings."
    entries = [
        OutputTensor(e + "cls_token", (1, 1, h), ["cls_token"], lambda ts: ts[0].view(1, 1, h)),
        OutputTensor(e + "position_embeddings", (1, s + 1, h), ["pos_embed.weight"],
                     lambda ts: torch.cat([ts[0].new_zeros(1, h), ts[0]]).unsqueeze(0)),
        OutputTensor(e + "patch_embeddings.projection.weight", (h, c, p, p),
                     ["patch_embed.proj.weight"], lambda ts: ts[0].view(h, c, p, p))]
    for i in range(cfg.num_layers):
        for kind in ("weight", "bias"):
            for k, name in enumerate(_qkv(cfg, i, kind)):
                entries.append(OutputTensor(name, (h, h)[:2 if kind == "weight" else 1],
                                            [f"blocks.{i}.qkv.{kind}"], rows(k)))
    entries += [OutputTensor(theirs, shapes[ours], [ours]) for theirs, ours in _names(cfg)]
    kind = "ViTForImageClassification" if cfg.num_classes else "ViTModel"
    config = ViTConfig(hidden_size=h, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_attention_heads,
                       intermediate_size=cfg.ffn_hidden_size,
                       hidden_act=HF_ACTIVATIONS[cfg.activation],
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       layer_norm_eps=cfg.norm_epsilon, image_size=cfg.img_h,
                       patch_size=p, num_channels=c, qkv_bias=True,
                       num_labels=cfg.num_classes or 2, architectures=[kind])
    if dtype is not None:
        config.torch_dtype = str(dtype).replace("torch.", "")
    processor = hf_image_processor(pre, "ViTImageProcessor")
    return ExportPlan(f"transformers {kind}", entries,
                      {"config.json": config.to_json_string().encode(),
                       "preprocessor_config.json": (json.dumps(processor, indent=2)
                                                    + "\n").encode()})


def model_config_of(config: dict) -> ModelConfig:
    """megavit's ModelConfig for a transformers ViTConfig (as read from config.json);
    ConvertError listing whatever cannot map."""
    problems = []
    architectures = config.get("architectures") or ["ViTModel"]
    if architectures[0] not in ("ViTForImageClassification", "ViTModel"):
        problems.append(f"architectures {architectures}: megavit maps ViTModel and "
                        "ViTForImageClassification")
    activation = FROM_HF_ACTIVATIONS.get(config.get("hidden_act", "gelu"))
    if activation is None:
        problems.append(f"hidden_act {config.get('hidden_act')!r}; megavit's MLP has "
                        f"{', '.join(FROM_HF_ACTIVATIONS)}")
    size = config.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        problems.append(f"image_size {size}: only square images map")
    if problems:
        raise ConvertError("this transformers model does not map onto megavit: "
                           + "; ".join(problems))
    classes = 0
    if architectures[0] == "ViTForImageClassification":
        classes = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    return ModelConfig(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                       num_attention_heads=config["num_attention_heads"],
                       ffn_hidden_size=config["intermediate_size"],
                       patch_dim=config["patch_size"], img_h=size, img_w=size,
                       num_channels=config.get("num_channels", 3), num_classes=classes,
                       block_type="sequential", qk_layernorm=False,
                       add_qkv_bias=config.get("qkv_bias", True), add_mlp_bias=True,
                       add_proj_bias=True, norm_bias=True,
                       norm_epsilon=config.get("layer_norm_eps", 1e-12),
                       position_embedding_type="learned", pooling="cls",
                       activation=activation)


def import_plan(config: dict) -> ImportPlan:
    """The reverse of `export_plan` for a transformers ViT's config.json."""
    cfg = model_config_of(config)
    h = cfg.hidden_size
    e = ("vit." if cfg.num_classes else "") + "embeddings."
    entries = [
        OutputTensor("cls_token", (h,), [e + "cls_token", e + "position_embeddings"],
                     lambda ts: ts[0].reshape(h) + ts[1][0, 0]),
        OutputTensor("pos_embed.weight", (cfg.grid[0] * cfg.grid[1], h),
                     [e + "position_embeddings"], lambda ts: ts[0][0, 1:]),
        OutputTensor("patch_embed.proj.weight", (h, cfg.num_channels * cfg.patch_dim ** 2),
                     [e + "patch_embeddings.projection.weight"], lambda ts: ts[0].reshape(h, -1))]
    for i in range(cfg.num_layers):
        kinds = ("weight", "bias") if cfg.add_qkv_bias else ("weight",)
        for kind in kinds:
            entries.append(OutputTensor(f"blocks.{i}.qkv.{kind}",
                                        (3 * h, h)[:2 if kind == "weight" else 1],
                                        _qkv(cfg, i, kind), torch.cat))
    shapes = serial_shapes({"model": dataclasses.asdict(cfg)})
    entries += [OutputTensor(ours, shapes[ours], [theirs])
                for theirs, ours in _names(cfg)]
    kind = "ViTForImageClassification" if cfg.num_classes else "ViTModel"
    return ImportPlan(f"transformers {kind}", {"model": dataclasses.asdict(cfg)}, entries,
                      model_flags(cfg), ignored=["pooler."])
