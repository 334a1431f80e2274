"""Attention other than full softmax attention, chosen per block
(`TransformerConfig.attention_kind`): window attention over the 2-D token grid (ViTDet) and
linear (kernel) attention.

The tokens of an image model are `prefix` tokens (the class token, when pooling is 'cls')
followed by the patch grid in row-major order (gh x gw), then, under sequence parallelism,
padding up to a multiple of the TP size:

    [ cls | p(0,0) p(0,1) ... p(gh-1,gw-1) | pad ... ]

Window attention, the exact rule: the grid is cut into non-overlapping w x w windows from
the top-left corner (with --window-shift, every second window block first rolls the padded
grid by w // 2 up and left, Swin's cyclic shift, and masks pairs the roll brought together:
`shifted_window_mask`). `local-global`: the top-left patch of every window is a global
token — it attends to every real token, and every token attends to every window's global
token besides its own window (w^2 + windows keys a query); with w = 1 every token is global
and the result is full attention (`window_global_indices`); a grid that w does not divide is padded at the bottom and right with
masked tokens (ViTDet), so the last row / column of windows is partial. A patch token attends
to the real patch tokens of its own window and to every prefix token; a prefix token attends
to every real token (it is global: the class token keeps the image-wide context). Padding
tokens (grid or sequence) are never attended to; their outputs are zeros. With w >= both
grid sides there is one window and the result equals full attention.

Per rank the heads are this TP rank's (windows are per head: no collective); the input is
the whole sequence (under SP the column-parallel projection has gathered it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one image sit in the sequence: `prefix` tokens, then the grid
    (rows, columns) row-major; `length` = prefix + rows x columns real tokens."""

    prefix: int
    grid: tuple[int, int]

    @property
    def length(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


def window_partition(x: torch.Tensor, grid: tuple[int, int], w: int) -> torch.Tensor:
    """x [B, n, gh*gw, d] (row-major grid) -> windows [B * nh * nw, n, w*w, d], the grid
    zero-padded to multiples of w (nh = ceil(gh / w), nw = ceil(gw / w))."""
    B, n, _, d = x.shape
    gh, gw = grid
    nh, nw = math.ceil(gh / w), math.ceil(gw / w)
    x = x.view(B, n, gh, gw, d)
    if nh * w != gh or nw * w != gw:
        x = F.pad(x, (0, 0, 0, nw * w - gw, 0, nh * w - gh))
    x = x.view(B, n, nh, w, nw, w, d).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(B * nh * nw, n, w * w, d)


def window_unpartition(x: torch.Tensor, batch: int, grid: tuple[int, int], w: int
                       ) -> torch.Tensor:
    """The inverse of `window_partition`: [B * nh * nw, n, w*w, d] -> [B, n, gh*gw, d]."""
    gh, gw = grid
    nh, nw = math.ceil(gh / w), math.ceil(gw / w)
    n, d = x.shape[1], x.shape[-1]
    x = x.view(batch, nh, nw, n, w, w, d).permute(0, 3, 1, 4, 2, 5, 6)
    x = x.reshape(batch, n, nh * w, nw * w, d)[:, :, :gh, :gw]
    return x.reshape(batch, n, gh * gw, d)


def window_key_mask(grid: tuple[int, int], w: int, prefix: int) -> torch.Tensor | None:
    """Boolean [nh * nw, 1, 1, prefix + w*w] (True: may attend) marking each window's
    padding keys, or None when w divides the grid."""
    gh, gw = grid
    nh, nw = math.ceil(gh / w), math.ceil(gw / w)
    if nh * w == gh and nw * w == gw:
        return None
    real = torch.zeros(nh * w, nw * w, dtype=torch.bool)
    real[:gh, :gw] = True
    inside = real.view(nh, w, nw, w).permute(0, 2, 1, 3).reshape(nh * nw, w * w)
    keep = torch.cat([torch.ones(nh * nw, prefix, dtype=torch.bool), inside], dim=1)
    return keep.view(nh * nw, 1, 1, prefix + w * w)


def shifted_window_mask(grid: tuple[int, int], w: int, shift: int, prefix: int
                        ) -> torch.Tensor:
    """Boolean [nh * nw, 1, w*w, prefix + w*w] (True: may attend) for windows of the grid
    padded to multiples of w and rolled by (-shift, -shift): a query sees the real keys of
    its window that come from the same region of the rolled grid (Swin's rule: along each
    axis the bands [0, G - w), [G - w, G - shift), [G - shift, G) of the padded side G), and
    every prefix key."""
    gh, gw = grid
    nh, nw = math.ceil(gh / w), math.ceil(gw / w)
    Gh, Gw = nh * w, nw * w

    def bands(size: int) -> torch.Tensor:
        x = torch.arange(size)
        return (x >= size - w).long() + (x >= size - shift).long()

    region = bands(Gh)[:, None] * 3 + bands(Gw)[None, :]                     # rolled frame
    real = torch.zeros(Gh, Gw, dtype=torch.bool)
    real[:gh, :gw] = True
    real = real.roll((-shift, -shift), dims=(0, 1))

    def windows(t: torch.Tensor) -> torch.Tensor:
        return t.view(nh, w, nw, w).permute(0, 2, 1, 3).reshape(nh * nw, w * w)

    region, real = windows(region), windows(real)
    allowed = (region[:, :, None] == region[:, None, :]) & real[:, None, :]
    allowed = torch.cat([torch.ones(nh * nw, w * w, prefix, dtype=torch.bool), allowed], 2)
    return allowed.unsqueeze(1)


def window_global_indices(grid: tuple[int, int], w: int) -> torch.Tensor:
    """Grid indices [nW] of each window's global token (local-global): its top-left patch,
    always a real one."""
    gh, gw = grid
    rows = torch.arange(0, gh, w).repeat_interleave(math.ceil(gw / w))
    cols = torch.arange(0, gw, w).repeat(math.ceil(gh / w))
    return rows * gw + cols


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                     w: int, dropout_p: float = 0.0, shift: int = 0,
                     carriers: bool = False) -> torch.Tensor:
    """q, k, v [b, n, S, d] (heads first; S >= layout.length, the rest padding) -> [b, n, S,
    d] by the rule of the module docstring; with `shift` (Swin) the padded grid is rolled
    by (-shift, -shift) before the windows are cut and back after, and
    `shifted_window_mask` keeps tokens that the roll brought together from attending to
    each other. Dropout (p `dropout_p`) draws from the current generator, as SDPA does."""
    b, n, S, d = q.shape
    P, L, grid = layout.prefix, layout.length, layout.grid
    if shift:
        qg, kg, vg = (_rolled_windows(t[:, :, P:L], grid, w, shift) for t in (q, k, v))
        mask = shifted_window_mask(grid, w, shift, P)
    else:
        qg, kg, vg = (window_partition(t[:, :, P:L], grid, w) for t in (q, k, v))
        mask = window_key_mask(grid, w, P)
    windows = qg.shape[0] // b
    if carriers:                        # local-global: every window's global token too
        glob = P + window_global_indices(grid, w).to(q.device)
        kc = k[:, :, glob].repeat_interleave(windows, dim=0)           # [b*nW, n, nW, d]
        vc = v[:, :, glob].repeat_interleave(windows, dim=0)
        kg, vg = torch.cat([kc, kg], dim=2), torch.cat([vc, vg], dim=2)
        # keys: [prefix | global tokens | window]; a window's own global token is already
        # among its window keys, so its copy is masked
        others = ~torch.eye(windows, dtype=torch.bool).view(windows, 1, 1, windows)
        if mask is None:
            mask = torch.ones(windows, 1, 1, P + w * w, dtype=torch.bool)
        mask = torch.cat([mask[..., :P], others.expand(-1, 1, mask.shape[2], -1),
                          mask[..., P:]], dim=3)
    if P:                               # every window also sees the prefix tokens
        kp = k[:, :, :P].repeat_interleave(windows, dim=0)
        vp = v[:, :, :P].repeat_interleave(windows, dim=0)
        kg, vg = torch.cat([kp, kg], dim=2), torch.cat([vp, vg], dim=2)
    if mask is not None:
        mask = mask.repeat(b, 1, 1, 1).to(q.device)
    attended = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout_p)
    out = (_unrolled(attended, b, grid, w, shift) if shift
           else window_unpartition(attended, b, grid, w))
    if carriers:                        # global tokens attend to every real token
        glob_out = F.scaled_dot_product_attention(q[:, :, glob], k[:, :, :L], v[:, :, :L],
                                                  dropout_p=dropout_p)
        out = out.index_copy(2, glob - P, glob_out)
    pieces = [out]
    if P:                               # the prefix attends to every real token
        pieces.insert(0, F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :L], v[:, :, :L],
                                                        dropout_p=dropout_p))
    if S > L:
        pieces.append(q.new_zeros(b, n, S - L, d))
    return torch.cat(pieces, dim=2) if len(pieces) > 1 else out


