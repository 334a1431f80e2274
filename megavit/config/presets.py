"""Model sizes by name: `--preset` fills the ViT's flags, `--text-preset` the text tower's;
flags given on the command line override them.

    preset_model_config("vit-b", num_layers=4)   # ViT-B/16 with 4 blocks
"""

from __future__ import annotations

from typing import Any

from megavit.config.fields import ConfigError
from megavit.config.model import ModelConfig

# width, depth, heads, MLP, patch (timm / big_vision sizes; ViT-22B from Dehghani et al.)
_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "vit-debug": (32, 2, 4, 128, 4),  # for tests: 16x16 images, 16 tokens
    "vit-ti": (192, 12, 3, 768, 16),
    "vit-s": (384, 12, 6, 1536, 16),
    "vit-b": (768, 12, 12, 3072, 16),
    "vit-l": (1024, 24, 16, 4096, 16),
    "vit-h": (1280, 32, 16, 5120, 14),
    "vit-g": (1408, 40, 16, 6144, 14),
    "vit-G": (1664, 48, 16, 8192, 14),
    "vit-e": (1792, 56, 16, 15360, 14),
    "vit-22b": (6144, 48, 48, 24576, 14),
}

PRESETS: dict[str, dict[str, Any]] = {
    name: dict(
        hidden_size=h,
        num_layers=depth,
        num_attention_heads=heads,
        ffn_hidden_size=mlp,
        patch_dim=patch,
        img_h=16 if name == "vit-debug" else 224,
        img_w=16 if name == "vit-debug" else 224,
    )
    for name, (h, depth, heads, mlp, patch) in _SIZES.items()
}


def preset_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # width / depth / heads / MLP, matched to the image presets' scale
    "text-debug": dict(text_hidden_size=32, text_num_layers=2, text_num_attention_heads=4,
                       text_ffn_hidden_size=128, context_length=16,
                       make_vocab_size_divisible_by=8),
    "text-s": dict(text_hidden_size=384, text_num_layers=12, text_num_attention_heads=6,
                   text_ffn_hidden_size=1536),
    "text-b": dict(text_hidden_size=512, text_num_layers=12, text_num_attention_heads=8,
                   text_ffn_hidden_size=2048),
    "text-l": dict(text_hidden_size=768, text_num_layers=12, text_num_attention_heads=12,
                   text_ffn_hidden_size=3072),
    "text-h": dict(text_hidden_size=1024, text_num_layers=24, text_num_attention_heads=16,
                   text_ffn_hidden_size=4096),
    "text-g": dict(text_hidden_size=1280, text_num_layers=32, text_num_attention_heads=20,
                   text_ffn_hidden_size=5120),
}



def preset_help() -> str:
    """--preset's help: what it does and every preset's sizes."""
    return ("Model size by name; fills the model flags, which still override it. "
            "Sizes (width/depth/heads/MLP/patch): "
            + "; ".join(f"{n} {h}/{d}/{a}/{m}/{p}" for n, (h, d, a, m, p) in _SIZES.items()))


def text_preset_help() -> str:
    """--text-preset's help: what it does and every text preset's sizes."""
    return ("Text tower size by name; fills the text flags, which still override it. "
            "Sizes (width/depth/heads/MLP): " + "; ".join(
                f"{n} {v['text_hidden_size']}/{v['text_num_layers']}/"
                f"{v['text_num_attention_heads']}/{v['text_ffn_hidden_size']}"
                for n, v in TEXT_PRESETS.items()))
