"""The Vision Transformer, written once for every parallel layout: the image stem (patch
embedding, positions, class token), the blocks of `models/transformer.py`, the head.

Activations are [s, b, h]: s tokens, b images, width h. The TP group, sequence
parallelism, recomputation and RNG streams come from the `Runtime` passed in.

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
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import ModelConfig
from megavit.models.transformer import (ForwardContext, MAPHead, Runtime, build_block,
                                       norm_from_config)
from megavit.parallel.comm import Group
from megavit.parallel.mappings import (gather_from_sequence_parallel,
                                       scatter_to_sequence_parallel)
from megavit.parallel.recompute import recompute
from megavit.parallel.sharding import constant, lecun_normal, set_init, trunc_normal


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


def resize_axis_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """A learned [n, h] table along one grid axis, interpolated (bicubic) to [size, h]."""
    x = table.t().unsqueeze(0).unsqueeze(-1).float()                 # [1, h, n, 1]
    x = F.interpolate(x, size=(size, 1), mode="bicubic", align_corners=False)
    return x[0, :, :, 0].t().to(table.dtype)


class RowColumnPositionEmbedding(nn.Module):
    """`learned-2d`: a learned row table [gh, h] and column table [gw, h]; patch (r, c)
    gets row[r] + col[c] (each initialised at std / sqrt(2), so the sum has the std of one
    table over the grid). A new grid resizes each table along its axis."""

    def __init__(self, grid: tuple[int, int], width: int, std: float) -> None:
        super().__init__()
        self.grid = grid
        self.row_weight = nn.Parameter(torch.empty(grid[0], width))
        self.col_weight = nn.Parameter(torch.empty(grid[1], width))
        for p in (self.row_weight, self.col_weight):
            p.no_weight_decay = True  # type: ignore[attr-defined]
            set_init(p, trunc_normal(std / math.sqrt(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = (self.row_weight[:, None, :] + self.col_weight[None, :, :]).flatten(0, 1)
        return x + table.unsqueeze(1)


class PatchMerge(nn.Module):
    """--patch-merge-layers: each 2x2 group of neighbouring grid tokens becomes one token:
    the four concatenated in row-major order within the group ((0,0), (0,1), (1,0), (1,1);
    4h wide), normed, projected to h (no bias). [p + gh*gw, b, h] -> [p + gh/2*gw/2, b, h],
    the p prefix (class) tokens passed through unchanged. Replicated over TP: it runs on
    the whole sequence (under SP gathered first, see `VisionTransformer.merge`)."""

    def __init__(self, cfg: ModelConfig, rt: Runtime) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.prefix, self.grid = cfg.prefix_tokens, cfg.grid
        self.norm = norm_from_config(cfg, 4 * h, rt.layernorm_impl)
        self.proj = nn.Linear(4 * h, h, bias=False)
        set_init(self.proj.weight, lecun_normal())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, (gh, gw) = self.prefix, self.grid
        _, b, h = x.shape
        groups = x[p:p + gh * gw].reshape(gh // 2, 2, gw // 2, 2, b, h)
        groups = groups.permute(0, 2, 4, 1, 3, 5).reshape((gh // 2) * (gw // 2), b, 4 * h)
        merged = self.proj(self.norm(groups))
        return torch.cat([x[:p], merged]) if p else merged


class VisionTransformer(nn.Module):
    """A ViT, or the part of one that a pipeline stage holds.

    `layers`: the global indices of the blocks built here (default: all). `pre_process`:
    this part embeds images; `post_process`: it pools and classifies. Input: images
    [b, c, H, W] when pre_process, else hidden states. Output: logits [b, classes]
    (features [b, h] when num_classes is 0) when post_process, else hidden states.
    Hidden states are [s, b, h], or with sequence parallelism this rank's [s_p/t, b, h] of
    the sequence padded to s_p, a multiple of t (padded keys are masked in attention).
    `sample_ids` ([b] global image ids) key the drop-path masks in training.

    --feature-layers: the outputs of those blocks (before a merge after them) travel with
    the hidden states. A part that does not pool sends one tensor along dim 0,
    [hidden states; feature of the first listed block held so far; ...], each segment
    [s_l, b, h] (SP: this rank's [s_l,p/t, b, h] of it padded); the next part splits it
    (`split_received`). The last part hands the features, gathered, to `output`.
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
        layers = range(cfg.num_layers) if layers is None else layers
        first = layers[0] if len(layers) else cfg.num_layers
        after = layers[-1] + 1 if len(layers) else cfg.num_layers
        # tokens entering each block of this part and leaving its last (fewer after merges)
        self.lengths = {i: cfg.at_layer(i).seq_length for i in (*layers, after)}
        self.output_length = self.lengths[after]
        s = self.lengths[first]                  # the tokens this part receives
        self.padded_length = -(-s // t) * t if rt.sequence_parallel else s
        if self.padded_length != s:  # keys past s are padding: additive mask, filled later
            self.register_buffer("pad_mask", torch.empty(self.padded_length, self.padded_length),
                                 persistent=False)
        self.input_length = s
        self.reads_hidden_states = True       # False: the head reads only the features
        # --feature-layers: those caught here, and those every part before caught
        features = cfg.feature_layer_list()
        self.catch = frozenset(l for l in features if l in layers)
        self.carried_in = [l for l in features if l < first]
        self.feature_lengths = {l: cfg.at_layer(l).seq_length for l in features if l < after}
        self.received_tokens = self.local_tokens(s) + sum(
            self.local_tokens(self.feature_lengths[l]) for l in self.carried_in)
        # the padding masks of the shorter sequences after merges (SP): buffers, like pad_mask
        self.merged_lengths = sorted({self.lengths[i] for i in layers} - {s})
        for length in self.merged_lengths if rt.sequence_parallel else ():
            padded = -(-length // t) * t
            if padded != length:
                self.register_buffer(f"pad_mask_{length}", torch.empty(padded, padded),
                                     persistent=False)
        if pre_process:
            self.patch_embed = PatchEmbedding(cfg)
            kind = cfg.position_embedding_type
            self.pos_embed = (LearnedPositionEmbedding(cfg.grid, h, cfg.init_method_std)
                              if kind == "learned" else
                              RowColumnPositionEmbedding(cfg.grid, h, cfg.init_method_std)
                              if kind == "learned-2d" else None)
            if kind == "sincos2d":      # fixed sin-cos table, filled by init_buffers
                self.register_buffer("pos_sincos", torch.empty(cfg.grid[0] * cfg.grid[1], h),
                                     persistent=False)
            if cfg.pooling == "cls":
                self.cls_token = nn.Parameter(torch.empty(h))
                set_init(self.cls_token, trunc_normal(cfg.init_method_std))
            if cfg.num_registers:
                self.register_tokens = nn.Parameter(torch.empty(cfg.num_registers, h))
                set_init(self.register_tokens, trunc_normal(cfg.init_method_std))
            if cfg.distillation_token:
                self.dist_token = nn.Parameter(torch.empty(h))
                set_init(self.dist_token, trunc_normal(cfg.init_method_std))
            if cfg.pre_norm:
                self.pre_norm = norm_from_config(cfg, h, rt.layernorm_impl)
        self.blocks = nn.ModuleDict({str(i): build_block(cfg.at_layer(i), rt, i)
                                     for i in layers})
        merged = set(cfg.merge_layers())
        self.merges = nn.ModuleDict({str(i): PatchMerge(cfg.at_layer(i), rt)
                                     for i in layers if i in merged})
        if post_process:
            self.norm = norm_from_config(cfg, h, rt.layernorm_impl)
            self.map_head = (MAPHead(cfg, rt.tp, rt.layernorm_impl) if cfg.pooling == "map"
                             else None)
            self.head = nn.Linear(h, cfg.num_classes) if cfg.num_classes else None
            if self.head is not None:
                set_init(self.head.weight, trunc_normal(cfg.init_method_std))
                set_init(self.head.bias, constant(0.0))
            if cfg.distillation_token:          # DeiT: its own classifier
                self.head_dist = nn.Linear(h, cfg.num_classes)
                set_init(self.head_dist.weight, trunc_normal(cfg.init_method_std))
                set_init(self.head_dist.bias, constant(0.0))

    def local_tokens(self, length: int) -> int:
        """Rows this rank holds of a sequence of `length` tokens: all of them, or with SP
        its shard of the sequence padded to a multiple of t."""
        t = self.rt.tp.size
        return -(-length // t) if self.rt.sequence_parallel else length

    def init_buffers(self) -> None:
        """Fill non-learned buffers (called by initialize_parameters after materialising)."""
        if self.pre_process and self.cfg.position_embedding_type == "sincos2d":
            self.pos_sincos.copy_(sincos_2d(self.cfg.grid, self.cfg.hidden_size))
        if self.padded_length != self.input_length:
            self.pad_mask.zero_()
            self.pad_mask[:, self.input_length:] = float("-inf")
        for length in self.merged_lengths:
            if (mask := getattr(self, f"pad_mask_{length}", None)) is not None:
                mask.zero_()
                mask[:, length:] = float("-inf")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[b, c, H, W] -> [s, b, h]: patches, + positions, the registers, the distillation
        token and the class token in front ([cls | dist | registers | patches]), the
        pre-norm."""
        x = self.patch_embed(images)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        elif self.cfg.position_embedding_type == "sincos2d":
            x = x + self.pos_sincos.unsqueeze(1)      # rope-2d: positions enter the attention
        if self.cfg.num_registers:
            x = torch.cat([self.register_tokens.unsqueeze(1).expand(-1, x.shape[1], -1), x])
        if self.cfg.distillation_token:
            x = torch.cat([self.dist_token.view(1, 1, -1).expand(1, x.shape[1], -1), x], dim=0)
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

    def gather_sequence(self, x: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """With SP: this rank's [s_p/t, b, h] of a `length`-token sequence (default: this
        part's output) -> all [s, b, h] (padding dropped)."""
        if not self.rt.sequence_parallel:
            return x
        return gather_from_sequence_parallel(x, self.rt.tp)[:length or self.output_length]

    def merge(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The merge after block `layer`. With SP: this rank's shard is gathered (padding
        dropped), merged on every rank alike, padded to a multiple of t again and
        scattered."""
        if not self.rt.sequence_parallel:
            return self.merges[str(layer)](x)
        full = self.gather_sequence(x, self.lengths[layer])
        merged = self.merges[str(layer)](full)
        t = self.rt.tp.size
        pad = -(-merged.shape[0] // t) * t - merged.shape[0]
        if pad:
            merged = torch.cat([merged, merged.new_zeros(pad, *merged.shape[1:])])
        return scatter_to_sequence_parallel(merged, self.rt.tp)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [b, h] (the distillation token and registers dropped first)."""
        x = self.norm(x)
        if self.cfg.pooling == "cls":
            return x[0]
        x = x[self.cfg.dropped_before_pooling:]
        if self.cfg.pooling == "map":
            return self.map_head(x)
        return x.mean(dim=0)

    def _run_blocks(self, x: torch.Tensor, mask: torch.Tensor | None,
                    sample_ids: torch.Tensor | None, start: int, stop: int,
                    catch: frozenset = frozenset(),
                    caught: list | None = None) -> torch.Tensor:
        """Blocks [start, stop) of this part (local positions), each followed by its
        merge if it has one; the outputs of the blocks in `catch` (before their merge) are
        appended to `caught`. `mask`: the padding mask of this part's input; after a merge
        each block gets the mask of its own sequence length."""
        for name, block in list(self.blocks.items())[start:stop]:
            layer = int(name)
            if self.merges:
                mask = self._mask_of(layer, x)
            x = block(x, ForwardContext(mask, sample_ids))
            if layer in catch:
                caught.append(x)
            if name in self.merges:
                x = self.merge(x, layer)
        return x

    def _region(self, x: torch.Tensor, mask: torch.Tensor | None,
                sample_ids: torch.Tensor | None, start: int, stop: int,
                catch: frozenset) -> torch.Tensor | tuple:
        """A recomputed region: `_run_blocks`' output, with the features caught in it after
        it as a tuple (None for a feature that is the output itself: an autograd function
        returns each tensor once)."""
        caught: list = []
        y = self._run_blocks(x, mask, sample_ids, start, stop, catch, caught)
        return (y, *(None if f is y else f for f in caught)) if caught else y

    def _mask_of(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The padding mask of block `layer`'s input `x` (this rank's shard under SP)."""
        length = self.lengths[layer]
        if length == self.input_length:
            return getattr(self, "pad_mask", None)
        return getattr(self, f"pad_mask_{length}", None)

    def run_blocks(self, x: torch.Tensor, sample_ids: torch.Tensor | None,
                   catch: frozenset = frozenset(), caught: list | None = None) -> torch.Tensor:
        """The blocks of this part, with --recompute-granularity full applied: 'uniform'
        keeps only the input of each chunk of N blocks, 'block' only the inputs of the
        first N blocks, each recomputed on its own. The outputs of the blocks in `catch`
        are appended to `caught` in block order."""
        mask = getattr(self, "pad_mask", None)
        rt, n_blocks = self.rt, len(self.blocks)
        if rt.recompute_granularity != "full" or not torch.is_grad_enabled():
            return self._run_blocks(x, mask, sample_ids, 0, n_blocks, catch, caught)
        n = rt.recompute_num_layers
        regions = ([(start, start + n, True) for start in range(0, n_blocks, n)]
                   if rt.recompute_method == "uniform" else
                   [(i, i + 1, i < n) for i in range(n_blocks)])
        for start, stop, recomputed in regions:
            if not recomputed:
                x = self._run_blocks(x, mask, sample_ids, start, stop, catch, caught)
                continue
            out = recompute(self._region, x, mask, sample_ids, start, stop, catch, rng=rt.rng)
            if isinstance(out, tuple):
                x = out[0]
                caught.extend(x if f is None else f for f in out[1:])
            else:
                x = out
        return x

    def split_received(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What this part received -> (hidden states, [the features carried in]): views
        of the segments along dim 0 (see the class docstring)."""
        if not self.carried_in:
            return x, []
        sizes = [self.local_tokens(self.input_length),
                 *(self.local_tokens(self.feature_lengths[l]) for l in self.carried_in)]
        x, *features = torch.split(x, sizes)
        return x, features

    def token_map(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Block `layer`'s tokens [s_l, b, h] (layer = num_layers: the last block's output
        after any merge) -> its patch map [b, h, gh, gw] (a class token dropped)."""
        gh, gw = self.cfg.grid_at(layer)
        x = x[x.shape[0] - gh * gw:]
        return x.permute(1, 2, 0).reshape(x.shape[1], x.shape[2], gh, gw)

    @torch.no_grad()
    def forward_intermediates(self, images: torch.Tensor,
                              layers: Sequence[int]) -> list[torch.Tensor]:
        """The outputs of blocks `layers` (before a merge after them; not normed) for images
        [b, c, H, W], as maps [b, h, gh_l, gw_l] in the order of `layers`, computed in eval
        mode (no dropout or drop-path; the module's mode is restored). A whole model only
        (one pipeline stage); under TP / SP every rank returns the whole maps."""
        return self.output_and_intermediates(images, layers, with_output=False)[1]

    @torch.no_grad()
    def output_and_intermediates(self, images: torch.Tensor, layers: Sequence[int],
                                 with_output: bool = True,
                                 pooled: list[torch.Tensor] | None = None
                                 ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(the model's output, e.g. logits [b, C], or None without `with_output`; the maps
        of `forward_intermediates`) from one eval-mode pass; with a list `pooled`, the
        pooled features [b, h] (what the classifier reads) are appended to it."""
        if not (self.pre_process and self.post_process):
            raise ValueError("forward_intermediates needs the whole model on this rank "
                             "(pipeline parallel size 1)")
        if bad := [l for l in layers if not 0 <= l < self.cfg.num_layers]:
            raise ValueError(f"block(s) {bad} outside 0..{self.cfg.num_layers - 1}")
        training = self.training
        self.eval()
        try:
            x = self.scatter_sequence(self.embed(images))
            caught: list[torch.Tensor] = []
            x = self.run_blocks(x, None, frozenset(layers), caught)
            x = self.gather_sequence(x)
            if pooled is not None:
                pooled.append(self.pool(x))
                out = (self.classify(x, pooled[-1]) if self.head is not None else pooled[-1]
                       ) if with_output else None
            else:
                out = self.output(x) if with_output else None
        finally:
            self.train(training)
        by_layer = dict(zip(sorted(set(layers)), caught))
        return out, [self.token_map(self.gather_sequence(by_layer[l],
                                                         self.cfg.at_layer(l).seq_length), l)
                     for l in layers]

    def forward(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None,
                block_meter: contextlib.AbstractContextManager | None = None,
                apply_head: bool = True) -> torch.Tensor:
        """`block_meter`, if given, is entered around the blocks only (e.g. a
        SavedTensorMeter measuring their activations). `apply_head` False: the last part
        returns the pooled features [b, h] even when there is a classifier."""
        if self.pre_process:
            x, features = self.scatter_sequence(self.embed(x)), []
        else:
            x, features = self.split_received(x)
        with block_meter if block_meter is not None else contextlib.nullcontext():
            x = self.run_blocks(x, sample_ids, self.catch, features)
        if self.post_process:
            layers = sorted(self.feature_lengths)
            if self.reads_hidden_states:
                x = self.gather_sequence(x)
            return self.output(x, apply_head,
                               [self.gather_sequence(f, self.feature_lengths[l])
                                for f, l in zip(features, layers)])
        return torch.cat([x, *features]) if features else x

    def output(self, x: torch.Tensor, apply_head: bool = True,
               features: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The last part's output from all tokens [s, b, h]: pooled features [b, h], or
        logits [b, classes] through the classifier when there is one and `apply_head`.
        `features`: the --feature-layers outputs, all tokens [s_l, b, h] each (a dense
        head's; the classifier does not read them)."""
        pooled = self.pool(x)
        if self.head is None or not apply_head:
            return pooled
        return self.classify(x, pooled)

    def classify(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The classifier's logits [b, classes] from the pooled features [b, h] (`x`: all
        tokens [s, b, h], read by a distillation token's head)."""
        if not self.cfg.distillation_token:
            return self.head(pooled)
        dist = self.head_dist(self.norm(x[int(self.cfg.pooling == "cls")]))
        if self.training:                   # both heads, for --distill-loss token
            return torch.cat([self.head(pooled), dist], dim=-1)
        return (self.head(pooled) + dist) / 2      # DeiT's inference: the heads averaged

    def estimate_flops(self, batch_size: int, training: bool = True) -> int:
        """Matmul FLOPs of the whole model (all layers, all ranks) for `batch_size` images:
        the forward pass, or forward + backward (3x) when `training` (recomputation and
        sequence padding not counted: model FLOPs, as MFU uses)."""
        return vit_flops(self.cfg, batch_size, training)


EMBEDDING_PARAMETERS = ("patch_embed.", "pos_embed.", "cls_token", "dist_token",
                        "register_tokens", "pre_norm.")


def vit_layer_id(name: str, num_layers: int) -> int:
    """The depth of parameter `name` for layer-wise lr decay: 0 for the embeddings (patches,
    positions, class token, pre-norm), i + 1 for `blocks.i`, num_layers + 1 for the final
    norm, the pooling head and the classifier."""
    if name.startswith(EMBEDDING_PARAMETERS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def attention_flops(cfg: ModelConfig, layer: int) -> int:
    """QK^T and AV FLOPs of block `layer` for one image: 4 s^2 h with full attention; with
    windows, the padded windows' queries against their w^2 keys plus the prefix keys, and
    the prefix queries against every token; linear attention 4 s h d (d the head width)."""
    h, s = cfg.hidden_size, cfg.seq_length
    kind = cfg.attention_kind(layer)
    if kind == "full":
        return 4 * s * s * h
    if kind == "linear":            # phi(k)^T v and phi(q) (.) per head: 2 x 2 s d^2 x heads
        return 4 * s * h * cfg.head_dim
    w, (gh, gw) = cfg.window_size, cfg.grid
    prefix = s - gh * gw
    windows = -(-gh // w) * -(-gw // w)
    keys = w * w + prefix + (windows if kind == "local-global" else 0)
    queries = prefix + (windows if kind == "local-global" else 0)   # those seeing every token
    return 4 * windows * w * w * keys * h + 4 * queries * s * h


def vit_flops(cfg: ModelConfig, batch_size: int, training: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of a ViT for `batch_size` images.

    Per image, s tokens, width h, MLP f: a block costs 2sh(3h + f) (QKV + MLP-in)
    + 4s^2h (QK^T and AV; window blocks: `attention_flops`) + 2s(h + f)h (attention-out +
    MLP-out); both block types are equal. With --patch-merge-layers each block counts the
    tokens of its own grid, and each merge 2 (g/4) 4h h for a grid of g tokens. Plus the
    patch embedding, the MAP head and the classifier. Backward costs twice the forward.
    Elementwise work (norms, softmax, GELU) is not counted.
    """
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    patches = cfg.grid[0] * cfg.grid[1]
    blocks = 0
    for layer in range(cfg.num_layers):       # --patch-merge-layers: each block's own grid
        at = cfg.at_layer(layer)
        s = at.seq_length
        blocks += 2 * s * h * (3 * h + f) + 2 * s * (h + f) * h + attention_flops(at, layer)
    for layer in cfg.merge_layers():          # a merge: [g/4, 4h] x [4h, h]
        gh, gw = cfg.grid_at(layer + 1)
        blocks += 2 * gh * gw * 4 * h * h
    s = cfg.at_layer(cfg.num_layers).seq_length   # what the head sees
    embed = 2 * patches * cfg.num_channels * cfg.patch_dim ** 2 * h
    head, once = 0, 0
    if cfg.pooling == "map":
        # keys/values (s tokens), 1 x s attention, out and MLP (1 token) per image; the
        # probe's query is the same for every image and computed once per batch.
        head += 2 * s * h * 2 * h + 4 * s * h + 2 * h * h + 4 * h * f
        once += 2 * h * h
    if cfg.num_classes:
        head += 2 * h * cfg.num_classes
    forward = batch_size * (embed + blocks + head) + once
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