def _rolled_windows(x: torch.Tensor, grid: tuple[int, int], w: int, shift: int
                    ) -> torch.Tensor:
    """[B, n, gh*gw, d] -> the windows of the grid padded to multiples of w and rolled by
    (-shift, -shift)."""
    B, n, _, d = x.shape
    gh, gw = grid
    Gh, Gw = math.ceil(gh / w) * w, math.ceil(gw / w) * w
    x = F.pad(x.view(B, n, gh, gw, d), (0, 0, 0, Gw - gw, 0, Gh - gh))
    x = x.roll((-shift, -shift), dims=(2, 3))
    return window_partition(x.reshape(B, n, Gh * Gw, d), (Gh, Gw), w)


def _unrolled(x: torch.Tensor, batch: int, grid: tuple[int, int], w: int, shift: int
              ) -> torch.Tensor:
    """The inverse of `_rolled_windows`: windows -> [B, n, gh*gw, d]."""
    gh, gw = grid
    Gh, Gw = math.ceil(gh / w) * w, math.ceil(gw / w) * w
    x = window_unpartition(x, batch, (Gh, Gw), w)
    n, d = x.shape[1], x.shape[-1]
    x = x.view(batch, n, Gh, Gw, d).roll((shift, shift), dims=(2, 3))[:, :, :gh, :gw]
    return x.reshape(batch, n, gh * gw, d)


