"""A checkpoint's model for inference, in one process on the CPU, whatever layout saved it.

    loaded = load_for_inference(Path("runs/quickstart/ckpt"))   # a --save dir or iter_N/
    loaded.kind            # "classifier", "segmentation" or "two-tower"
    x = loaded.preprocessing.normalise(read_pixels(path, loaded.preprocessing)[None])
    logits = loaded.model(x)

The kind comes from the checkpoint's description (`megavit_config.json`): a "text" section
makes it a two-tower model (its tokenizer is loaded from beside the weights), a
"segmentation" section a ViT with a dense head, otherwise a ViT classifier (one without a
classifier, --num-classes 0, is a feature extractor). The weights are read through the same
piece check as a resumed run (a tensor that does not fit names itself; nothing half-loaded),
resharded from any saved TP / PP layout. The preprocessing is the one the checkpoint
records (a note says what is assumed for a checkpoint written before megavit recorded it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from megavit.checkpointing.checkpointer import CONFIG_FILE, resolve_checkpoint
from megavit.checkpointing.model_config import read_checkpoint_info
from megavit.checkpointing.model_state import (CheckpointLoadError, check_loadable,
                                               check_pieces, load_state, model_state_dict)
from megavit.checkpointing.pieces import serial_meta_model
from megavit.config import ModelConfig, TextConfig, section_from_dict
from megavit.data.preprocessing import Preprocessing, checkpoint_preprocessing
from megavit.data.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, load_for_text_tower

KINDS = ("classifier", "segmentation", "two-tower")


@dataclass
class InferenceModel:
    """What `load_for_inference` returns: the model in eval mode and what reading it needs."""

    kind: str                          # one of KINDS
    model: nn.Module
    info: dict                         # the checkpoint's description
    checkpoint: Path                   # the iter_N/ directory read
    preprocessing: Preprocessing
    note: str | None = None            # an assumption about the preprocessing, if any
    tokenizer: Tokenizer | None = None
    class_names: list[str] = field(default_factory=list)   # empty when it does not know

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.info["model"])


def checkpoint_kind(info: dict) -> str:
    """"two-tower", "segmentation" or "classifier" from a checkpoint description."""
    if "text" in info:
        return "two-tower"
    return "segmentation" if "segmentation" in info else "classifier"


def load_for_inference(path: Path, tokenizer_model: str | None = None,
                       pstate=None) -> InferenceModel:
    """The model of the checkpoint at `path` (a checkpoint or the latest of a --save
    directory), its weights loaded, in eval mode; CheckpointLoadError /
    CheckpointDirectoryError (UserErrors) naming what is wrong. `pstate`: a ParallelState
    whose TP group splits the model (no pipeline or sequence parallelism; default: one
    process); every rank of it then computes the same outputs."""
    from megavit.models.transformer import Runtime
    from megavit.parallel.state import serial_state

    checkpoint = resolve_checkpoint(path)
    info = read_checkpoint_info(checkpoint)
    kind = checkpoint_kind(info)
    cfg = ModelConfig(**info["model"])
    pstate = pstate or serial_state()
    if pstate.pp.size > 1:
        raise CheckpointLoadError("inference runs without pipeline parallelism (one stage)")
    if cfg.num_attention_heads % pstate.tp.size or cfg.ffn_hidden_size % pstate.tp.size:
        raise CheckpointLoadError(f"{checkpoint}: tensor-parallel size {pstate.tp.size} does "
                                  f"not divide the {cfg.num_attention_heads} heads and the MLP "
                                  f"width {cfg.ffn_hidden_size}")
    rt = Runtime(tp=pstate.tp)
    tokenizer, names = None, list(info.get("classes", {}).get("names", []))
    if kind == "two-tower":
        tokenizer = _two_tower_tokenizer(info, checkpoint, tokenizer_model)
        model = _two_tower(info, cfg, rt, pstate.device)
    else:
        model = _image_model(kind, cfg, info, rt, pstate.device)
        if kind == "segmentation":
            names = list(info["segmentation"].get("class_names", names))
    check_loadable(checkpoint)
    check_pieces(checkpoint, serial_meta_model(info, 1), prefix="model/")
    load_state({f"model/{k}": v for k, v in model_state_dict(model, pstate).items()},
               checkpoint, pstate, f"{kind} model")
    pre, note = checkpoint_preprocessing(info, cfg, str(checkpoint / CONFIG_FILE))
    return InferenceModel(kind, model.eval(), info, checkpoint, pre, note, tokenizer, names)


def load_frozen_classifier(path: Path, pstate, here: bool, what: str = "teacher"
                           ) -> InferenceModel | None:
    """A classifier checkpoint's model for forward passes inside a training job: split over
    `pstate`'s TP group (any saved layout resharded), in eval mode, every parameter frozen
    (requires_grad False), on the ranks where `here` (None elsewhere). Every rank of the
    world calls it: the read is collective; the others read nothing. Checks as
    `load_for_inference`, errors naming `what`."""
    return _load_frozen(path, pstate, here, what, "classifier")


def load_frozen_two_tower(path: Path, pstate, here: bool, what: str = "teacher",
                          tokenizer_model: str | None = None) -> InferenceModel | None:
    """`load_frozen_classifier` for a two-tower (megavit.pretrain_contrastive) checkpoint:
    both towers, the projections and the temperature, with the tokenizer saved beside the
    weights or `tokenizer_model` (InferenceModel.tokenizer, on the ranks where `here`;
    every rank reads and checks it before the collective read)."""
    return _load_frozen(path, pstate, here, what, "two-tower", tokenizer_model)


def _load_frozen(path: Path, pstate, here: bool, what: str, want: str,
                 tokenizer_model: str | None = None) -> InferenceModel | None:
    from megavit.models.transformer import Runtime

    checkpoint = resolve_checkpoint(path)
    info = read_checkpoint_info(checkpoint)
    kind = checkpoint_kind(info)
    if kind != want:
        article = "an" if want[0] in "aeiou" else "a"
        raise CheckpointLoadError(f"{checkpoint}: the {what} must be {article} {want} model; "
                                  f"this is a {kind} checkpoint")
    cfg = ModelConfig(**info["model"])
    if kind == "classifier" and not cfg.num_classes:
        raise CheckpointLoadError(f"{checkpoint}: the {what} has no classifier (--num-classes "
                                  "0, a feature extractor)")
    text = info.get("text", {})
    sizes = {"heads": cfg.num_attention_heads, "MLP width": cfg.ffn_hidden_size, **({
        "text heads": text["text_num_attention_heads"],
        "text MLP width": text["text_ffn_hidden_size"],
        "--make-vocab-size-divisible-by": text["make_vocab_size_divisible_by"]}
        if text else {})}
    if bad := [f"{k} {v}" for k, v in sizes.items() if v % pstate.tp.size]:
        raise CheckpointLoadError(f"{checkpoint}: tensor-parallel size {pstate.tp.size} does "
                                  f"not divide the {what}'s {', '.join(bad)}")
    check_loadable(checkpoint)
    check_pieces(checkpoint, serial_meta_model(info, 1), prefix="model/")
    # every rank: a bad preprocessing section or tokenizer must stop them all, before the
    # collective
    pre, note = checkpoint_preprocessing(info, cfg, str(checkpoint / CONFIG_FILE))
    tokenizer = (_two_tower_tokenizer(info, checkpoint, tokenizer_model)
                 if kind == "two-tower" else None)
    if not here:
        load_state({}, checkpoint, pstate, f"{what} model")
        return None
    rt = Runtime(tp=pstate.tp)
    if kind == "two-tower":
        model = _two_tower(info, cfg, rt, pstate.device)
    else:
        model = _image_model(kind, cfg, info, rt, pstate.device)
    load_state({f"model/{k}": v for k, v in model_state_dict(model, pstate).items()},
               checkpoint, pstate, f"{what} model")
    model.eval().requires_grad_(False)
    return InferenceModel(kind, model, info, checkpoint, pre, note, tokenizer,
                          class_names=list(info.get("classes", {}).get("names", [])))


def _image_model(kind: str, cfg: ModelConfig, info: dict, rt, device) -> nn.Module:
    """A ViT classifier or a segmentation model of the checkpoint description `info` (the
    model section replaced by `cfg`), materialised on `device` (weights to be loaded)."""
    import torch

    from megavit.models.dense import dense_from_description
    from megavit.models.vit import VisionTransformer
    from megavit.parallel.sharding import initialize_parameters

    from megavit.models.distilled import DistilledStudent

    distilled = info.get("distillation", {})
    widths, pooled = distilled.get("feature_widths") or [], distilled.get("pooled_width", 0)
    with torch.device("meta"):      # (a feature-distilled student keeps its projections)
        model = (dense_from_description(cfg, rt, info["segmentation"])
                 if kind == "segmentation" else
                 DistilledStudent(cfg, rt, widths, pooled_width=pooled) if widths or pooled
                 else VisionTransformer(cfg, rt))
    initialize_parameters(model, 0, device=device)
    return model


def _two_tower_tokenizer(info: dict, checkpoint: Path, tokenizer_model: str | None
                         ) -> Tokenizer:
    """The tokenizer of a two-tower checkpoint: `tokenizer_model` or the one saved beside
    its weights, checked against the vocabulary it was trained with."""
    text = dict(info["text"])
    vocab = text.pop("vocab_size")
    for key in ("pad_id", "eos_id"):
        text.pop(key)
    tok_path = tokenizer_model or checkpoint / TOKENIZER_FILE
    tokenizer = load_for_text_tower(tok_path, section_from_dict(TextConfig, text))
    if tokenizer.vocab_size != vocab:
        raise TokenizerError(f"{tok_path}: {tokenizer.vocab_size} pieces, the checkpoint was "
                             f"trained with {vocab}")
    return tokenizer


def _two_tower(info: dict, cfg: ModelConfig, rt, device="cpu") -> nn.Module:
    """The two-tower model of the checkpoint description `info`, materialised on `device`
    (weights to be loaded)."""
    from megavit.models.two_tower import build_two_tower

    text = dict(info["text"])
    vocab, pad, eos = text.pop("vocab_size"), text.pop("pad_id"), text.pop("eos_id")
    text_cfg, c = section_from_dict(TextConfig, text), info["contrastive"]
    return build_two_tower(cfg, text_cfg, rt, rt, 0, vocab, pad, eos, c["embed_dim"],
                           c["loss"], device=device,
                           image_projection=c.get("image_projection", True))


def at_resolution(loaded: InferenceModel, height: int, width: int) -> InferenceModel:
    """`loaded` rebuilt for height x width images: learned position tables resized
    (bicubic: a [g, h] table over the grid, or each learned-2d axis table); sin-cos and
    rope-2d positions are computed for the new grid. The preprocessing makes the new size.
    ConfigError naming --img-h / --img-w when the model cannot take it (the patch, a merge
    or a window must fit)."""
    import dataclasses

    from megavit.config import ConfigError
    from megavit.config.validation import model_problems
    from megavit.models.vit import resize_axis_table, resize_pos_embed

    old = loaded.model_config
    if (old.img_h, old.img_w) == (height, width):
        return loaded
    if loaded.kind == "two-tower":
        raise ConfigError("--img-h / --img-w: resizing a two-tower checkpoint's image tower "
                          "is not supported; its images are resized to "
                          f"{old.img_h}x{old.img_w}")
    cfg = dataclasses.replace(old, img_h=height, img_w=width)
    if problems := model_problems(cfg):
        raise ConfigError(f"--img-h {height} --img-w {width}: " + "; ".join(problems))
    # the loaded model's TP split and device: its state dict holds this rank's shards
    device = next(loaded.model.parameters()).device
    model = _image_model(loaded.kind, cfg, loaded.info, loaded.model.rt, device)
    state = loaded.model.state_dict()
    if "pos_embed.weight" in state:
        state["pos_embed.weight"] = resize_pos_embed(state["pos_embed.weight"], old.grid,
                                                     cfg.grid)
    for key, axis in (("pos_embed.row_weight", 0), ("pos_embed.col_weight", 1)):
        if key in state:
            state[key] = resize_axis_table(state[key], cfg.grid[axis])
    model.load_state_dict(state)
    info = {**loaded.info, "model": dataclasses.asdict(cfg)}
    pre = dataclasses.replace(loaded.preprocessing, height=height, width=width)
    return dataclasses.replace(loaded, model=model.eval(), info=info, preprocessing=pre)

