"""Parameters as layout-independent pieces: what a resharding checkpoint stores.

A TP-sharded parameter is not one contiguous block of the serial tensor when its weight is
fused (`in_proj` = [q | k | v | fc1] along dim 0, each segment split over TP): rank r holds
chunk r of *every* segment. Cut along the segments, each piece is a contiguous block:

    serial name "blocks.0.in_proj.weight", segments (h, h, h, f) along dim 0, TP = t:
      piece "blocks.0.in_proj.weight/0": serial shape [h, h_in],  this rank's rows
                                          [r*h/t, (r+1)*h/t) — a view of its local tensor
      piece ".../1", ".../2", ".../3":   the same for k, v and fc1

Unfused or replicated parameters are one piece named like the parameter. The pieces depend on
the model only (names and serial shapes), never on the layout, so a checkpoint written at one
TP size reads at any other: each rank asks for the blocks it now owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from megavit.parallel.sharding import get_tp_shard

if TYPE_CHECKING:
    from megavit.config import ModelConfig


@dataclass
class Piece:
    name: str                     # the serial parameter's name, "/k" for its k-th segment
    global_shape: torch.Size      # the piece's serial shape
    offsets: tuple[int, ...]      # where this rank's block starts in it
    local: torch.Tensor           # this rank's block: a view of the local parameter


def pieces_of(name: str, local: torch.Tensor, shard=None) -> list[Piece]:
    """The pieces of one parameter (or a tensor shaped like it, e.g. an Adam moment) held
    by this rank. `shard`: its `TPShard`, read from `local` when not given."""
    shard = shard if shard is not None else get_tp_shard(local)
    if shard is None:
        return [Piece(name, local.shape, (0,) * local.dim(), local)]
    out = []
    start = 0
    fused = len(shard.segments) > 1
    for k, (full, part) in enumerate(zip(shard.segments, shard.local_segments)):
        shape = list(local.shape)
        shape[shard.dim] = full
        offsets = [0] * local.dim()
        offsets[shard.dim] = shard.rank * part
        out.append(Piece(f"{name}/{k}" if fused else name, torch.Size(shape), tuple(offsets),
                         local.narrow(shard.dim, start, part)))
        start += part
    return out


def meta_model(cfg: "ModelConfig", tp: int) -> nn.Module:
    """The model on the meta device, as tensor-parallel rank 0 of `tp` builds it (only the
    names, shapes and TP sharding of its parameters are used)."""
    from megavit.models.transformer import Runtime
    from megavit.models.vit import VisionTransformer
    from megavit.parallel.comm import CommStats, Group

    group = Group("tp", tuple(range(tp)), 0, None, CommStats())
    with torch.device("meta"):
        return VisionTransformer(cfg, Runtime(tp=group))


def dense_meta_model(cfg: "ModelConfig", seg: dict, tp: int) -> nn.Module:
    """A segmentation checkpoint's model (the ViT, its neck and decoder; `seg`: the
    description's "segmentation" section) on the meta device, as TP rank 0 of `tp`."""
    from megavit.models.dense import dense_from_description
    from megavit.models.transformer import Runtime
    from megavit.parallel.comm import CommStats, Group

    group = Group("tp", tuple(range(tp)), 0, None, CommStats())
    with torch.device("meta"):
        return dense_from_description(cfg, Runtime(tp=group), seg)


def distilled_meta_model(cfg: "ModelConfig", widths: list[int], tp: int,
                         pooled_width: int = 0) -> nn.Module:
    """A feature-distilled student (its projections to the teacher's `widths` and
    `pooled_width`, the description's "distillation" section) on the meta device, as TP
    rank 0 of `tp`."""
    from megavit.models.distilled import DistilledStudent
    from megavit.models.transformer import Runtime
    from megavit.parallel.comm import CommStats, Group

    group = Group("tp", tuple(range(tp)), 0, None, CommStats())
    with torch.device("meta"):
        return DistilledStudent(cfg, Runtime(tp=group), widths, pooled_width=pooled_width)


def serial_meta_model(info: dict, tp: int) -> nn.Module:
    """The model a checkpoint description (`megavit_config.json`: "model", for a
    two-tower run "text" and "contrastive", for a segmentation run "segmentation")
    describes, on the meta device, as TP rank 0 of `tp` builds it."""
    from megavit.checkpointing.errors import CheckpointLoadError

    try:
        return _serial_meta_model(info, tp)
    except (TypeError, KeyError) as e:
        raise CheckpointLoadError(f"a model description this megavit cannot build ({e}); "
                                  "was it written by another version?") from None


def _serial_meta_model(info: dict, tp: int) -> nn.Module:
    from megavit.config import ModelConfig

    if "segmentation" in info:
        return dense_meta_model(ModelConfig(**info["model"]), info["segmentation"], tp)
    distilled = info.get("distillation", {})
    widths, pooled = distilled.get("feature_widths") or [], distilled.get("pooled_width", 0)
    if widths or pooled:
        return distilled_meta_model(ModelConfig(**info["model"]), widths, tp, pooled)
    if "text" not in info:
        return meta_model(ModelConfig(**info["model"]), tp)
    from megavit.config import TextConfig, section_from_dict
    from megavit.models.two_tower import TwoTowerModel
    from megavit.models.transformer import Runtime
    from megavit.parallel.comm import CommStats, Group

    text = dict(info["text"])
    vocab, pad, eos = text.pop("vocab_size"), text.pop("pad_id"), text.pop("eos_id")
    c = info["contrastive"]
    rt = Runtime(tp=Group("tp", tuple(range(tp)), 0, None, CommStats()))
    with torch.device("meta"):
        return TwoTowerModel(ModelConfig(**info["model"]), section_from_dict(TextConfig, text),
                             rt, rt, vocab,
                             pad, eos, c["embed_dim"], c["loss"],
                             image_projection=c.get("image_projection", True))


def piece_blocks(model: nn.Module, tp: int) -> dict[str, tuple[torch.Size, list[tuple]]]:
    """{piece name: (serial shape, [(offsets, sizes) of TP rank 0..tp-1's block])} of
    `model` as built by TP rank 0 of `tp` (e.g. on the meta device); a replicated piece has
    one block, the whole."""
    out = {}
    for name, param in model.named_parameters():
        shard = get_tp_shard(param)
        for piece in pieces_of(name, param, shard):
            if shard is None:
                out[piece.name] = (piece.global_shape, [(piece.offsets, piece.global_shape)])
                continue
            step = piece.local.shape[shard.dim]
            blocks = []
            for r in range(tp):
                offsets = list(piece.offsets)
                offsets[shard.dim] = r * step
                blocks.append((tuple(offsets), tuple(piece.local.shape)))
            out[piece.name] = (piece.global_shape, blocks)
    return out
