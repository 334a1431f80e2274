"""megavit's parallel-block (ViT-22B) image model <-> timm's `VisionTransformer` with
`ParallelScalingBlock`s, in both directions.

    megavit (serial names)                 timm
    patch_embed.proj.weight [h, c*p*p]     patch_embed.proj.weight [h, c, p, p]
    patch_embed.proj.bias [h]              patch_embed.proj.bias (none with pre_norm: then
                                           added to pos_embed, which only patches get too)
    pos_embed.weight [s, h]                pos_embed [1, s, h] (no_embed_class)
    cls_token [h]                          cls_token [1, 1, h] (pooling cls / 'token')
    pre_norm                               norm_pre
    blocks.i.norm                          blocks.i.in_norm
    blocks.i.in_proj.weight [3h+f, h]      blocks.i.in_proj.weight [f+3h, h]: timm's split
      rows [q | k | v | mlp]               order is [mlp | q | k | v]
    blocks.i.in_proj.bias (biased segments blocks.i.in_proj.bias [f+3h] (qkv_bias), or
      of [q | k | v | mlp], in that order)  blocks.i.mlp_bias [f] (no qkv_bias)
    blocks.i.attention.{q,k}_norm          blocks.i.{q,k}_norm (per head, [head_dim])
    blocks.i.out_proj.weight [h, h+f]      blocks.i.attn_out_proj.weight [h, h] |
                                           blocks.i.mlp_out_proj.weight [h, f] (columns)
    blocks.i.out_proj.bias [h]             attn_out_proj.bias + mlp_out_proj.bias (export:
                                           all in attn_out_proj.bias, mlp's zero)
    norm                                   norm
    map_head.{probe, q, kv, proj, norm,    attn_pool.{latent [1, 1, h], q, kv, proj, norm,
      fc1, fc2}                              mlp.fc1, mlp.fc2}
    head                                   head

The MLP activation: megavit's `gelu` / `gelu_tanh` are timm's `gelu` / `gelu_tanh`.
Norms: megavit's `--normalization layernorm` is timm's LayerNorm (always with a bias: a
megavit model without `--norm-bias` exports zero biases), `rmsnorm` timm's RmsNorm; timm's
norms use eps 1e-6, as megavit by default. The export writes config.json for the registered
parallel-block architecture `vit_base_patch16_xp_224` with `model_args` replacing every
setting that differs, so `timm.create_model('local-dir:DIR', pretrained=True)` builds the
model (strictly loaded) and transformers' `TimmWrapperModel` too. Its pretrained_cfg holds
the checkpoint's preprocessing (mean, std, interpolation, crop_pct, crop_mode "squash",
input_size: `preprocessor_configs.timm_pretrained_cfg`), so timm's
`create_transform(**resolve_data_config(model=m))` prepares images as megavit's training did.

Import reads timm's config.json: `model_args` over the registered architecture's settings
(`ARCHITECTURES`, facts from timm 1.0's model registry) over `VisionTransformer`'s
defaults. What megavit has no equivalent for (register tokens, layer scale, norm after
pooling, other pools, activations or blocks) is refused, every difference listed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from megavit.checkpointing.offline import ConvertError
from megavit.config import ModelConfig
from megavit.data.preprocessing import Preprocessing, default_preprocessing
from megavit.interop.consolidate import OutputTensor
from megavit.interop.mapping import (ExportPlan, ImportPlan, model_flags, serial_shapes,
                                     token_structure_differences)
from megavit.interop.preprocessor_configs import timm_pretrained_cfg

EXPORT_ARCHITECTURE = "vit_base_patch16_xp_224"

# timm's VisionTransformer defaults, and what its parallel-block architectures change.
_DEFAULTS: dict[str, Any] = {
    "img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000,
    "global_pool": "token", "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
    "qkv_bias": True, "qk_norm": False, "scale_attn_norm": False, "scale_mlp_norm": False,
    "proj_bias": True, "init_values": None, "class_token": True, "pos_embed": "learn",
    "no_embed_class": False, "reg_tokens": 0, "pre_norm": False, "final_norm": True,
    "fc_norm": None, "pool_include_prefix": False, "dynamic_img_size": False,
    "dynamic_img_pad": False, "norm_layer": "layernorm", "act_layer": "gelu",
    "embed_norm_layer": None, "block_fn": "Block"}
# VisionTransformer arguments that change training only, not the function of the weights.
_TRAINING_ONLY = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate",
                  "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init"}
_XP = {"pre_norm": True, "no_embed_class": True, "norm_layer": "rmsnorm",
       "block_fn": "ParallelScalingBlock", "qkv_bias": False, "qk_norm": True}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vit_base_patch16_xp_224": {**_XP, "patch_size": 16, "embed_dim": 768, "depth": 12,
                                "num_heads": 12},
    "vit_large_patch14_xp_224": {**_XP, "patch_size": 14, "embed_dim": 1024, "depth": 24,
                                 "num_heads": 16},
    "vit_huge_patch14_xp_224": {**_XP, "patch_size": 14, "embed_dim": 1280, "depth": 32,
                                "num_heads": 16},
}


_ACTIVATIONS = {"gelu": "gelu", "gelutanh": "gelu_tanh"}   # timm (normalised) -> megavit


def differences(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` from mapping onto timm's parallel-block ViT (empty: it maps)."""
    out = []
    if cfg.block_type != "parallel":
        out.append("--block-type is 'sequential'; timm's ParallelScalingBlock is the parallel "
                   "block (export sequential ViTs with --format transformers)")
    if cfg.position_embedding_type != "learned":
        out.append(f"--position-embedding-type is {cfg.position_embedding_type!r}; timm's "
                   "ViT learns its table")
    if cfg.attention_type != "full" or cfg.attention_type_per_layer:
        out.append(f"--attention-type is {cfg.attention_type!r} (per layer: "
                   f"{cfg.attention_type_per_layer or 'none'}); timm's ViT attends over all "
                   "tokens in every block")
    out += token_structure_differences(cfg, "timm's VisionTransformer")
    if cfg.norm_epsilon != 1e-6:
        out.append(f"--norm-epsilon is {cfg.norm_epsilon}; timm's norms use 1e-6")
    if cfg.ffn_hidden_size != int(cfg.ffn_hidden_size / cfg.hidden_size * cfg.hidden_size):
        out.append(f"--ffn-hidden-size {cfg.ffn_hidden_size} is not int(mlp_ratio * "
                   f"{cfg.hidden_size}) for any float mlp_ratio")
    return out


