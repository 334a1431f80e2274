"""The Vision Transformer, written once for every parallel layout.

Activations are [s, b, h]: s tokens, b images, width h. Model code only says which layer
is column- or row-parallel; the group, sequence parallelism, recomputation and RNG streams
come from the `Runtime` passed in.

    images [b, c, H, W]
      └─ PatchEmbedding ─► [s, b, h] (+ position embedding, + class token when pooling=cls)
      └─ (SP: pad to a multiple of t, keep this rank's [s/t, b, h])
      └─ blocks.0 ... blocks.L-1     (ParallelBlock = ViT-22B, or SequentialBlock)
      └─ (SP: all-gather, drop the padding)
      └─ norm ─► pool (MAP / GAP / CLS) ─► [b, h] ─► classifier ─► [b, classes]

Block names are global (`blocks.17` is block 17 in every layout), so a model built for a
range of layers (one pipeline stage) has the same parameter names as the serial model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import ModelConfig, ParallelConfig
from megavit.parallel.comm import Group
from megavit.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    layer_norm,
    multi_head_attention,
)
from megavit.parallel.mappings import (gather_from_sequence_parallel,
                                       scatter_to_sequence_parallel)
from megavit.parallel.random import MODEL_PARALLEL, RNGTracker, counter_uniform
from megavit.parallel.recompute import recompute
from megavit.parallel.sharding import (constant, lecun_normal, param_seed, set_init,
                                       trunc_normal)


@dataclass
class Runtime:
    """How this rank runs the model, besides its weights.

    `sequence_parallel`: None, "keep" or "regather" (see `column_linear`).
    `recompute_granularity`: None, "selective" or "full" (with `recompute_method` "uniform"
    or "block" and `recompute_num_layers`). `rng`: the dropout streams (needed when dropout
    is on). `seed`: keys the drop-path masks."""

    tp: Group
    sequence_parallel: str | None = None
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int = 1
    rng: RNGTracker | None = None
    seed: int = 0
    layernorm_impl: str = "torch"

    @classmethod
    def from_config(cls, parallel: ParallelConfig, tp: Group, seed: int,
                    rng: RNGTracker | None = None, layernorm_impl: str = "torch") -> "Runtime":
        sp = None
        if parallel.sequence_parallel and tp.size > 1:
            sp = "regather" if parallel.sequence_parallel_regather else "keep"
        return cls(tp=tp, sequence_parallel=sp,
                   recompute_granularity=parallel.recompute_granularity,
                   recompute_method=parallel.recompute_method,
                   recompute_num_layers=parallel.recompute_num_layers or 1, rng=rng, seed=seed,
                   layernorm_impl=layernorm_impl)


class ForwardContext(NamedTuple):
    """Per-forward inputs every block sees: the additive attention mask for padded tokens
    (or None) and the global ids of the images (for drop-path; None when not training)."""

    attn_mask: torch.Tensor | None
    sample_ids: torch.Tensor | None


def drop_path(y: torch.Tensor, sample_ids: torch.Tensor | None, rate: float, key: int) -> torch.Tensor:
    """Zero image i's branch [s, b, h] with probability `rate`, from (key, sample id) alone,
    and scale the kept ones by 1 / (1 - rate)."""
    if sample_ids is None:
        raise ValueError("drop-path needs the images' global ids (forward(..., sample_ids))")
    keep = (counter_uniform(key, sample_ids.to(y.device)) >= rate).to(y.dtype) / (1 - rate)
    return y * keep.view(1, -1, 1)


class BranchRegularizer(nn.Module):
    """What happens to a block's branch output before the residual add in training: hidden
    dropout (on the tracker's model-parallel stream when the activations are sequence
    shards, else the default stream, identical on every TP rank), then drop-path."""

    def __init__(self, dropout: float, drop_path_rate: float, key: int, rt: Runtime) -> None:
        super().__init__()
        self.dropout, self.drop_path_rate, self.key, self.rt = dropout, drop_path_rate, key, rt

    def forward(self, y: torch.Tensor, sample_ids: torch.Tensor | None) -> torch.Tensor:
        if not self.training:
            return y
        if self.dropout > 0:
            if self.rt.rng is None:
                raise ValueError("hidden dropout needs an RNG tracker (Runtime.rng)")
            stream = (self.rt.rng.fork(MODEL_PARALLEL) if self.rt.sequence_parallel
                      else contextlib.nullcontext())
            with stream:
                y = F.dropout(y, self.dropout)
        if self.drop_path_rate > 0:
            y = drop_path(y, sample_ids, self.drop_path_rate, self.key)
        return y


def _regularizer(cfg: ModelConfig, rt: Runtime, layer: int, branch: str) -> BranchRegularizer:
    rate = cfg.drop_path_rate * layer / max(cfg.num_layers - 1, 1)
    return BranchRegularizer(cfg.hidden_dropout, rate,
                             param_seed(rt.seed, f"drop-path.{layer}.{branch}"), rt)


class Activation(nn.Module):
    """The MLP activation: exact GELU, or its tanh approximation ("gelu_tanh")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.approximate = {"gelu": "none", "gelu_tanh": "tanh"}[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def model_norm(cfg: ModelConfig, size: int, impl: str = "torch",
               partial_grad: bool = False) -> nn.Module:
    """The model's norm over `size` features: --normalization, --norm-epsilon, --norm-bias."""
    return layer_norm(size, cfg.norm_epsilon, cfg.norm_bias, partial_grad, impl,
                      cfg.normalization)


def qk_norms(cfg: ModelConfig, rt: Runtime) -> tuple[nn.Module | None, nn.Module | None]:
    """Per-head LayerNorms over the head dim for queries and keys (or None, None). One set
    of weights is shared by all heads; each TP rank applies it to its own heads only, so its
    gradient is partial and summed over TP after backward."""
    if not cfg.qk_layernorm:
        return None, None
    return tuple(model_norm(cfg, cfg.head_dim, rt.layernorm_impl, partial_grad=True)
                 for _ in range(2))


class _Attention(nn.Module):
    """The attention core of a block over this rank's heads — QK-norms, softmax(QK^T)V and
    attention dropout — recomputed in backward under --recompute-granularity selective."""

    def __init__(self, cfg: ModelConfig, rt: Runtime) -> None:
        super().__init__()
        self.head_dim, self.rt = cfg.head_dim, rt
        self.q_norm, self.k_norm = qk_norms(cfg, rt)
        self.dropout = cfg.attention_dropout

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        return multi_head_attention(q, k, v, self.head_dim, self.q_norm, self.k_norm, mask,
                                    self.dropout if self.training else 0.0, self.rt.rng)

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = qkv.chunk(3, dim=-1)                          # this rank's heads
        if self.rt.recompute_granularity == "selective" and torch.is_grad_enabled():
            return recompute(self.core, q, k, v, mask, rng=self.rt.rng)
        return self.core(q, k, v, mask)


class ParallelBlock(nn.Module):
    """ViT-22B block: y = x + out_proj([attention(q, k, v) | gelu(u)]), where one
    LayerNorm feeds one fused column-parallel projection to [q | k | v | u] and one fused
    row-parallel projection maps [attention | MLP] back: one TP all-reduce forward
    (out_proj) and one backward (in_proj's input gradient); with sequence parallelism an
    all-gather and a reduce-scatter instead.

    Each fused projection has one weight (one TP split) but runs as one matmul per output
    group, so the MLP activation is contiguous and nothing is concatenated (see
    `forward_groups`); the FLOPs are those of the fused matmul.

    Per-rank shapes with TP size t: x [s, b, h] ([s/t, b, h] with SP); q, k, v [s, b, h/t]
    (this rank's heads), u [s, b, f/t].
    """

    def __init__(self, cfg: ModelConfig, rt: Runtime, layer: int) -> None:
        super().__init__()
        h, f, std = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std
        sp = rt.sequence_parallel
        self.norm = model_norm(cfg, h, rt.layernorm_impl, partial_grad=sp is not None)
        qkv_bias, mlp_bias = cfg.add_qkv_bias, cfg.add_mlp_bias
        self.in_proj = ColumnParallelLinear(h, (h, h, h, f), rt.tp, init_std=std,
                                            bias=(qkv_bias, qkv_bias, qkv_bias, mlp_bias),
                                            sequence_parallel=sp)
        self.attention = _Attention(cfg, rt)
        self.act = Activation(cfg.activation)
        self.out_proj = RowParallelLinear((h, f), h, rt.tp, init_std=std,
                                          bias=mlp_bias or cfg.add_proj_bias,
                                          sequence_parallel=sp is not None)
        self.branch = _regularizer(cfg, rt, layer, "parallel")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv, u = self.in_proj.forward_groups(self.norm(x), [3, 1])  # [s,b,3h/t], [s,b,f/t]
        a = self.attention(qkv, ctx.attn_mask)                  # [s, b, h/t]
        y = self.out_proj.forward_groups([a, self.act(u)])      # the block's one all-reduce
        return x + self.branch(y, ctx.sample_ids)               # [s, b, h]


class SequentialBlock(nn.Module):
    """Classic pre-LN ViT block: x + attn(LN(x)), then + MLP(LN(x)). Two TP all-reduces
    each way (attention-out and MLP-out)."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, layer: int) -> None:
        super().__init__()
        h, f, std = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std
        sp = rt.sequence_parallel
        self.norm1 = model_norm(cfg, h, rt.layernorm_impl, partial_grad=sp is not None)
        self.qkv = ColumnParallelLinear(h, (h, h, h), rt.tp, bias=cfg.add_qkv_bias, init_std=std,
                                        sequence_parallel=sp)
        self.attention = _Attention(cfg, rt)
        self.proj = RowParallelLinear(h, h, rt.tp, bias=cfg.add_proj_bias, init_std=std,
                                      sequence_parallel=sp is not None)
        self.branch1 = _regularizer(cfg, rt, layer, "attention")
        self.norm2 = model_norm(cfg, h, rt.layernorm_impl, partial_grad=sp is not None)
        self.fc1 = ColumnParallelLinear(h, f, rt.tp, bias=cfg.add_mlp_bias, init_std=std,
                                        sequence_parallel=sp)
        self.act = Activation(cfg.activation)
        self.fc2 = RowParallelLinear(f, h, rt.tp, bias=cfg.add_mlp_bias, init_std=std,
                                     sequence_parallel=sp is not None)
        self.branch2 = _regularizer(cfg, rt, layer, "mlp")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        a = self.attention(self.qkv(self.norm1(x)), ctx.attn_mask)   # [s, b, h/t]
        x = x + self.branch1(self.proj(a), ctx.sample_ids)
        return x + self.branch2(self.fc2(self.act(self.fc1(self.norm2(x)))), ctx.sample_ids)


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
    Input [s, b, h] (all tokens, replicated) -> [b, h]."""

    def __init__(self, cfg: ModelConfig, tp: Group, layernorm_impl: str = "torch") -> None:
        super().__init__()
        h, f, std = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std
        self.head_dim = cfg.head_dim
        self.probe = nn.Parameter(torch.empty(h))
        set_init(self.probe, trunc_normal(std))
        self.q = ColumnParallelLinear(h, h, tp, bias=True, init_std=std)
        self.kv = ColumnParallelLinear(h, (h, h), tp, bias=True, init_std=std)
        self.proj = RowParallelLinear(h, h, tp, bias=True, init_std=std)
        self.norm = model_norm(cfg, h, layernorm_impl)
        self.fc1 = ColumnParallelLinear(h, f, tp, bias=True, init_std=std)
        self.act = Activation(cfg.activation)
        self.fc2 = RowParallelLinear(f, h, tp, bias=True, init_std=std)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask`: additive [b, 1, 1, s] hiding padded tokens (text), or None."""
        b = x.shape[1]
        q = self.q(self.probe.view(1, 1, -1)).expand(1, b, -1)   # [1, b, h/t]
        k, v = self.kv(x).chunk(2, dim=-1)                        # [s, b, h/t] each
        y = self.proj(multi_head_attention(q, k, v, self.head_dim,
                                           attn_mask=key_mask))   # [1, b, h]
        y = y + self.fc2(self.act(self.fc1(self.norm(y))))
        return y[0]


class VisionTransformer(nn.Module):
    """A ViT, or the part of one that a pipeline stage holds.

    `layers`: the global indices of the blocks built here (default: all). `pre_process`:
    this part embeds images; `post_process`: it pools and classifies. Input: images
    [b, c, H, W] when pre_process, else hidden states. Output: logits [b, classes]
    (features [b, h] when num_classes is 0) when post_process, else hidden states.
    Hidden states are [s, b, h], or with sequence parallelism this rank's [s_p/t, b, h] of
    the sequence padded to s_p, a multiple of t (padded keys are masked in attention).
    `sample_ids` ([b] global image ids) key the drop-path masks in training.
    """

    def __init__(self, cfg: ModelConfig, rt: Runtime, layers: range | None = None,
                 pre_process: bool = True, post_process: bool = True) -> None:
        super().__init__()
        self.cfg, self.rt = cfg, rt
        self.pre_process, self.post_process = pre_process, post_process
        h, t = cfg.hidden_size, rt.tp.size
        if cfg.num_attention_heads % t or cfg.ffn_hidden_size % t:
            raise ValueError(f"tensor-parallel size {t} must divide the {cfg.num_attention_heads} "
                             f"heads and the MLP width {cfg.ffn_hidden_size}")
        s = cfg.seq_length
        self.padded_length = -(-s // t) * t if rt.sequence_parallel else s
        if self.padded_length != s:  # keys past s are padding: additive mask, filled later
            self.register_buffer("pad_mask", torch.empty(self.padded_length, self.padded_length),
                                 persistent=False)
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
            if cfg.pre_norm:
                self.pre_norm = model_norm(cfg, h, rt.layernorm_impl)
        block = ParallelBlock if cfg.block_type == "parallel" else SequentialBlock
        layers = range(cfg.num_layers) if layers is None else layers
        self.blocks = nn.ModuleDict({str(i): block(cfg, rt, i) for i in layers})
        if post_process:
            self.norm = model_norm(cfg, h, rt.layernorm_impl)
            self.map_head = (MAPHead(cfg, rt.tp, rt.layernorm_impl) if cfg.pooling == "map"
                             else None)
            self.head = nn.Linear(h, cfg.num_classes) if cfg.num_classes else None
            if self.head is not None:
                set_init(self.head.weight, trunc_normal(cfg.init_method_std))
                set_init(self.head.bias, constant(0.0))

    def init_buffers(self) -> None:
        """Fill non-learned buffers (called by initialize_parameters after materialising)."""
        if self.pre_process and self.pos_embed is None:
            self.pos_sincos.copy_(sincos_2d(self.cfg.grid, self.cfg.hidden_size))
        if self.padded_length != self.cfg.seq_length:
            self.pad_mask.zero_()
            self.pad_mask[:, self.cfg.seq_length:] = float("-inf")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[b, c, H, W] -> [s, b, h]: patches, + positions, the class token, the pre-norm."""
        x = self.patch_embed(images)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        else:
            x = x + self.pos_sincos.unsqueeze(1)
        if self.cfg.pooling == "cls":
            x = torch.cat([self.cls_token.view(1, 1, -1).expand(1, x.shape[1], -1), x], dim=0)
        return self.pre_norm(x) if self.cfg.pre_norm else x

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """With SP: [s, b, h] -> this rank's [s_p/t, b, h] (zero-padded to s_p)."""
        if not self.rt.sequence_parallel:
            return x
        pad = self.padded_length - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        return scatter_to_sequence_parallel(x, self.rt.tp)

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """With SP: this rank's [s_p/t, b, h] -> all [s, b, h] (padding dropped)."""
        if not self.rt.sequence_parallel:
            return x
        return gather_from_sequence_parallel(x, self.rt.tp)[:self.cfg.seq_length]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [b, h]."""
        x = self.norm(x)
        if self.cfg.pooling == "map":
            return self.map_head(x)
        if self.cfg.pooling == "gap":
            return x.mean(dim=0)
        return x[0]

    def _run_blocks(self, x: torch.Tensor, mask: torch.Tensor | None,
                    sample_ids: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        ctx = ForwardContext(mask, sample_ids)
        for block in list(self.blocks.values())[start:stop]:
            x = block(x, ctx)
        return x

    def run_blocks(self, x: torch.Tensor, sample_ids: torch.Tensor | None) -> torch.Tensor:
        """The blocks of this part, with --recompute-granularity full applied: 'uniform'
        keeps only the input of each chunk of N blocks, 'block' only the inputs of the
        first N blocks, each recomputed on its own."""
        mask = getattr(self, "pad_mask", None)
        rt, n_blocks = self.rt, len(self.blocks)
        if rt.recompute_granularity != "full" or not torch.is_grad_enabled():
            return self._run_blocks(x, mask, sample_ids, 0, n_blocks)
        n = rt.recompute_num_layers
        if rt.recompute_method == "uniform":
            for start in range(0, n_blocks, n):
                x = recompute(self._run_blocks, x, mask, sample_ids, start, start + n, rng=rt.rng)
            return x
        for i in range(n_blocks):
            x = (recompute(self._run_blocks, x, mask, sample_ids, i, i + 1, rng=rt.rng)
                 if i < n else self._run_blocks(x, mask, sample_ids, i, i + 1))
        return x

    def forward(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None,
                block_meter: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
        """`block_meter`, if given, is entered around the blocks only (e.g. a
        SavedTensorMeter measuring their activations)."""
        if self.pre_process:
            x = self.scatter_sequence(self.embed(x))
        with block_meter if block_meter is not None else contextlib.nullcontext():
            x = self.run_blocks(x, sample_ids)
        if self.post_process:
            x = self.pool(self.gather_sequence(x))
            if self.head is not None:
                x = self.head(x)
        return x

    def estimate_flops(self, batch_size: int, training: bool = True) -> int:
        """Matmul FLOPs of the whole model (all layers, all ranks) for `batch_size` images:
        the forward pass, or forward + backward (3x) when `training` (recomputation and
        sequence padding not counted: model FLOPs, as MFU uses)."""
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


class StageModel(nn.Module):
    """The chunks of the model one pipeline stage holds (one, or v with the interleaved
    schedule), in local chunk order. Its parameters carry the serial model's names
    (`blocks.17...`), not the container's."""

    def __init__(self, chunks: list[VisionTransformer]) -> None:
        super().__init__()
        self.chunks = nn.ModuleList(chunks)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True):
        for chunk in self.chunks:
            yield from chunk.named_parameters(prefix, recurse, remove_duplicate)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """This stage's tensors under the serial model's names."""
        out: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            out.update(chunk.state_dict(*args, **kwargs))
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load the entries of `state` (serial names) that belong to this stage's chunks; with
        `strict`, every chunk's tensors must be there and nothing else."""
        used: set[str] = set()
        for chunk in self.chunks:
            own = {k: v for k, v in state.items() if k in chunk.state_dict()}
            used |= own.keys()
            chunk.load_state_dict(own, strict=strict, assign=assign)
        extra = sorted(set(state) - used)
        if strict and extra:
            raise RuntimeError(f"unexpected keys for this pipeline stage: {extra}")

    @property
    def rt(self) -> Runtime:
        return self.chunks[0].rt

    @property
    def cfg(self) -> ModelConfig:
        return self.chunks[0].cfg

    def estimate_flops(self, batch_size: int, training: bool = True) -> int:
        """Matmul FLOPs of the whole model (every stage) for `batch_size` images."""
        return vit_flops(self.cfg, batch_size, training)


def build_stage(cfg: ModelConfig, rt: Runtime, seed: int, layout, stage: int,
                device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> StageModel:
    """This pipeline stage's chunks (`layout`: a PipelineLayout), initialised as the serial
    model would be, with parameters (and buffers) in `dtype`."""
    return StageModel([
        build_vit(cfg, rt, seed, device, layers=layout.chunk_layers(stage, c),
                  pre_process=layout.is_first(stage, c), post_process=layout.is_last(stage, c),
                  dtype=dtype)
        for c in range(layout.chunks)])


def build_vit(cfg: ModelConfig, rt: Runtime | Group, seed: int,
              device: torch.device | str = "cpu", layers: range | None = None,
              pre_process: bool = True, post_process: bool = True,
              dtype: torch.dtype = torch.float32) -> VisionTransformer:
    """Build on the meta device, then materialise on `device` with the seeded init:
    the weights depend only on (seed, parameter name), whatever the layout. `rt` may be a
    bare TP group (no sequence parallelism, recomputation or dropout streams)."""
    from megavit.parallel.sharding import initialize_parameters

    if isinstance(rt, Group):
        rt = Runtime(tp=rt, seed=seed)
    with torch.device("meta"):
        model = VisionTransformer(cfg, rt, layers, pre_process, post_process)
    initialize_parameters(model, seed, device=device)   # fp32 values, then rounded
    return model if dtype == torch.float32 else model.to(dtype)
