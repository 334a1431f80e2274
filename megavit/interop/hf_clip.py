"""megavit's two-tower model <-> transformers' `CLIPModel` (--loss clip) and `SiglipModel`
(--loss siglip), in both directions.

    megavit (serial names)                 transformers (on-disk names)
    image.patch_embed.proj.weight          vision_model.embeddings.patch_embedding.weight
      [h, c*p*p]                             [h, c, p, p] (the same (c, p, p) flattening)
    image.blocks.i.qkv [3h, h] (q|k|v)     vision_model.encoder.layers.i.self_attn.
                                             {q,k,v}_proj (rows split)
    image.blocks.i.proj / norm1 / norm2 / fc1 / fc2
                                           .self_attn.out_proj / layer_norm1 / layer_norm2 /
                                             mlp.fc1 / mlp.fc2
    image.norm                             vision_model.post_layernorm
    text.embedding.weight [V_pad, h]       text_model.embeddings.token_embedding.weight [V, h]
    text.pos_embed [L, h]                  text_model.embeddings.position_embedding.weight
    text.blocks.i.*                        text_model.encoder.layers.i.* (as the image's)
    text.norm                              text_model.final_layer_norm
    logit_scale []                         logit_scale ([] CLIP, [1] SigLIP)
  CLIP only:
    image.cls_token [h]                    vision_model.embeddings.class_embedding
    image.pos_embed.weight [s, h]          vision_model.embeddings.position_embedding [s+1, h]
    image.pre_norm                         vision_model.pre_layrnorm
    image_proj.weight, text_proj.weight    visual_projection.weight, text_projection.weight
  SigLIP only:
    image.patch_embed.proj.bias            vision_model.embeddings.patch_embedding.bias
    image.pos_embed.weight [s, h]          vision_model.embeddings.position_embedding [s, h]
    image.map_head.probe [h]               vision_model.head.probe [1, 1, h]
    image.map_head.q | kv [h | 2h, h]      vision_model.head.attention.in_proj_{weight,bias}
                                             [3h, h] (torch MultiheadAttention's q|k|v)
    image.map_head.proj / norm / fc1 / fc2 .head.attention.out_proj / layernorm / mlp.fc1 / fc2
    text_proj.{weight,bias}                text_model.head.{weight,bias}
    logit_bias []                          logit_bias [1]

What megavit needs to be either model (anything else is refused, every difference named):
sequential pre-LN blocks with biases everywhere, LayerNorm, no QK-norm, learned positions,
square images, GELU in each tower's MLP (and MAP head): exact (--activation /
--text-activation gelu <-> hidden_act "gelu") or its tanh approximation (gelu_tanh <->
"gelu_pytorch_tanh", SigLIP's; "gelu_new", the same formula in Python, imports as it too;
export writes "gelu_pytorch_tanh"); "quick_gelu", CLIP's default, and every other hidden_act
are refused on import. And
  - CLIP: --loss clip, --pooling cls, --pre-norm, causal text pooled at the first EOS
    (--text-pooling eos; transformers pools the first `eos_token_id` too, unless that id is
    2, its legacy "largest id" rule: a checkpoint whose EOS id is 2 is refused), no text
    projection bias, an image projection.
  - SigLIP: --loss siglip, --pooling map (SigLIP's MAP head: megavit's probe goes through
    q, SigLIP's through in_proj's q rows: the same), no pre-norm, bidirectional text with
    padding NOT masked and the last position pooled (--no-text-causal
    --no-text-mask-padding --text-pooling last: `SiglipTextModel` as its processor calls
    it, without an attention mask), the text head's bias (--text-projection-bias), no
    image projection (--no-image-projection) and SiglipTokenizer's text cleaning
    (--text-cleaning siglip; see Tokenizers).

Mismatches handled exactly:
  - megavit's class token has no position, CLIP's has row 0: import folds the row into the
    class token, export writes a zero row (as hf_vit.py).
  - CLIP's patch embedding has no bias, megavit's has one: export adds it to every patch
    position row ((x W + b) + pos = x W + (pos + b)); import sets it to zero.
  - megavit pads its embedding table to a multiple of --make-vocab-size-divisible-by:
    export keeps the first vocab_size rows, import adds zero rows.
  - SigLIP's scalars are [1], megavit's [].
  - A CLIP directory with the legacy eos_token_id 2 pools the largest id of each row; it
    imports with megavit's EOS id = vocab_size - 1 (CLIP's real EOS, the largest id), which
    picks the same token whenever the largest id of a row is that EOS (true of CLIP's
    tokenizer output).

Tokenizers: a SigLIP export carries the checkpoint's SentencePiece model as `spiece.model`
with `tokenizer_config.json`, so `SiglipTokenizer.from_pretrained(DIR)(texts,
padding="max_length", truncation=True, max_length=L)` gives megavit's ids for every text:
pieces, EOS, megavit's pad id up to L (its pad piece, or EOS with --text-pad-with-eos). That
needs megavit to clean text as SiglipTokenizer does before SentencePiece (--text-cleaning
siglip, required for the export: lower-casing, `string.punctuation` deleted, `re`'s
whitespace runs collapsed; megavit/data/tokenizer.py `SiglipCleaner`); the config adds
`split_special_tokens` (a caption's "</s>" is its letters, as for megavit, not the EOS id)
and no attention mask (its `model_input_names` is ["input_ids"]; a transformers 5
SiglipTokenizer otherwise returns one, and `SiglipModel` called with it would hide padding
from attention, which megavit's --no-text-mask-padding tower does not). transformers' CLIP
tokenizer is byte-level BPE (CLIPTokenizer), which a SentencePiece model cannot be carried
as: a CLIP export writes the weights and config, and the SentencePiece model as
`megavit_tokenizer.model` (read by megavit's `Tokenizer`, not by transformers) so the ids can
still be made. On import, a SigLIP directory's `spiece.model` becomes the checkpoint's
`tokenizer.model` (pass it with --tokenizer-model to train on) with --text-cleaning siglip;
its pad_token (SiglipTokenizer's default, and its released checkpoints': "</s>") must be the
model's pad or EOS piece, the latter imported as --text-pad-with-eos (so is a config.json
whose pad_token_id is its eos_token_id); do_lower_case false is refused. A released SigLIP
tokenizer does not split special tokens: a caption containing the literal text "</s>",
"<unk>" or its pad piece gets that id there (neighbouring spaces dropped), where megavit
reads the letters; every other text gives the same ids. A CLIP directory gives no
tokenizer: the run's --tokenizer-model must have the same vocabulary size and pad / EOS ids
(the resumed run checks), or the text tower learns new ids.

Images: the export's preprocessor_config.json (`CLIPImageProcessor` / `SiglipImageProcessor`,
`preprocessor_configs.py`) holds the checkpoint's preprocessing; import records a
directory's as the checkpoint's "preprocessing" section (the import driver).

The names are transformers' on-disk names (what `save_pretrained` writes);
tests/test_export_clip.py loads the files with the real classes and requires nothing
missing, unexpected or mismatched.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from megavit.checkpointing.offline import ConvertError
from megavit.config import ModelConfig, TextConfig, section_from_dict, section_to_dict
from megavit.data.preprocessing import Preprocessing, default_preprocessing
from megavit.interop.consolidate import OutputTensor
from megavit.interop.hf_vit import FROM_HF_ACTIVATIONS as ACTIVATIONS, HF_ACTIVATIONS
from megavit.interop.mapping import ExportPlan, ImportPlan, model_flags, serial_shapes
from megavit.interop.preprocessor_configs import hf_image_processor

TARGET = {"clip": "CLIPModel", "siglip": "SiglipModel"}
PROCESSOR = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}
_LAYER = (("self_attn.out_proj", "proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
          ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
_MAP_HEAD = (("attention.out_proj", "proj"), ("layernorm", "norm"), ("mlp.fc1", "fc1"),
             ("mlp.fc2", "fc2"))
_BLOCKS = {"block_type": "sequential", "qk_layernorm": False, "add_qkv_bias": True,
           "add_proj_bias": True, "add_mlp_bias": True, "norm_bias": True,
           "position_embedding_type": "learned", "normalization": "layernorm",
           "attention_type": "full", "attention_type_per_layer": ""}
# What each target needs of megavit's configuration, section by section.
WANTED = {
    "clip": {"model": {**_BLOCKS, "pooling": "cls", "pre_norm": True},
             "text": {"text_block_type": "sequential", "text_qk_layernorm": False,
                      "text_causal": True, "text_pooling": "eos",
                      "text_projection_bias": False},
             "contrastive": {"loss": "clip", "image_projection": True}},
    "siglip": {"model": {**_BLOCKS, "pooling": "map", "pre_norm": False},
               "text": {"text_block_type": "sequential", "text_qk_layernorm": False,
                        "text_causal": False, "text_mask_padding": False,
                        "text_pooling": "last", "text_projection_bias": True,
                        "text_cleaning": "siglip"},
               "contrastive": {"loss": "siglip", "image_projection": False}},
}
# transformers' defaults (5.x) for what a config.json may leave out.
_DEFAULTS = {
    "clip": ({"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
              "num_hidden_layers": 12, "num_attention_heads": 8,
              "max_position_embeddings": 77, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "pad_token_id": 1, "eos_token_id": 49407},
             {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
              "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}),
    "siglip": ({"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": 12, "num_attention_heads": 12,
                "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                "layer_norm_eps": 1e-6, "pad_token_id": 1, "eos_token_id": 49407,
                "projection_size": None},
               {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
                "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                "vision_use_head": True}),
}


@dataclass
class TwoTower:
    """A two-tower model as `megavit_config.json` describes it."""

    image: ModelConfig
    text: TextConfig
    vocab_size: int
    pad_id: int
    eos_id: int
    embed_dim: int
    loss: str
    image_projection: bool

    @classmethod
    def of(cls, info: dict) -> "TwoTower":
        """From a checkpoint's description (fields it predates take their defaults)."""
        from megavit.checkpointing.model_state import CheckpointLoadError

        try:
            text = dict(info["text"])
            ids = [text.pop(k) for k in ("vocab_size", "pad_id", "eos_id")]
            c = info["contrastive"]
            return cls(ModelConfig(**info["model"]), section_from_dict(TextConfig, text), *ids,
                       c["embed_dim"], c["loss"], c.get("image_projection", True))
        except (KeyError, TypeError) as e:
            raise CheckpointLoadError(f"a two-tower description this megavit cannot build "
                                      f"({e}); was it written by another version?") from None

    def info(self) -> dict:
        """The "model", "text" and "contrastive" sections a contrastive run records."""
        from megavit.config import ContrastiveConfig

        contrastive = ContrastiveConfig(loss=self.loss, embed_dim=self.embed_dim,
                                        image_projection=self.image_projection)
        return {"model": dataclasses.asdict(self.image),
                "text": {**section_to_dict(self.text), "vocab_size": self.vocab_size,
                         "pad_id": self.pad_id, "eos_id": self.eos_id},
                "contrastive": {**dataclasses.asdict(contrastive),
                                "embed_dim": self.embed_dim}}

    def flags(self) -> list[str]:
        """The megavit.pretrain_contrastive flags that build this model."""
        return (model_flags(self.image) + model_flags(self.text)
                + ["--loss", self.loss, "--embed-dim", str(self.embed_dim),
                   "--image-projection" if self.image_projection else "--no-image-projection"])