def elu_feature(x: torch.Tensor) -> torch.Tensor:
    """The positive feature map of linear attention: elu(x) + 1."""
    return F.elu(x) + 1.0


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Kernel attention (Katharopoulos et al. 2020) over the first `length` tokens:
    out_i = phi(q_i) sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j)), phi = elu + 1,
    computed as phi(q) (phi(k)^T v) in O(s d^2). q, k, v [b, n, S, d] -> [b, n, S, d];
    tokens past `length` (padding) are neither keys nor given an output (zeros).
    `dropout_p` must be 0 (no probabilities to drop)."""
    if dropout_p:
        raise ValueError("linear attention has no attention dropout")
    S = q.shape[2]
    fq, fk = elu_feature(q[:, :, :length]), elu_feature(k[:, :, :length])
    kv = fk.transpose(-2, -1) @ v[:, :, :length]                      # [b, n, d, d]
    norm = fq @ fk.sum(dim=2, keepdim=True).transpose(-2, -1)         # [b, n, L, 1]
    out = (fq @ kv) / norm
    if S > length:
        out = torch.cat([out, out.new_zeros(*out.shape[:2], S - length, out.shape[-1])], dim=2)
    return out


def rope_2d_angles(layout: TokenLayout, head_dim: int, base: float = 10000.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [length, head_dim] of the axial 2-D rotary embedding: the first half of a
    head's width rotates with the token's row, the second half with its column; within a
    half of width m, dimension pairs (j, j + m/2) turn at frequency base^(-2j/m) (RoFormer's
    rotate-half form). Prefix tokens (the class token) are not rotated (angle 0)."""
    gh, gw = layout.grid
    m = head_dim // 2
    cpu = {"dtype": torch.float64, "device": "cpu"}
    freq = base ** (-torch.arange(0, m, 2, **cpu) / m)                        # [m/2]
    rows = torch.arange(gh, **cpu).repeat_interleave(gw)                      # [gh*gw]
    cols = torch.arange(gw, **cpu).repeat(gh)
    row_angles, col_angles = rows[:, None] * freq, cols[:, None] * freq        # [gh*gw, m/2]
    angles = torch.cat([row_angles, row_angles, col_angles, col_angles], dim=1)
    angles = torch.cat([angles.new_zeros(layout.prefix, head_dim), angles])
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, n, S, d] with its first `length` tokens turned by the angles (cos, sin
    [length, d]); within each axis half (a, b) -> (a cos - b sin, b cos + a sin)."""
    length, d = cos.shape
    head, rest = x[:, :, :length], x[:, :, length:]
    m = d // 2
    a1, b1, a2, b2 = head.split(m // 2, dim=-1)
    turned = torch.cat([-b1, a1, -b2, a2], dim=-1)
    rotated = head * cos.to(x.dtype) + turned * sin.to(x.dtype)
    return torch.cat([rotated, rest], dim=2) if rest.shape[2] else rotated


class _Rope2d(torch.autograd.Function):
    """The rotation as one autograd node that keeps nothing for backward: its gradient is
    the inverse rotation (angle -theta) of the output gradient. The tables are constants
    of the model, held by the node, not saved activations."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.tables = (cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.tables
        return _rotate(grad, cos, -sin), None, None


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, n, S, d] with its first `length` tokens rotated (cos, sin [length, d]); the
    rest (padding) as they are. Backward keeps nothing but the tables (`_Rope2d`)."""
    return _Rope2d.apply(x, cos, sin)


def attention_allowed(layout: TokenLayout, w: int, shift: int = 0,
                      carriers: bool = False) -> torch.Tensor:
    """Boolean [L, L] (L = layout.length; True: query row may attend to key column) of
    window attention's rule (module docstring) over the real tokens, windows placed back
    on the grid: what `window_attention` computes, as one matrix (for attention maps)."""
    P, (gh, gw) = layout.prefix, layout.grid
    r, c = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
    Gh, Gw = math.ceil(gh / w) * w, math.ceil(gw / w) * w
    if shift:
        r, c = (r - shift) % Gh, (c - shift) % Gw

        def band(x: torch.Tensor, size: int) -> torch.Tensor:
            return (x >= size - w).long() + (x >= size - shift).long()

        region = band(r, Gh) * 3 + band(c, Gw)
    else:
        region = torch.zeros_like(r)
    window = (r // w) * (Gw // w) + c // w
    same = (window[:, None] == window[None, :]) & (region[:, None] == region[None, :])
    allowed = torch.ones(layout.length, layout.length, dtype=torch.bool)
    allowed[P:, P:] = same
    if carriers:
        glob = P + window_global_indices(layout.grid, w)
        allowed[:, glob] = True            # every token sees every window's global token
        allowed[glob, :] = True            # and a global token sees every token
    return allowed


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                    mask: torch.Tensor | None, kind: str, length: int,
                    layout: TokenLayout | None = None, w: int = 0, shift: int = 0,
                    record=None) -> torch.Tensor:
    """Any attention kind computed with its probabilities made explicit: P [b, n, L, L]
    over the first `length` (real) tokens — softmax(q k^T / sqrt(d)) restricted by the
    kind's rule (`attention_allowed` for window / local-global), or linear attention's
    normalised kernel phi(q_i).phi(k_j) / sum_j — then P v, zeros for padding tokens.
    `record(P)` receives the probabilities (kept in the autograd graph: gradient-weighted
    maps need them). Equal to the fused paths; for attention maps only (O(L^2) memory)."""
    if dropout_p:
        raise ValueError("attention maps are computed without attention dropout (eval mode)")
    S, L = q.shape[2], length
    q, k, vl = q[:, :, :L], k[:, :, :L], v[:, :, :L]
    if kind == "linear":
        a = elu_feature(q) @ elu_feature(k).transpose(-2, -1)
        probabilities = a / a.sum(dim=-1, keepdim=True)
    else:
        # scaled on q ([L, d]), masked in place: no extra [L, L] pass
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
        if kind in ("window", "local-global"):
            allowed = attention_allowed(layout, w, shift, kind == "local-global")
            scores.masked_fill_(~allowed.to(scores.device), float("-inf"))
        probabilities = scores.softmax(dim=-1)
    if record is not None:
        record(probabilities)
    out = probabilities @ vl
    if S > L:
        out = torch.cat([out, out.new_zeros(*out.shape[:2], S - L, out.shape[-1])], dim=2)
    return out
