"""Dense prediction on a ViT: patch tokens as 2-D maps, a feature pyramid neck and a
per-pixel decoder (Panoptic FPN's semantic head).

    --neck simple-pyramid (a plain stack, ViTDet): the last block's tokens [s, b, h]
      (after the final norm; SP: gathered first)
      └─ drop the class token, if any ─► map [b, h, gh, gw] (stride p = --patch-dim)
      └─ SimpleFeaturePyramid: 4x (two 2x2 transposed convs), 2x (one), 1x, 1/2 (max-pool)
           each ─► 1x1 conv + LayerNorm2d + 3x3 conv + LayerNorm2d ─► [b, C, g*scale]
    --neck fpn (a hierarchical stack, --patch-merge-layers): the outputs of --feature-layers
      (the last block among them), each normed (the last by the ViT's final norm, the others
      by their own `feature_norms.<block>`) ─► maps [b, h, g_l, g_l], finer first
      └─ FeaturePyramidNetwork: each level 1x1 conv + LayerNorm2d (lateral); from the
           coarsest down, the coarser result upsampled (nearest) and added; each level 3x3
           conv + LayerNorm2d ─► [b, C, g_l, g_l]
    then
      └─ SegmentationDecoder: every level 3x3 conv + LayerNorm2d + GELU to D channels,
           bilinear up to the finest level, summed, 1x1 conv ─► [b, K, g_0, g_0]
      └─ bilinear up to the input ─► logits [b, K, H, W]

The neck and the decoder are replicated over the tensor-parallel ranks and run on the
pipeline stage that holds the last block (the feature layers' outputs travel there with the
hidden states, see `VisionTransformer`): every TP rank computes them on the same gathered
tokens, so their gradients are whole on each rank (no collective). No batch statistics:
every norm is per pixel, so a micro-batch's output does not depend on the layout.
Parameter names: `neck.*`, `decode_head.*`, `feature_norms.*`, beside the ViT's own (the
backbone's names are a classifier's).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import ModelConfig
from megavit.models.transformer import Runtime, norm_from_config
from megavit.models.vit import StageModel, VisionTransformer
from megavit.parallel.sharding import constant, lecun_normal, set_init, trunc_normal

PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel: [b, c, h, w] -> [b, c, h, w]."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        set_init(self.weight, constant(1.0))
        set_init(self.bias, constant(0.0))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    """A k x k convolution, 'same' padding, LeCun-normal weights (fan-in cin k^2)."""
    layer = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
    set_init(layer.weight, lecun_normal())
    if bias:
        set_init(layer.bias, constant(0.0))
    return layer


def up2(cin: int, cout: int) -> nn.ConvTranspose2d:
    """A 2x2 stride-2 transposed convolution: [b, cin, g, g] -> [b, cout, 2g, 2g]; each
    output pixel sums cin inputs, so weights have std 1 / sqrt(cin)."""
    layer = nn.ConvTranspose2d(cin, cout, 2, stride=2)
    set_init(layer.weight, trunc_normal(1.0 / math.sqrt(cin) / 0.87962566103423978))
    set_init(layer.bias, constant(0.0))
    return layer


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one map [b, h, gh, gw] (stride p): levels at `scales` x the
    grid (4: stride p/4, ... 0.5: stride 2p, max-pooled with ceil, so an odd grid gives
    ceil(g/2)), each [b, C, round(g * scale)...]. Finest first."""

    def __init__(self, width: int, channels: int, scales=PYRAMID_SCALES) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.stages = nn.ModuleList()
        for scale in self.scales:
            if scale == 4.0:
                layers = [up2(width, width // 2), LayerNorm2d(width // 2), nn.GELU(),
                          up2(width // 2, width // 4)]
                out = width // 4
            elif scale == 2.0:
                layers, out = [up2(width, width // 2)], width // 2
            elif scale == 1.0:
                layers, out = [], width
            elif scale == 0.5:
                layers, out = [nn.MaxPool2d(2, ceil_mode=True)], width
            else:
                raise ValueError(f"pyramid scale {scale}: 4, 2, 1 or 0.5")
            layers += [conv(out, channels, 1, bias=False), LayerNorm2d(channels),
                       conv(channels, channels, 3, bias=False), LayerNorm2d(channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [stage(x) for stage in self.stages]


class FeaturePyramidNetwork(nn.Module):
    """FPN (Lin et al. 2017) over maps [b, h, g_l, g_l] of falling resolution (finer first;
    equal sizes allowed): lateral 1x1 conv + LayerNorm2d to C channels, a top-down sum
    (the coarser result upsampled to the finer size, nearest), then 3x3 conv + LayerNorm2d
    per level -> [b, C, g_l, g_l], finer first."""

    def __init__(self, width: int, channels: int, levels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(conv(width, channels, 1, bias=False), LayerNorm2d(channels))
            for _ in range(levels))
        self.output = nn.ModuleList(
            nn.Sequential(conv(channels, channels, 3, bias=False), LayerNorm2d(channels))
            for _ in range(levels))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        above = None
        for lateral, output, x in reversed(list(zip(self.lateral, self.output, maps))):
            y = lateral(x)
            if above is not None:
                y = y + (above if above.shape[-2:] == y.shape[-2:] else
                         F.interpolate(above, size=y.shape[-2:], mode="nearest"))
            above = y
            out.append(output(y))
        return out[::-1]


class SingleLevel(nn.Module):
    """`--neck none`: the map alone, projected to C channels (1x1 conv + LayerNorm2d)."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(conv(width, channels, 1, bias=False), LayerNorm2d(channels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.proj(x)]


class SegmentationDecoder(nn.Module):
    """Levels [b, C, g_l, g_l] (finest first) -> class logits [b, K, g_0, g_0]: each level
    3x3 conv to D + LayerNorm2d + GELU, bilinear to the finest level's size, summed, then a
    1x1 conv to the K classes."""

    def __init__(self, channels: int, width: int, levels: int, num_classes: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(conv(channels, width, 3, bias=False), LayerNorm2d(width), nn.GELU())
            for _ in range(levels))
        self.classifier = conv(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        total = None
        for level, x in zip(self.levels, features):
            y = level(x)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            total = y if total is None else total + y
        return self.classifier(total)


class DenseVisionTransformer(VisionTransformer):
    """A ViT (or a pipeline stage's part of one) whose last part decodes every patch token
    into per-pixel class logits [b, K, H, W] instead of pooling (see the module docstring).
    `cfg.num_classes` must be 0 (no classifier); `num_classes` here: the K segmentation
    classes."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, num_classes: int, neck: str,
                 neck_channels: int, decoder_channels: int, layers: range | None = None,
                 pre_process: bool = True, post_process: bool = True) -> None:
        if cfg.num_classes:
            raise ValueError("a DenseVisionTransformer has no classifier: num_classes 0")
        super().__init__(cfg, rt, layers, pre_process, post_process)
        self.neck_kind = neck
        if neck == "fpn" and cfg.feature_layer_list()[-1:] != [cfg.num_layers - 1]:
            raise ValueError("--neck fpn: the last block must be among --feature-layers")
        if post_process:
            self.map_head = None
            h, features = cfg.hidden_size, cfg.feature_layer_list()
            if neck == "fpn":
                self.reads_hidden_states = False     # not gathered under SP
                self.feature_norms = nn.ModuleDict({
                    str(l): norm_from_config(cfg, h, rt.layernorm_impl) for l in features[:-1]})
                self.neck = FeaturePyramidNetwork(h, neck_channels, len(features))
                levels = len(features)
            elif neck == "simple-pyramid":
                self.neck, levels = SimpleFeaturePyramid(h, neck_channels), len(PYRAMID_SCALES)
            else:
                self.neck, levels = SingleLevel(h, neck_channels), 1
            self.decode_head = SegmentationDecoder(neck_channels, decoder_channels, levels,
                                                   num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens [s, b, h] -> the normed patch map [b, h, gh, gw] (class token dropped)."""
        return self.token_map(self.norm(x), self.cfg.num_layers)     # after any merges

    def feature_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The --feature-layers outputs (all tokens [s_l, b, h] each, in block order) ->
        normed maps [b, h, g_l, g_l]: the last block's by the final norm, the others by
        their own."""
        layers = self.cfg.feature_layer_list()
        return [self.token_map((self.norm if l == layers[-1] else
                                self.feature_norms[str(l)])(x), l)
                for x, l in zip(features, layers)]

    def output(self, x: torch.Tensor, apply_head: bool = True,
               features: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Tokens [s, b, h] (and with --neck fpn the --feature-layers outputs) -> logits
        [b, K, H, W] at the input resolution (the neck's list of levels when not
        `apply_head`)."""
        features = (self.neck(self.feature_maps(features)) if self.neck_kind == "fpn" else
                    self.neck(self.feature_map(x)))
        if not apply_head:
            return features
        logits = self.decode_head(features)
        return F.interpolate(logits, size=(self.cfg.img_h, self.cfg.img_w), mode="bilinear",
                             align_corners=False)


def dense_from_description(cfg: ModelConfig, rt: Runtime, seg: dict
                           ) -> DenseVisionTransformer:
    """A whole DenseVisionTransformer (on the current default device, e.g. meta) from a
    checkpoint description's "segmentation" section (num_classes, neck, neck_channels,
    decoder_channels)."""
    return DenseVisionTransformer(cfg, rt, seg["num_classes"], seg["neck"],
                                  seg["neck_channels"], seg["decoder_channels"])


def build_dense_stage(cfg: ModelConfig, rt: Runtime, seed: int, layout, stage: int,
                      num_classes: int, neck: str, neck_channels: int, decoder_channels: int,
                      device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> StageModel:
    """This pipeline stage's chunks of a DenseVisionTransformer, initialised as the serial
    model would be (weights from (seed, parameter name))."""
    from megavit.parallel.sharding import initialize_parameters

    chunks = []
    for c in range(layout.chunks):
        with torch.device("meta"):
            chunk = DenseVisionTransformer(
                cfg, rt, num_classes, neck, neck_channels, decoder_channels,
                layout.chunk_layers(stage, c), layout.is_first(stage, c),
                layout.is_last(stage, c))
        initialize_parameters(chunk, seed, device=device)
        chunks.append(chunk if dtype == torch.float32 else chunk.to(dtype))
    return StageModel(chunks)


def dense_head_flops(cfg: ModelConfig, neck: str, neck_channels: int, decoder_channels: int,
                     num_classes: int, batch_size: int, training: bool = True) -> int:
    """Matmul / convolution FLOPs (2 per multiply-add) of the neck and decoder for
    `batch_size` images (backward 2x the forward when `training`); norms, pooling and
    interpolation not counted."""
    h, C, D = cfg.hidden_size, neck_channels, decoder_channels
    if neck == "fpn":       # lateral 1x1, output 3x3 and the decoder's 3x3 per level
        sizes = [math.prod(cfg.grid_at(l)) for l in cfg.feature_layer_list()]
        total = sum(2 * g * (h * C + 9 * C * C + 9 * C * D) for g in sizes)
        total += 2 * max(sizes) * D * num_classes
        forward = int(batch_size * total)
        return 3 * forward if training else forward
    gh, gw = cfg.grid_at(cfg.num_layers)
    g = gh * gw
    scales = PYRAMID_SCALES if neck == "simple-pyramid" else (1.0,)
    total = 0
    for scale in scales:
        pixels = g * scale * scale if scale >= 1 else math.ceil(gh / 2) * math.ceil(gw / 2)
        width = h
        if scale == 4.0:
            total += 2 * g * 4 * h * (h // 2) + 2 * g * 16 * (h // 2) * (h // 4)
            width = h // 4
        elif scale == 2.0:
            total += 2 * g * 4 * h * (h // 2)
            width = h // 2
        if neck == "simple-pyramid":
            total += 2 * pixels * width * C + 2 * pixels * 9 * C * C
        else:
            total += 2 * pixels * width * C
        total += 2 * pixels * 9 * C * D                    # the decoder's 3x3 conv per level
    finest = g * max(scales) ** 2
    total += 2 * finest * D * num_classes
    forward = int(batch_size * total)
    return 3 * forward if training else forward