def _pool(cfg: ModelConfig) -> str:
    return {"map": "map", "gap": "avg", "cls": "token"}[cfg.pooling]


def timm_config(cfg: ModelConfig, pre: Preprocessing | None = None) -> dict:
    """config.json: the architecture, `model_args` that turn it into `cfg`, and a
    pretrained_cfg with the preprocessing `pre` (default: megavit's image-file reading).
    The class count is top-level only: transformers' timm wrapper passes it to timm
    itself."""
    has_out_bias = cfg.add_mlp_bias or cfg.add_proj_bias
    args = {"img_size": [cfg.img_h, cfg.img_w], "patch_size": cfg.patch_dim,
            "in_chans": cfg.num_channels, "global_pool": _pool(cfg), "embed_dim": cfg.hidden_size, "depth": cfg.num_layers,
            "num_heads": cfg.num_attention_heads,
            "mlp_ratio": cfg.ffn_hidden_size / cfg.hidden_size,
            "qkv_bias": cfg.add_qkv_bias, "qk_norm": cfg.qk_layernorm,
            "proj_bias": has_out_bias, "class_token": cfg.pooling == "cls",
            "no_embed_class": True, "pre_norm": cfg.pre_norm, "fc_norm": False,
            "norm_layer": cfg.normalization, "act_layer": cfg.activation}
    pretrained = {**timm_pretrained_cfg(pre or default_preprocessing(cfg)),
                  "fixed_input_size": True, "num_classes": cfg.num_classes or 0,
                  "first_conv": "patch_embed.proj", "classifier": "head"}
    return {"architecture": EXPORT_ARCHITECTURE, "num_classes": cfg.num_classes or 0,
            "num_features": cfg.hidden_size, "global_pool": _pool(cfg), "model_args": args,
            "pretrained_cfg": pretrained}