def differences(tt: TwoTower) -> list[str]:
    """What keeps `tt` from mapping onto transformers' model for its loss (empty: it maps)."""
    kind = tt.loss
    target = TARGET[kind]
    sections = {"model": tt.image, "text": section_to_dict(tt.text),
                "contrastive": {"loss": tt.loss, "image_projection": tt.image_projection}}
    out = []
    for section, wanted in WANTED[kind].items():
        have = sections[section]
        for key, value in wanted.items():
            got = have[key] if isinstance(have, dict) else getattr(have, key)
            if got != value:
                who = "SiglipTokenizer" if key == "text_cleaning" else target
                out.append(f"--{key.replace('_', '-')} is {got!r}; {who} has {value!r}")
    if tt.image.img_h != tt.image.img_w:
        out.append(f"images are {tt.image.img_h}x{tt.image.img_w}; {target} takes square ones")
    if kind == "clip" and tt.eos_id == 2:
        out.append("the tokenizer's EOS id is 2, which CLIPTextModel reads as its legacy rule "
                   "(pool the largest id), not the first EOS")
    return out


def _encoder(theirs: str, ours: str, layers: int) -> list[tuple[str, str]]:
    """(transformers, megavit) names of the 1:1 tensors of a tower's blocks."""
    return [(f"{theirs}.encoder.layers.{i}.{t}.{kind}", f"{ours}.blocks.{i}.{o}.{kind}")
            for i in range(layers) for t, o in _LAYER for kind in ("weight", "bias")]


