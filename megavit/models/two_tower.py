"""Two towers aligned in one embedding space: CLIP, SigLIP and LiT.

    images [b, c, H, W] ── image tower (any ViT preset, no classifier) ─► [b, h_img]
                           ── image_proj ─► [b, d] ── L2-normalise ─► image embeddings
    ids [b, L]          ── text tower (TextTransformer)            ─► [b, h_txt]
                           ── text_proj  ─► [b, d] ── L2-normalise ─► text embeddings

`image_projection=False` (--no-image-projection, SigLIP) leaves image_proj out: the image
embedding is the pooled features themselves (d = h_img). `text_projection_bias` (a
TextConfig flag, SigLIP's text head) gives text_proj a bias.

plus the learned log-temperature `logit_scale` t' (scale exp(t')) and, for SigLIP, the
learned `logit_bias` b. Initialisations as in the papers: CLIP t' = log(1 / 0.07);
SigLIP t' = log 10 and b = -10. The projections are replicated over TP (small); the towers
are tensor-parallel inside. With `lock_image` (LiT) the image tower runs forward only under
`torch.no_grad()` and its parameters are excluded from `trainable_parameters`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import ModelConfig, TextConfig
from megavit.models.text import TextTransformer
from megavit.models.transformer import Runtime
from megavit.models.vit import VisionTransformer
from megavit.parallel.sharding import constant, initialize_parameters, lecun_normal, set_init

INITIAL_LOGIT_SCALE = {"clip": math.log(1 / 0.07), "siglip": math.log(10.0)}
INITIAL_LOGIT_BIAS = -10.0


class TwoTowerModel(nn.Module):
    """(images [b, c, H, W], ids [b, L]) -> (image embeddings [b, d], text embeddings
    [b, d]), both L2-normalised and replicated on every TP rank.

    Pipelined (`image_layers`, `pre_process`, `post_process` as for `VisionTransformer`):
    each stage holds its blocks of the image tower under their serial names; the last stage
    also holds the text tower, the projections, the temperature and the bias, and computes
    the loss there."""

    def __init__(self, image_cfg: ModelConfig, text_cfg: TextConfig, image_rt: Runtime,
                 text_rt: Runtime, vocab_size: int, pad_id: int, eos_id: int, embed_dim: int,
                 loss: str, lock_image: bool = False, image_layers: range | None = None,
                 pre_process: bool = True, post_process: bool = True, *,
                 image_projection: bool = True) -> None:
        super().__init__()
        if image_cfg.num_classes:
            raise ValueError("the image tower of a two-tower model has no classifier "
                             "(num_classes 0)")
        if not image_projection and embed_dim != image_cfg.hidden_size:
            raise ValueError(f"without an image projection the embedding width {embed_dim} "
                             f"must be the image tower's width {image_cfg.hidden_size}")
        self.loss, self.lock_image = loss, lock_image
        self.pre_process, self.post_process = pre_process, post_process
        self.image = VisionTransformer(image_cfg, image_rt, image_layers, pre_process,
                                       post_process)
        if not post_process:     # a pipeline stage before the last: image blocks only
            return
        self.text = TextTransformer(text_cfg, text_rt, vocab_size, pad_id, eos_id)
        self.image_proj = (nn.Linear(image_cfg.hidden_size, embed_dim, bias=False)
                           if image_projection else None)
        self.text_proj = nn.Linear(text_cfg.blocks.hidden_size, embed_dim,
                                   bias=text_cfg.text_projection_bias)
        for proj in (self.image_proj, self.text_proj):
            if proj is not None:
                set_init(proj.weight, lecun_normal())
        if self.text_proj.bias is not None:
            set_init(self.text_proj.bias, constant(0.0))
        self.logit_scale = nn.Parameter(torch.empty(()))
        set_init(self.logit_scale, constant(INITIAL_LOGIT_SCALE[loss]))
        self.logit_scale.no_weight_decay = True  # type: ignore[attr-defined]
        if loss == "siglip":
            self.logit_bias = nn.Parameter(torch.empty(()))
            set_init(self.logit_bias, constant(INITIAL_LOGIT_BIAS))
            self.logit_bias.no_weight_decay = True  # type: ignore[attr-defined]
        else:
            self.register_parameter("logit_bias", None)

    @property
    def rt(self) -> Runtime:
        """The image tower's runtime (its RNG tracker drives the text tower's dropout too)."""
        return self.image.rt

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer steps: all but a locked image
        tower."""
        return [(n, p) for n, p in self.named_parameters()
                if not (self.lock_image and n.startswith("image."))]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[b, c, H, W] -> [b, d], unit norm (the whole image tower on this rank)."""
        if self.lock_image:
            with torch.no_grad():
                features = self.image(images)
        else:
            features = self.image(images)
        return self.project_image(features)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features [b, h_img] -> [b, d], unit norm (the last
        pipeline stage's part of `encode_image`)."""
        if self.image_proj is not None:
            features = self.image_proj(features)
        return F.normalize(features.float(), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """[b, L] -> [b, d], unit norm."""
        return F.normalize(self.text_proj(self.text(ids)).float(), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(ids)

    def train(self, mode: bool = True) -> "TwoTowerModel":
        super().train(mode)
        if self.lock_image:
            self.image.eval()        # a locked tower never trains: no dropout, no drop-path
        return self


def build_two_tower(image_cfg: ModelConfig, text_cfg: TextConfig, image_rt: Runtime,
                    text_rt: Runtime, seed: int, vocab_size: int, pad_id: int, eos_id: int,
                    embed_dim: int, loss: str, lock_image: bool = False,
                    device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, image_layers: range | None = None,
                    pre_process: bool = True, post_process: bool = True, *,
                    image_projection: bool = True) -> TwoTowerModel:
    """Built on the meta device, then every parameter initialised from (seed, its name):
    the serial weights in every TP and PP layout."""
    with torch.device("meta"):
        model = TwoTowerModel(image_cfg, text_cfg, image_rt, text_rt, vocab_size, pad_id,
                              eos_id, embed_dim, loss, lock_image, image_layers, pre_process,
                              post_process, image_projection=image_projection)
    initialize_parameters(model, seed, device=device)
    if lock_image:
        model.image.requires_grad_(False)
    return model if dtype == torch.float32 else model.to(dtype)
