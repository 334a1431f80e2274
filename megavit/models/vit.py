"""The Vision Transformer, written once for every tensor-parallel size.

Activations are [s, b, h]: s tokens, b images, width h. Model code only says which layer
is column- or row-parallel; the group and its size come from the `Group` passed in.

    images [b, c, H, W]
      └─ PatchEmbedding ─► [s, b, h] (+ position embedding, + class token when pooling=cls)
      └─ blocks.0 ... blocks.L-1     (ParallelBlock = ViT-22B, or SequentialBlock)
      └─ norm ─► pool (MAP / GAP / CLS) ─► [b, h] ─► classifier ─► [b, classes]

Block names are global (`blocks.17` is block 17 in every layout), so a model built for a
range of layers (one pipeline stage) has the same parameter names as the serial model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import ModelConfig
from megavit.parallel.comm import Group
from megavit.parallel.grad_sync import mark_partial_grad
from megavit.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    layer_norm,
    multi_head_attention,
)
from megavit.parallel.sharding import constant, lecun_normal, set_init, trunc_normal


def qk_norms(cfg: ModelConfig) -> tuple[nn.Module | None, nn.Module | None]:
    """Per-head LayerNorms over the head dim for queries and keys (or None, None). One set
    of weights is shared by all heads; each TP rank applies it to its own heads only, so its
    gradient is partial and summed over TP after backward."""
    if not cfg.qk_layernorm:
        return None, None
    return tuple(mark_partial_grad(layer_norm(cfg.head_dim, cfg.norm_epsilon, cfg.norm_bias))
                 for _ in range(2))


class ParallelBlock(nn.Module):
    """ViT-22B block: y = x + out_proj([attention(q, k, v) | gelu(u)]), where one
    LayerNorm feeds one fused column-parallel projection to [q | k | v | u] and one fused
    row-parallel projection maps [attention | MLP] back: one TP all-reduce forward
    (out_proj) and one backward (in_proj's input gradient).

    Each fused projection has one weight (one TP split) but runs as one matmul per output
    group, so the MLP activation is contiguous and nothing is concatenated (see
    `forward_groups`); the FLOPs are those of the fused matmul.

    Per-rank shapes with TP size t: q, k, v [s, b, h/t] (this rank's heads), u [s, b, f/t].
    """

    def __init__(self, cfg: ModelConfig, tp: Group) -> None:
        super().__init__()
        h, f, std = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std
        self.head_dim = cfg.head_dim
        self.norm = layer_norm(h, cfg.norm_epsilon, cfg.norm_bias)
        qkv_bias, mlp_bias = cfg.add_qkv_bias, cfg.add_mlp_bias
        self.in_proj = ColumnParallelLinear(h, (h, h, h, f), tp, init_std=std,
                                            bias=(qkv_bias, qkv_bias, qkv_bias, mlp_bias))
        self.q_norm, self.k_norm = qk_norms(cfg)
        self.out_proj = RowParallelLinear((h, f), h, tp, init_std=std,
                                          bias=mlp_bias or cfg.add_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # x: [s, b, h]
        qkv, u = self.in_proj.forward_groups(self.norm(x), [3, 1])  # [s,b,3h/t], [s,b,f/t]
        q, k, v = qkv.chunk(3, dim=-1)                          # this rank's heads
        a = multi_head_attention(q, k, v, self.head_dim, self.q_norm, self.k_norm)
        y = self.out_proj.forward_groups([a, F.gelu(u)])        # the block's one all-reduce
        return x + y                                            # [s, b, h]


class SequentialBlock(nn.Module):
    """Classic pre-LN ViT block: x + attn(LN(x)), then + MLP(LN(x)). Two TP all-reduces
    each way (attention-out and MLP-out)."""

    def __init__(self, cfg: ModelConfig, tp: Group) -> None:
        super().__init__()
        h, f, std, eps = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std, cfg.norm_epsilon
        self.head_dim = cfg.head_dim
        self.norm1 = layer_norm(h, eps, cfg.norm_bias)
        self.qkv = ColumnParallelLinear(h, (h, h, h), tp, bias=cfg.add_qkv_bias, init_std=std)
        self.q_norm, self.k_norm = qk_norms(cfg)
        self.proj = RowParallelLinear(h, h, tp, bias=cfg.add_proj_bias, init_std=std)
        self.norm2 = layer_norm(h, eps, cfg.norm_bias)
        self.fc1 = ColumnParallelLinear(h, f, tp, bias=cfg.add_mlp_bias, init_std=std)
        self.fc2 = RowParallelLinear(f, h, tp, bias=cfg.add_mlp_bias, init_std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # x: [s, b, h]
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)      # each [s, b, h/t]
        x = x + self.proj(multi_head_attention(q, k, v, self.head_dim, self.q_norm, self.k_norm))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches, flattened (c, p, p) and projected: [b, c, H, W] ->
    [s, b, h] with patches in row-major order. Replicated over TP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch = cfg.patch_dim
        self.proj = nn.Linear(cfg.num_channels * cfg.patch_dim ** 2, cfg.hidden_size)
        set_init(self.proj.weight, lecun_normal())
        set_init(self.proj.bias, constant(0.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, H, W = images.shape
        p = self.patch
        x = images.reshape(b, c, H // p, p, W // p, p).permute(2, 4, 0, 1, 3, 5)
        return self.proj(x.reshape((H // p) * (W // p), b, c * p * p))


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [gh * gw, width] (width divisible by 4):
    a quarter each of sin(x), cos(x), sin(y), cos(y) at geometric frequencies."""
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                          torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = torch.arange(width // 4, dtype=torch.float64) / max(width // 4 - 1, 1)
    omega = temperature ** -omega
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int],
                     new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic interpolation of a learned [gh * gw, h] position embedding to a new grid."""
    h = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, h).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], h).to(pos.dtype)


class LearnedPositionEmbedding(nn.Module):
    """A learned [gh * gw, h] table added to the patch tokens. Loading a table trained on
    another square grid resizes it by bicubic interpolation."""

    def __init__(self, grid: tuple[int, int], width: int, std: float) -> None:
        super().__init__()
        self.grid = grid
        self.weight = nn.Parameter(torch.empty(grid[0] * grid[1], width))
        self.weight.no_weight_decay = True  # type: ignore[attr-defined]
        set_init(self.weight, trunc_normal(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight.unsqueeze(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        table = state_dict.get(key)
        if table is not None and table.shape[0] != self.weight.shape[0]:
            side = math.isqrt(table.shape[0])
            if side * side != table.shape[0]:
                raise ValueError(
                    f"{key}: cannot infer the grid of a {table.shape[0]}-token position "
                    "embedding (not square); resize it with resize_pos_embed first"
                )
            state_dict[key] = resize_pos_embed(table, (side, side), self.grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then a
    residual MLP. Tensor-parallel like a block (heads and MLP split over TP).
    Input [s, b, h] -> [b, h]."""

    def __init__(self, cfg: ModelConfig, tp: Group) -> None:
        super().__init__()
        h, f, std = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std
        self.head_dim = cfg.head_dim
        self.probe = nn.Parameter(torch.empty(h))
        set_init(self.probe, trunc_normal(std))
        self.q = ColumnParallelLinear(h, h, tp, bias=True, init_std=std)
        self.kv = ColumnParallelLinear(h, (h, h), tp, bias=True, init_std=std)
        self.proj = RowParallelLinear(h, h, tp, bias=True, init_std=std)
        self.norm = layer_norm(h, cfg.norm_epsilon, cfg.norm_bias)
        self.fc1 = ColumnParallelLinear(h, f, tp, bias=True, init_std=std)
        self.fc2 = RowParallelLinear(f, h, tp, bias=True, init_std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[1]
        q = self.q(self.probe.view(1, 1, -1)).expand(1, b, -1)   # [1, b, h/t]
        k, v = self.kv(x).chunk(2, dim=-1)                        # [s, b, h/t] each
        y = self.proj(multi_head_attention(q, k, v, self.head_dim))  # [1, b, h]
        y = y + self.fc2(F.gelu(self.fc1(self.norm(y))))
        return y[0]


class VisionTransformer(nn.Module):
    """A ViT, or the part of one that a pipeline stage holds.

    `layers`: the global indices of the blocks built here (default: all). `pre_process`:
    this part embeds images; `post_process`: it pools and classifies. Input: images
    [b, c, H, W] when pre_process, else hidden states [s, b, h]. Output: logits
    [b, classes] (features [b, h] when num_classes is 0) when post_process, else [s, b, h].
    """

    def __init__(self, cfg: ModelConfig, tp: Group, layers: range | None = None,
                 pre_process: bool = True, post_process: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.pre_process, self.post_process = pre_process, post_process
        h = cfg.hidden_size
        if pre_process:
            self.patch_embed = PatchEmbedding(cfg)
            self.pos_embed = (LearnedPositionEmbedding(cfg.grid, h, cfg.init_method_std)
                              if cfg.position_embedding_type == "learned" else None)
            if self.pos_embed is None:  # fixed sin-cos table, filled by init_buffers
                self.register_buffer("pos_sincos", torch.empty(cfg.grid[0] * cfg.grid[1], h),
                                     persistent=False)
            if cfg.pooling == "cls":
                self.cls_token = nn.Parameter(torch.empty(h))
                set_init(self.cls_token, trunc_normal(cfg.init_method_std))
        block = ParallelBlock if cfg.block_type == "parallel" else SequentialBlock
        layers = range(cfg.num_layers) if layers is None else layers
        self.blocks = nn.ModuleDict({str(i): block(cfg, tp) for i in layers})
        if post_process:
            self.norm = layer_norm(h, cfg.norm_epsilon, cfg.norm_bias)
            self.map_head = MAPHead(cfg, tp) if cfg.pooling == "map" else None
            self.head = nn.Linear(h, cfg.num_classes) if cfg.num_classes else None
            if self.head is not None:
                set_init(self.head.weight, trunc_normal(cfg.init_method_std))
                set_init(self.head.bias, constant(0.0))

    def init_buffers(self) -> None:
        """Fill non-learned buffers (called by initialize_parameters after materialising)."""
        if self.pre_process and self.pos_embed is None:
            self.pos_sincos.copy_(sincos_2d(self.cfg.grid, self.cfg.hidden_size))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[b, c, H, W] -> [s, b, h]."""
        x = self.patch_embed(images)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        else:
            x = x + self.pos_sincos.unsqueeze(1)
        if self.cfg.pooling == "cls":
            x = torch.cat([self.cls_token.view(1, 1, -1).expand(1, x.shape[1], -1), x], dim=0)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [b, h]."""
        x = self.norm(x)
        if self.cfg.pooling == "map":
            return self.map_head(x)
        if self.cfg.pooling == "gap":
            return x.mean(dim=0)
        return x[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_process:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if self.post_process:
            x = self.pool(x)
            if self.head is not None:
                x = self.head(x)
        return x

    def estimate_flops(self, batch_size: int, training: bool = True) -> int:
        """Matmul FLOPs of the whole model (all layers, all ranks) for `batch_size` images:
        the forward pass, or forward + backward (3x) when `training`."""
        return vit_flops(self.cfg, batch_size, training)


def vit_flops(cfg: ModelConfig, batch_size: int, training: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of a ViT for `batch_size` images.

    Per image, s tokens, width h, MLP f: a block costs 2sh(3h + f) (QKV + MLP-in)
    + 4s^2h (QK^T and AV) + 2s(h + f)h (attention-out + MLP-out); both block types are
    equal. Plus the patch embedding, the MAP head and the classifier. Backward costs twice
    the forward. Elementwise work (norms, softmax, GELU) is not counted.
    """
    h, f, s = cfg.hidden_size, cfg.ffn_hidden_size, cfg.seq_length
    patches = cfg.grid[0] * cfg.grid[1]
    block = 2 * s * h * (3 * h + f) + 4 * s * s * h + 2 * s * (h + f) * h
    embed = 2 * patches * cfg.num_channels * cfg.patch_dim ** 2 * h
    head, once = 0, 0
    if cfg.pooling == "map":
        # keys/values (s tokens), 1 x s attention, out and MLP (1 token) per image; the
        # probe's query is the same for every image and computed once per batch.
        head += 2 * s * h * 2 * h + 4 * s * h + 2 * h * h + 4 * h * f
        once += 2 * h * h
    if cfg.num_classes:
        head += 2 * h * cfg.num_classes
    forward = batch_size * (embed + cfg.num_layers * block + head) + once
    return 3 * forward if training else forward


def build_vit(cfg: ModelConfig, tp: Group, seed: int, device: torch.device | str = "cpu",
              layers: range | None = None, pre_process: bool = True,
              post_process: bool = True) -> VisionTransformer:
    """Build on the meta device, then materialise on `device` with the seeded init:
    the weights depend only on (seed, parameter name), whatever the TP size."""
    from megavit.parallel.sharding import initialize_parameters

    with torch.device("meta"):
        model = VisionTransformer(cfg, tp, layers, pre_process, post_process)
    initialize_parameters(model, seed, device=device)
    return model