def _qkv(theirs: str, i: int, kind: str) -> list[str]:
    return [f"{theirs}.encoder.layers.{i}.self_attn.{x}_proj.{kind}" for x in "qkv"]


def _pairs(tt: TwoTower) -> list[tuple[str, str]]:
    """(transformers name, megavit name) of every tensor both hold unchanged."""
    v, t = "vision_model", "text_model"
    pairs = (_encoder(v, "image", tt.image.num_layers)
             + _encoder(t, "text", tt.text.blocks.num_layers)
             + [(f"{t}.embeddings.position_embedding.weight", "text.pos_embed")])
    for kind in ("weight", "bias"):
        pairs += [(f"{v}.post_layernorm.{kind}", f"image.norm.{kind}"),
                  (f"{t}.final_layer_norm.{kind}", f"text.norm.{kind}")]
    if tt.loss == "clip":
        pairs += [(f"{v}.pre_layrnorm.{kind}", f"image.pre_norm.{kind}")
                  for kind in ("weight", "bias")]
        return pairs + [("visual_projection.weight", "image_proj.weight"),
                        ("text_projection.weight", "text_proj.weight"),
                        ("logit_scale", "logit_scale")]
    pairs += [(f"{v}.embeddings.patch_embedding.bias", "image.patch_embed.proj.bias"),
              (f"{v}.embeddings.position_embedding.weight", "image.pos_embed.weight")]
    for kind in ("weight", "bias"):
        pairs += [(f"{v}.head.{name}.{kind}", f"image.map_head.{o}.{kind}")
                  for name, o in _MAP_HEAD]
        pairs.append((f"{t}.head.{kind}", f"text_proj.{kind}"))
    return pairs


