"""Export a megavit checkpoint to Hugging Face transformers' classes, tensor by tensor.

Sequential-block ViT with a class token -> `ViTForImageClassification`:

    megavit (serial names)                transformers
    patch_embed.proj.weight [h, c*p*p]    vit.embeddings.patch_embeddings.projection.weight
                                          [h, c, p, p] (the same (c, p, p) flattening)
    cls_token [h]                         vit.embeddings.cls_token [1, 1, h]
    pos_embed.weight [s, h]               vit.embeddings.position_embeddings [1, s + 1, h]:
                                          megavit adds no position to the class token, so
                                          its row is zero
    blocks.i.qkv.weight [3h, h] (q|k|v)   vit.encoder.layer.i.attention.attention.
                                          {query,key,value} (rows split)
    blocks.i.proj / norm1 / norm2 / fc1 / fc2
                                          .attention.output.dense / layernorm_before /
                                          layernorm_after / intermediate.dense / output.dense
    norm, head                            vit.layernorm, classifier

The names are transformers' on-disk (Hub) names, which `save_pretrained` writes and every
version reads (5.x renames them in memory, e.g. `q_proj`, and converts when loading);
tests/test_export_hf.py loads the files with the real class and requires nothing missing,
unexpected or mismatched. A model that does not map (the ViT-22B
parallel block, QK-LayerNorm, missing biases, MAP/GAP pooling, ...) is refused with every
difference listed. (timm's parallel-block layout and the two-tower exports are issue 9's
remaining parts.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from megavit.checkpointing.convert import ConvertError, OutputTensor, read_config, \
    write_safetensors
from megavit.config import ModelConfig


def vit_differences(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` from mapping onto transformers' ViT (empty: it maps)."""
    wanted = {"block_type": "sequential", "pooling": "cls", "qk_layernorm": False,
              "add_qkv_bias": True, "add_proj_bias": True, "add_mlp_bias": True,
              "norm_bias": True, "position_embedding_type": "learned"}
    out = [f"--{k.replace('_', '-')} is {getattr(cfg, k)!r}; transformers' ViT has {v!r}"
           for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.img_h != cfg.img_w:
        out.append(f"images are {cfg.img_h}x{cfg.img_w}; transformers' ViT takes square ones")
    if not cfg.num_classes:
        out.append("no classifier (--num-classes 0): export a classification checkpoint")
    return out


def vit_config(cfg: ModelConfig):
    """The transformers `ViTConfig` of `cfg` (no dropout: a trained model for inference)."""
    from transformers import ViTConfig

    return ViTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_attention_heads,
                     intermediate_size=cfg.ffn_hidden_size, hidden_act="gelu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     layer_norm_eps=cfg.norm_epsilon, image_size=cfg.img_h,
                     patch_size=cfg.patch_dim, num_channels=cfg.num_channels, qkv_bias=True,
                     num_labels=cfg.num_classes,
                     architectures=["ViTForImageClassification"])


def vit_entries(cfg: ModelConfig) -> list[OutputTensor]:
    """transformers' ViTForImageClassification tensors, each made from megavit's serial
    parameters."""
    h, c, p = cfg.hidden_size, cfg.num_channels, cfg.patch_dim
    s = cfg.grid[0] * cfg.grid[1]

    def rows(k: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        return lambda ts: ts[0][k * h:(k + 1) * h]

    e = "vit.embeddings."
    out = [
        OutputTensor(e + "cls_token", (1, 1, h), ["cls_token"], lambda ts: ts[0].view(1, 1, h)),
        OutputTensor(e + "position_embeddings", (1, s + 1, h), ["pos_embed.weight"],
                     lambda ts: torch.cat([ts[0].new_zeros(1, h), ts[0]]).unsqueeze(0)),
        OutputTensor(e + "patch_embeddings.projection.weight", (h, c, p, p),
                     ["patch_embed.proj.weight"], lambda ts: ts[0].view(h, c, p, p)),
        OutputTensor(e + "patch_embeddings.projection.bias", (h,), ["patch_embed.proj.bias"]),
    ]
    for i in range(cfg.num_layers):
        hf, mv = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for k, name in enumerate(("query", "key", "value")):
            out.append(OutputTensor(f"{hf}attention.attention.{name}.weight", (h, h),
                                    [mv + "qkv.weight"], rows(k)))
            out.append(OutputTensor(f"{hf}attention.attention.{name}.bias", (h,),
                                    [mv + "qkv.bias"], rows(k)))
        f = cfg.ffn_hidden_size
        for theirs, ours, shape in (("attention.output.dense", "proj", (h, h)),
                                    ("layernorm_before", "norm1", (h,)),
                                    ("layernorm_after", "norm2", (h,)),
                                    ("intermediate.dense", "fc1", (f, h)),
                                    ("output.dense", "fc2", (h, f))):
            out.append(OutputTensor(f"{hf}{theirs}.weight", shape, [f"{mv}{ours}.weight"]))
            out.append(OutputTensor(f"{hf}{theirs}.bias", shape[:1], [f"{mv}{ours}.bias"]))
    out += [OutputTensor("vit.layernorm.weight", (h,), ["norm.weight"]),
            OutputTensor("vit.layernorm.bias", (h,), ["norm.bias"]),
            OutputTensor("classifier.weight", (cfg.num_classes, h), ["head.weight"]),
            OutputTensor("classifier.bias", (cfg.num_classes,), ["head.bias"])]
    return out


def export_transformers(source: Path, output: str | os.PathLike, dtype: torch.dtype | None,
                        buffer_bytes: int, report: Callable[[str], None] = print) -> Path:
    """Write `output`/ (model.safetensors + config.json) that
    `ViTForImageClassification.from_pretrained(output)` loads; staged in OUTPUT.partial/
    and renamed, so a failure leaves nothing."""
    info, cfg = read_config(source)
    if "text" in info:
        raise ConvertError(f"{source}: a two-tower checkpoint; its export (CLIPModel / "
                           "SiglipModel) is not written yet")
    if differences := vit_differences(cfg):
        raise ConvertError(f"{source}: this ViT does not map onto transformers' "
                           "ViTForImageClassification: " + "; ".join(differences))
    config = vit_config(cfg)
    entries = vit_entries(cfg)
    final = Path(output)
    if final.exists():
        raise ConvertError(f"--output {final}: exists; choose a new directory")
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_safetensors(source, staging / "model.safetensors", entries, dtype, buffer_bytes,
                          {"format": "pt"}, report)
        if dtype is not None:
            config.torch_dtype = str(dtype).replace("torch.", "")
        config.to_json_file(str(staging / "config.json"))
        (staging / "megavit_export.json").write_text(json.dumps(
            {"source": str(source), "iteration": info["iteration"], "model": info["model"]},
            indent=1, sort_keys=True) + "\n")
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"exported | transformers ViTForImageClassification | iteration "
           f"{info['iteration']} | path {final} | tensors {len(entries)}")
    return final