def _zeros(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.zeros_like(ts[0])


def _in_bias(cfg: ModelConfig, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """megavit's in_proj bias (its biased segments of [q | k | v | mlp]) as (qkv [3h],
    mlp [f]), zeros for a segment without bias."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    qkv = bias[:3 * h] if cfg.add_qkv_bias else bias.new_zeros(3 * h)
    mlp = bias[-f:] if cfg.add_mlp_bias else bias.new_zeros(f)
    return qkv, mlp


def _norm_entries(timm: str, ours: str, size: int, cfg: ModelConfig) -> list[OutputTensor]:
    out = [OutputTensor(timm + ".weight", (size,), [ours + ".weight"])]
    if cfg.normalization == "layernorm":    # timm's LayerNorm always has a bias
        out.append(OutputTensor(timm + ".bias", (size,),
                                [ours + (".bias" if cfg.norm_bias else ".weight")],
                                lambda ts: ts[0] if cfg.norm_bias else torch.zeros_like(ts[0])))
    return out


def _linear_entries(timm: str, ours: str, shape: tuple[int, int]) -> list[OutputTensor]:
    return [OutputTensor(timm + ".weight", shape, [ours + ".weight"]),
            OutputTensor(timm + ".bias", shape[:1], [ours + ".bias"])]


def export_plan(info: dict, cfg: ModelConfig, dtype: torch.dtype | None,
                pre: Preprocessing) -> ExportPlan:
    """timm's parallel-block VisionTransformer, its pretrained_cfg preprocessing as `pre`;
    ConvertError listing every difference when `cfg` does not map."""
    if problems := differences(cfg):
        raise ConvertError("this model does not map onto timm's parallel-block ViT: "
                           + "; ".join(problems))
    h, f, c, p, d = (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_channels, cfg.patch_dim,
                     cfg.head_dim)
    s = cfg.grid[0] * cfg.grid[1]
    entries = [OutputTensor("patch_embed.proj.weight", (h, c, p, p), ["patch_embed.proj.weight"],
                            lambda ts: ts[0].view(h, c, p, p))]
    if cfg.pre_norm:      # timm's patch projection has no bias then: the table carries it
        entries.append(OutputTensor("pos_embed", (1, s, h),
                                    ["pos_embed.weight", "patch_embed.proj.bias"],
                                    lambda ts: (ts[0] + ts[1]).unsqueeze(0)))
        entries += _norm_entries("norm_pre", "pre_norm", h, cfg)
    else:
        entries += [OutputTensor("patch_embed.proj.bias", (h,), ["patch_embed.proj.bias"]),
                    OutputTensor("pos_embed", (1, s, h), ["pos_embed.weight"],
                                 lambda ts: ts[0].unsqueeze(0))]
    if cfg.pooling == "cls":
        entries.append(OutputTensor("cls_token", (1, 1, h), ["cls_token"],
                                    lambda ts: ts[0].view(1, 1, h)))
    for i in range(cfg.num_layers):
        t, m = f"blocks.{i}.", f"blocks.{i}."
        entries += _norm_entries(t + "in_norm", m + "norm", h, cfg)
        entries.append(OutputTensor(t + "in_proj.weight", (f + 3 * h, h), [m + "in_proj.weight"],
                                    lambda ts: torch.cat([ts[0][3 * h:], ts[0][:3 * h]])))
        bias = [m + "in_proj.bias"] if (cfg.add_qkv_bias or cfg.add_mlp_bias) else \
            [m + "in_proj.weight"]
        if cfg.add_qkv_bias:
            entries.append(OutputTensor(
                t + "in_proj.bias", (f + 3 * h,), bias,
                lambda ts: torch.cat(_in_bias(cfg, ts[0])[::-1])))
        else:
            entries.append(OutputTensor(
                t + "mlp_bias", (f,), bias,
                lambda ts: _in_bias(cfg, ts[0])[1] if cfg.add_mlp_bias else ts[0].new_zeros(f)))
        if cfg.qk_layernorm:
            for x in ("q_norm", "k_norm"):
                entries += _norm_entries(t + x, m + "attention." + x, d, cfg)
        entries += [OutputTensor(t + "attn_out_proj.weight", (h, h), [m + "out_proj.weight"],
                                 lambda ts: ts[0][:, :h]),
                    OutputTensor(t + "mlp_out_proj.weight", (h, f), [m + "out_proj.weight"],
                                 lambda ts: ts[0][:, h:])]
        if cfg.add_mlp_bias or cfg.add_proj_bias:
            entries += [OutputTensor(t + "attn_out_proj.bias", (h,), [m + "out_proj.bias"]),
                        OutputTensor(t + "mlp_out_proj.bias", (h,), [m + "out_proj.bias"],
                                     _zeros)]
    entries += _norm_entries("norm", "norm", h, cfg)
    if cfg.pooling == "map":
        a, m = "attn_pool.", "map_head."
        entries.append(OutputTensor(a + "latent", (1, 1, h), [m + "probe"],
                                    lambda ts: ts[0].view(1, 1, h)))
        for timm, ours, shape in (("q", "q", (h, h)), ("kv", "kv", (2 * h, h)),
                                  ("proj", "proj", (h, h)), ("mlp.fc1", "fc1", (f, h)),
                                  ("mlp.fc2", "fc2", (h, f))):
            entries += _linear_entries(a + timm, m + ours, shape)
        entries += _norm_entries(a + "norm", m + "norm", h, cfg)
    if cfg.num_classes:
        entries += _linear_entries("head", "head", (cfg.num_classes, h))
    return ExportPlan("timm VisionTransformer (ParallelScalingBlock)", entries,
                      {"config.json": (json.dumps(timm_config(cfg, pre), indent=2)
                                       + "\n").encode()})


def settings_of(config: dict) -> dict[str, Any]:
    """The VisionTransformer arguments a timm config.json builds: its `model_args` over the
    architecture's registered settings over the class defaults."""
    arch = config.get("architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"architecture {arch!r}: megavit maps timm's parallel-block ViTs "
                           f"({', '.join(ARCHITECTURES)}, with any model_args)")
    model_args = config.get("model_args") or {}
    if unknown := sorted(set(model_args) - set(_DEFAULTS) - _TRAINING_ONLY):
        raise ConvertError(f"model_args {', '.join(unknown)}: settings megavit does not map "
                           "(it knows VisionTransformer's own arguments)")
    settings = {**_DEFAULTS, **ARCHITECTURES[arch], **model_args}
    if "num_classes" in config and "num_classes" not in model_args:   # as timm: args win
        settings["num_classes"] = config["num_classes"]
    for key in ("norm_layer", "act_layer"):
        if isinstance(settings[key], str):
            settings[key] = settings[key].replace("_", "").lower()
    return settings


def model_config_of(config: dict) -> ModelConfig:
    """megavit's ModelConfig for a timm config.json; ConvertError listing whatever cannot
    map."""
    a = settings_of(config)
    problems = [f"{k} {a[k]!r} (megavit has no equivalent)" for k, unsupported in (
        ("block_fn", a["block_fn"] != "ParallelScalingBlock"), ("reg_tokens", a["reg_tokens"]),
        ("init_values", a["init_values"] is not None),
        ("scale_attn_norm", a["scale_attn_norm"]), ("scale_mlp_norm", a["scale_mlp_norm"]),
        ("pos_embed", a["pos_embed"] != "learn"), ("dynamic_img_size", a["dynamic_img_size"]),
        ("dynamic_img_pad", a["dynamic_img_pad"]), ("embed_norm_layer", a["embed_norm_layer"]),
        ("final_norm", not a["final_norm"]), ("pool_include_prefix", a["pool_include_prefix"]),
        ("norm_layer", a["norm_layer"] not in ("layernorm", "rmsnorm")),
        ("act_layer", a["act_layer"] not in _ACTIVATIONS),
        ("global_pool", a["global_pool"] not in ("map", "avg", "token")))
        if unsupported]
    fc_norm = a["fc_norm"] if a["fc_norm"] is not None else a["global_pool"] == "avg"
    if fc_norm:
        problems.append("fc_norm (a norm after pooling; megavit normalises before)")
    if a["class_token"] != (a["global_pool"] == "token"):
        problems.append(f"class_token {a['class_token']} with global_pool "
                        f"{a['global_pool']!r} (megavit pools its class token, or has none)")
    h = a["embed_dim"]
    f = int(a["mlp_ratio"] * h)
    if problems:
        raise ConvertError("this timm model does not map onto megavit: " + "; ".join(problems))
    size = a["img_size"]
    img_h, img_w = (size, size) if isinstance(size, int) else size
    rms = a["norm_layer"] == "rmsnorm"
    return ModelConfig(num_layers=a["depth"], hidden_size=h, num_attention_heads=a["num_heads"],
                       ffn_hidden_size=f, patch_dim=a["patch_size"], img_h=img_h, img_w=img_w,
                       num_channels=a["in_chans"], num_classes=a["num_classes"],
                       block_type="parallel", qk_layernorm=a["qk_norm"],
                       add_qkv_bias=a["qkv_bias"], add_mlp_bias=True,
                       add_proj_bias=a["proj_bias"], norm_bias=not rms, norm_epsilon=1e-6,
                       normalization="rmsnorm" if rms else "layernorm",
                       pre_norm=a["pre_norm"], position_embedding_type="learned",
                       activation=_ACTIVATIONS[a["act_layer"]],
                       pooling={"map": "map", "avg": "gap", "token": "cls"}[a["global_pool"]])


def import_plan(config: dict) -> ImportPlan:
    """The reverse of `export_plan` for a timm config.json."""

    a = settings_of(config)
    cfg = model_config_of(config)
    shapes = serial_shapes({"model": dataclasses.asdict(cfg)})
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    s = cfg.grid[0] * cfg.grid[1]
    pos_has_cls = cfg.pooling == "cls" and not a["no_embed_class"]
    same = [("norm", "norm")]
    entries = [OutputTensor("patch_embed.proj.weight", shapes["patch_embed.proj.weight"],
                            ["patch_embed.proj.weight"], lambda ts: ts[0].reshape(h, -1)),
               OutputTensor("pos_embed.weight", (s, h), ["pos_embed"],
                            lambda ts: ts[0][0, 1:] if pos_has_cls else ts[0][0])]
    if cfg.pre_norm:      # timm's patch projection has no bias then
        entries.append(OutputTensor("patch_embed.proj.bias", (h,), ["pos_embed"],
                                    lambda ts: ts[0].new_zeros(h)))
        same.append(("pre_norm", "norm_pre"))
    else:
        entries.append(OutputTensor("patch_embed.proj.bias", (h,), ["patch_embed.proj.bias"]))
    if cfg.pooling == "cls":
        entries.append(OutputTensor(
            "cls_token", (h,), ["cls_token", "pos_embed"],
            lambda ts: ts[0].reshape(h) + (ts[1][0, 0] if pos_has_cls else 0)))
    for i in range(cfg.num_layers):
        t = m = f"blocks.{i}."
        same.append((m + "norm", t + "in_norm"))
        entries.append(OutputTensor(m + "in_proj.weight", (3 * h + f, h), [t + "in_proj.weight"],
                                    lambda ts: torch.cat([ts[0][f:], ts[0][:f]])))
        if cfg.add_qkv_bias:
            entries.append(OutputTensor(m + "in_proj.bias", (3 * h + f,), [t + "in_proj.bias"],
                                        lambda ts: torch.cat([ts[0][f:], ts[0][:f]])))
        else:
            entries.append(OutputTensor(m + "in_proj.bias", (f,), [t + "mlp_bias"]))
        if cfg.qk_layernorm:
            same += [(m + "attention.q_norm", t + "q_norm"), (m + "attention.k_norm", t + "k_norm")]
        entries.append(OutputTensor(m + "out_proj.weight", (h, h + f),
                                    [t + "attn_out_proj.weight", t + "mlp_out_proj.weight"],
                                    lambda ts: torch.cat(ts, dim=1)))
        if a["proj_bias"]:
            entries.append(OutputTensor(m + "out_proj.bias", (h,),
                                        [t + "attn_out_proj.bias", t + "mlp_out_proj.bias"],
                                        lambda ts: ts[0] + ts[1]))
        else:           # megavit's MLP bias brings an output bias: zero, as timm has none
            entries.append(OutputTensor(m + "out_proj.bias", (h,), [t + "attn_out_proj.weight"],
                                        lambda ts: ts[0].new_zeros(h)))
    if cfg.pooling == "map":
        entries.append(OutputTensor("map_head.probe", (h,), ["attn_pool.latent"],
                                    lambda ts: ts[0].reshape(h)))
        same += [("map_head." + ours, "attn_pool." + timm) for ours, timm in (
            ("q", "q"), ("kv", "kv"), ("proj", "proj"), ("norm", "norm"), ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"))]
    if cfg.num_classes:
        same.append(("head", "head"))
    for ours, timm in same:
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in shapes:
                entries.append(OutputTensor(f"{ours}.{kind}", shapes[f"{ours}.{kind}"],
                                            [f"{timm}.{kind}"]))
    return ImportPlan(f"timm {config['architecture']}", {"model": dataclasses.asdict(cfg)},
                      entries, model_flags(cfg))