def _rows(start: int, stop: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda ts: ts[0][start:stop]


def _reshape(*shape: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda ts: ts[0].reshape(shape)


def _processor(model_proto: bytes):
    """A SentencePiece model's processor (its pieces and special ids)."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_proto)


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------

def _export_special(tt: TwoTower) -> list[OutputTensor]:
    """The transformers tensors that are not a megavit tensor unchanged."""
    image, text_cfg = tt.image, tt.text
    h, p, ht = image.hidden_size, image.patch_dim, text_cfg.blocks.hidden_size
    s = image.grid[0] * image.grid[1]
    e = "vision_model.embeddings."
    out = [OutputTensor(e + "patch_embedding.weight", (h, image.num_channels, p, p),
                        ["image.patch_embed.proj.weight"], _reshape(h, image.num_channels, p, p)),
           OutputTensor("text_model.embeddings.token_embedding.weight", (tt.vocab_size, ht),
                        ["text.embedding.weight"], _rows(0, tt.vocab_size))]
    for tower, ours, width, layers in (("vision_model", "image", h, image.num_layers),
                                       ("text_model", "text", ht, text_cfg.blocks.num_layers)):
        for i in range(layers):
            for kind in ("weight", "bias"):
                for k, name in enumerate(_qkv(tower, i, kind)):
                    out.append(OutputTensor(name, (width, width)[:2 if kind == "weight" else 1],
                                            [f"{ours}.blocks.{i}.qkv.{kind}"],
                                            _rows(k * width, (k + 1) * width)))
    if tt.loss == "clip":
        return out + [
            OutputTensor(e + "class_embedding", (h,), ["image.cls_token"]),
            OutputTensor(e + "position_embedding.weight", (s + 1, h),
                         ["image.pos_embed.weight", "image.patch_embed.proj.bias"],
                         lambda ts: torch.cat([ts[0].new_zeros(1, h), ts[0] + ts[1]]))]
    head = "vision_model.head."
    return out + [
        OutputTensor(head + "probe", (1, 1, h), ["image.map_head.probe"], _reshape(1, 1, h)),
        OutputTensor(head + "attention.in_proj_weight", (3 * h, h),
                     ["image.map_head.q.weight", "image.map_head.kv.weight"], torch.cat),
        OutputTensor(head + "attention.in_proj_bias", (3 * h,),
                     ["image.map_head.q.bias", "image.map_head.kv.bias"], torch.cat),
        OutputTensor("logit_scale", (1,), ["logit_scale"], _reshape(1)),
        OutputTensor("logit_bias", (1,), ["logit_bias"], _reshape(1))]


def _hf_config(tt: TwoTower, dtype: torch.dtype | None):
    """transformers' CLIPConfig / SiglipConfig of `tt`."""
    image, text_cfg = tt.image, tt.text
    blocks = text_cfg.blocks
    text = dict(vocab_size=tt.vocab_size, hidden_size=blocks.hidden_size,
                intermediate_size=blocks.ffn_hidden_size, num_hidden_layers=blocks.num_layers,
                num_attention_heads=blocks.num_attention_heads,
                max_position_embeddings=text_cfg.context_length,
                hidden_act=HF_ACTIVATIONS[blocks.activation],
                layer_norm_eps=blocks.norm_epsilon, attention_dropout=0.0,
                pad_token_id=tt.pad_id, eos_token_id=tt.eos_id, bos_token_id=None)
    vision = dict(hidden_size=image.hidden_size, intermediate_size=image.ffn_hidden_size,
                  num_hidden_layers=image.num_layers,
                  num_attention_heads=image.num_attention_heads, num_channels=image.num_channels,
                  image_size=image.img_h, patch_size=image.patch_dim,
                  hidden_act=HF_ACTIVATIONS[image.activation], layer_norm_eps=image.norm_epsilon,
                  attention_dropout=0.0)
    if tt.loss == "clip":
        from transformers import CLIPConfig

        config = CLIPConfig(text_config={**text, "projection_dim": tt.embed_dim},
                            vision_config={**vision, "projection_dim": tt.embed_dim},
                            projection_dim=tt.embed_dim, architectures=["CLIPModel"])
    else:
        from transformers import SiglipConfig

        config = SiglipConfig(text_config={**text, "projection_size": tt.embed_dim},
                              vision_config={**vision, "vision_use_head": True},
                              architectures=["SiglipModel"])
    if dtype is not None:
        config.torch_dtype = str(dtype).replace("torch.", "")
    return config


def _tokenizer_files(tt: TwoTower, source: Path | None) -> dict[str, bytes]:
    """SigLIP: the checkpoint's SentencePiece model as `SiglipTokenizer` reads it. CLIP:
    the model as `megavit_tokenizer.model` (transformers has no SentencePiece CLIP
    tokenizer). Nothing without a source or a tokenizer beside the tensors."""
    from megavit.data.tokenizer import TOKENIZER_FILE, load_for_text_tower

    path = source / TOKENIZER_FILE if source is not None else None
    if path is None or not path.is_file():
        return {}
    if tt.loss == "clip":
        return {"megavit_tokenizer.model": path.read_bytes()}
    tok = load_for_text_tower(path, tt.text)
    if tok.vocab_size != tt.vocab_size:
        raise ConvertError(f"{path}: {tok.vocab_size} pieces, the model was built for "
                           f"{tt.vocab_size}")
    piece = _processor(tok.model_proto).id_to_piece
    special = {"pad_token": piece(tok.pad_id), "eos_token": piece(tok.eos_id),
               "unk_token": piece(tok.unk_id)}
    config = {"tokenizer_class": "SiglipTokenizer", "model_max_length": tt.text.context_length,
              "do_lower_case": tok.cleaner.lowercase,
              # no "attention_mask" among its outputs: `SiglipModel(**tokenizer(texts))` then
              # attends to padding, as megavit's --no-text-mask-padding tower does
              "model_input_names": ["input_ids"],
              # "</s>" in a caption is text (its letters), as for megavit, not the EOS id
              "split_special_tokens": True, **special}
    return {"spiece.model": tok.model_proto,
            "tokenizer_config.json": (json.dumps(config, indent=1) + "\n").encode(),
            "special_tokens_map.json": (json.dumps(special, indent=1) + "\n").encode()}


def export_plan(info: dict, cfg: ModelConfig, dtype: torch.dtype | None,
                source: Path | None = None, pre: Preprocessing | None = None) -> ExportPlan:
    """`CLIPModel` (--loss clip) or `SiglipModel` (--loss siglip) of the checkpoint `source`
    described by `info`, with a `CLIPImageProcessor` / `SiglipImageProcessor` doing `pre`
    (default: megavit's image-file reading); ConvertError listing every difference when it
    does not map."""
    tt = TwoTower.of(info)
    if problems := differences(tt):
        raise ConvertError(f"this two-tower model does not map onto transformers' "
                           f"{TARGET[tt.loss]} (--loss {tt.loss}): " + "; ".join(problems))
    shapes = serial_shapes(tt.info())
    entries = _export_special(tt)
    for theirs, ours in _pairs(tt):
        entries.append(OutputTensor(theirs, shapes[ours], [ours]))
    config = _hf_config(tt, dtype)
    processor = hf_image_processor(pre or default_preprocessing(cfg), PROCESSOR[tt.loss])
    files = {"config.json": config.to_json_string().encode(),
             "preprocessor_config.json": (json.dumps(processor, indent=2) + "\n").encode(),
             **_tokenizer_files(tt, source)}
    return ExportPlan(f"transformers {TARGET[tt.loss]}", entries, files)


# ---------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------

def _sub_configs(config: dict) -> tuple[str, dict, dict]:
    kind = config["model_type"]
    text_defaults, vision_defaults = _DEFAULTS[kind]
    return (kind, {**text_defaults, **(config.get("text_config") or {})},
            {**vision_defaults, **(config.get("vision_config") or {})})


def _config_problems(kind: str, config: dict, t: dict, v: dict) -> list[str]:
    """What in a CLIP / SigLIP config.json megavit cannot build."""
    out = []
    architectures = config.get("architectures") or [TARGET[kind]]
    if architectures[0] != TARGET[kind]:
        out.append(f"architectures {architectures}: megavit maps {TARGET[kind]}")
    for name, sub in (("text_config", t), ("vision_config", v)):
        if sub["hidden_act"] not in ACTIVATIONS:
            out.append(f"{name}.hidden_act {sub['hidden_act']!r}; megavit's MLP has "
                       f"{', '.join(ACTIVATIONS)}")
    for key in ("image_size", "patch_size"):
        if isinstance(v[key], (list, tuple)):
            out.append(f"vision_config.{key} {v[key]}: only square images and patches map")
    if isinstance(t["eos_token_id"], (list, tuple)):
        out.append(f"text_config.eos_token_id {t['eos_token_id']}: megavit has one EOS id")
    if kind == "siglip":
        if not v["vision_use_head"]:
            out.append("vision_config.vision_use_head false: megavit's SigLIP image tower "
                       "pools with the MAP head")
        projection = t["projection_size"] or t["hidden_size"]
        if projection != v["hidden_size"]:
            out.append(f"text_config.projection_size {projection} differs from the image "
                       f"width {v['hidden_size']}: SigLIP compares them directly")
    return out


# SiglipTokenizer's defaults for what its tokenizer files leave out
_SIGLIP_TOKENIZER = {"pad_token": "</s>", "eos_token": "</s>", "do_lower_case": True}


def _tokenizer_settings(directory: Path) -> dict:
    """SigLIP's tokenizer settings: its defaults, then tokenizer_config.json, then
    special_tokens_map.json (which transformers lets override it); special tokens as their
    text."""
    settings = dict(_SIGLIP_TOKENIZER)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).is_file():
            settings.update(json.loads((directory / name).read_text()))
    return {k: v.get("content") if isinstance(v, dict) else v for k, v in settings.items()}


@dataclass
class _SiglipVocab:
    """A SigLIP directory's tokenizer as megavit reads it."""

    files: dict[str, bytes]      # the checkpoint's side files (none: no spiece.model)
    pad_id: int = -1
    eos_id: int = -1
    problems: list[str] = dataclasses.field(default_factory=list)


def _siglip_tokenizer(directory: Path, vocab_size: int) -> _SiglipVocab:
    """A SigLIP directory's `spiece.model` as the checkpoint's tokenizer, padding as its
    settings say: with the model's pad piece, or with EOS (SigLIP's released tokenizers:
    pad_token "</s>"; megavit's --text-pad-with-eos)."""
    from megavit.data.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError

    path = directory / "spiece.model"
    if not path.is_file():
        return _SiglipVocab({})
    settings = _tokenizer_settings(directory)
    try:        # (padding with EOS: a model without a pad piece loads too)
        tok = Tokenizer.load(path, 2, cleaning="siglip", pad_with_eos=True)
    except TokenizerError as e:
        return _SiglipVocab({}, problems=[str(e)])
    sp = _processor(tok.model_proto)
    eos = sp.id_to_piece(sp.eos_id())
    problems = []
    if tok.vocab_size != vocab_size:
        problems.append(f"{path}: {tok.vocab_size} pieces, text_config.vocab_size {vocab_size}")
    if settings["eos_token"] != eos:
        problems.append(f"{directory}: SigLIP's tokenizer ends texts with "
                        f"{settings['eos_token']!r}, its model's EOS piece is {eos!r}")
    pads = {eos: sp.eos_id()}
    if sp.pad_id() >= 0:
        pads[sp.id_to_piece(sp.pad_id())] = sp.pad_id()
    if settings["pad_token"] not in pads:
        problems.append(f"{directory}: SigLIP's tokenizer pads with {settings['pad_token']!r}; "
                        f"megavit pads with the model's pad or EOS piece ({', '.join(pads)})")
    if not settings["do_lower_case"]:
        problems.append(f"{directory}: do_lower_case false; megavit's --text-cleaning siglip "
                        "lower-cases")
    return _SiglipVocab({TOKENIZER_FILE: tok.model_proto},
                        pads.get(settings["pad_token"], -1), sp.eos_id(), problems)


def two_tower_of(directory: Path, config: dict) -> tuple[TwoTower, dict[str, bytes]]:
    """megavit's model for a CLIP / SigLIP config.json (and the tokenizer file a SigLIP
    directory brings); ConvertError listing whatever cannot map."""
    kind, t, v = _sub_configs(config)
    problems = _config_problems(kind, config, t, v)
    files, pad, eos = {}, t["pad_token_id"], t["eos_token_id"]
    if kind == "siglip":
        vocab = _siglip_tokenizer(directory, t["vocab_size"])
        problems += vocab.problems
        if vocab.files:
            files, pad, eos = vocab.files, vocab.pad_id, vocab.eos_id
    elif eos == 2:       # transformers' legacy CLIP rule: the largest id is the EOS
        eos = t["vocab_size"] - 1
    pad = 0 if pad is None else pad     # (no pad id in config.json: nothing tells padding)
    for name, token in (("pad", pad), ("EOS", eos)):
        if not isinstance(token, int) or not 0 <= token < t["vocab_size"]:
            problems.append(f"the {name} id {token!r} is not in the {t['vocab_size']}-piece "
                            "vocabulary (a SigLIP directory without spiece.model: add it)")
    if problems:
        raise ConvertError(f"{directory / 'config.json'}: this transformers "
                           f"{TARGET[kind]} does not map onto megavit: " + "; ".join(problems))
    clip = kind == "clip"
    image = ModelConfig(
        num_layers=v["num_hidden_layers"], hidden_size=v["hidden_size"],
        num_attention_heads=v["num_attention_heads"], ffn_hidden_size=v["intermediate_size"],
        patch_dim=v["patch_size"], img_h=v["image_size"], img_w=v["image_size"],
        num_channels=v["num_channels"], num_classes=0, norm_epsilon=v["layer_norm_eps"],
        activation=ACTIVATIONS[v["hidden_act"]], **WANTED[kind]["model"])
    wanted = WANTED[kind]["text"]
    text = section_from_dict(TextConfig, dict(
        text_num_layers=t["num_hidden_layers"], text_hidden_size=t["hidden_size"],
        text_num_attention_heads=t["num_attention_heads"],
        text_ffn_hidden_size=t["intermediate_size"],
        context_length=t["max_position_embeddings"], text_norm_epsilon=t["layer_norm_eps"],
        text_activation=ACTIVATIONS[t["hidden_act"]], text_pad_with_eos=pad == eos, **wanted))
    embed_dim = config.get("projection_dim", 512) if clip else v["hidden_size"]
    tt = TwoTower(image, text, t["vocab_size"], pad, eos, embed_dim, kind, clip)
    return tt, files


def _import_special(tt: TwoTower) -> list[OutputTensor]:
    """The megavit parameters that are not a transformers tensor unchanged."""
    image, text_cfg = tt.image, tt.text
    h, ht = image.hidden_size, text_cfg.blocks.hidden_size
    e = "vision_model.embeddings."
    shapes = serial_shapes(tt.info())
    rows = shapes["text.embedding.weight"][0]
    out = [OutputTensor("image.patch_embed.proj.weight", shapes["image.patch_embed.proj.weight"],
                        [e + "patch_embedding.weight"], _reshape(h, -1)),
           OutputTensor("text.embedding.weight", (rows, ht),
                        ["text_model.embeddings.token_embedding.weight"],
                        lambda ts: torch.cat([ts[0], ts[0].new_zeros(rows - ts[0].shape[0],
                                                                     ht)]))]
    for tower, ours, width, layers in (("vision_model", "image", h, image.num_layers),
                                       ("text_model", "text", ht, text_cfg.blocks.num_layers)):
        for i in range(layers):
            for kind in ("weight", "bias"):
                out.append(OutputTensor(f"{ours}.blocks.{i}.qkv.{kind}",
                                        (3 * width, width)[:2 if kind == "weight" else 1],
                                        _qkv(tower, i, kind), torch.cat))
    if tt.loss == "clip":
        return out + [
            OutputTensor("image.patch_embed.proj.bias", (h,), [],
                         lambda ts: torch.zeros(h)),
            OutputTensor("image.cls_token", (h,),
                         [e + "class_embedding", e + "position_embedding.weight"],
                         lambda ts: ts[0] + ts[1][0]),
            OutputTensor("image.pos_embed.weight", shapes["image.pos_embed.weight"],
                         [e + "position_embedding.weight"], lambda ts: ts[0][1:])]
    head = "vision_model.head."
    return out + [
        OutputTensor("image.map_head.probe", (h,), [head + "probe"], _reshape(h)),
        OutputTensor("image.map_head.q.weight", (h, h), [head + "attention.in_proj_weight"],
                     _rows(0, h)),
        OutputTensor("image.map_head.kv.weight", (2 * h, h),
                     [head + "attention.in_proj_weight"], _rows(h, 3 * h)),
        OutputTensor("image.map_head.q.bias", (h,), [head + "attention.in_proj_bias"],
                     _rows(0, h)),
        OutputTensor("image.map_head.kv.bias", (2 * h,), [head + "attention.in_proj_bias"],
                     _rows(h, 3 * h)),
        OutputTensor("logit_scale", (), ["logit_scale"], _reshape()),
        OutputTensor("logit_bias", (), ["logit_bias"], _reshape())]


def import_plan(directory: Path, config: dict) -> ImportPlan:
    """The reverse of `export_plan` for a transformers CLIP / SigLIP directory."""
    tt, files = two_tower_of(directory, config)
    shapes = serial_shapes(tt.info())
    entries = _import_special(tt) + [OutputTensor(ours, shapes[ours], [theirs])
                                     for theirs, ours in _pairs(tt)]
    # older saves keep the position-id buffers [1, L] (0, 1, ..., L-1): nothing to import
    return ImportPlan(f"transformers {TARGET[tt.loss]}", tt.info(), entries, tt.flags(),
                      side_files=files, ignored=["text_model.embeddings.position_ids",
                                                 "vision_model.embeddings.position_ids"])
