"""Attention maps from recorded probabilities (recording.py). Every function works on one
image's maps: P [n, L, L] per block (n heads, L = prefix + gh*gw real tokens), and returns
a relevance per token [L] (`to_grid` lays the patch part out as [gh, gw]).

Queries ("where the model looks from", `start`):
    cls     the class token's row (pooling 'cls')
    mean    the mean of the patch tokens' rows (pooling 'gap': the mean token)
    probe   the MAP head's probe, whose attention P_probe [n, 1, L] is the pooling itself
            (pooling 'map', ViT-22B: there is no class token)

Rules (the formulas of docs/architecture.md, "Looking inside"):
    heads      P[head] (or the mean over heads: head-fused) seen from `start`
    rollout    Abnar & Zuidema 2020: A_l = 0.5 mean_h P_l + 0.5 I (rows sum to 1),
               R = A_last ... A_first (a product of row-stochastic matrices: rows sum to
               1), seen from `start` (probe: mean_h P_probe R)
    map-probe  mean_h P_probe: where the MAP pooling looks
    relevancy  Chefer et al. 2021 (generic rule, self-attention): R = I; per block in order
               R <- R + mean_h(relu(grad(P) * P)) R, with grad(P) the gradient of the chosen
               class's logit; seen from `start` (probe: mean_h relu(grad * P_probe) R). From
               'mean' the identity is taken out first (R - I): the class token's row leaves
               out its own diagonal entry, and each patch's relevance to itself says nothing
               about where the mean token looks (it would add 1/L to every patch)
"""

from __future__ import annotations

import torch

STARTS = ("cls", "mean", "probe")


def default_start(pooling: str) -> str:
    """The query that matches the pooling: cls -> 'cls', map -> 'probe', gap -> 'mean'."""
    return {"cls": "cls", "map": "probe"}.get(pooling, "mean")


def seen_from(matrix: torch.Tensor, start: str, prefix: int,
              probe: torch.Tensor | None = None) -> torch.Tensor:
    """A [L, L] token-to-token matrix -> [L]: the row of the class token, the mean of the
    patch rows, or `probe` [L] (a query's weights over the tokens) times the matrix."""
    if start == "cls":
        if prefix < 1:
            raise ValueError("start 'cls': this model has no class token (use 'mean' or, "
                             "with MAP pooling, 'probe')")
        return matrix[0]
    if start == "mean":
        return matrix[prefix:].mean(dim=0)
    if start == "probe":
        if probe is None:
            raise ValueError("start 'probe': this model has no MAP head (pooling map)")
        return probe @ matrix
    raise ValueError(f"start {start!r}: one of {', '.join(STARTS)}")


def head_maps(p: torch.Tensor, start: str, prefix: int,
              probe: torch.Tensor | None = None) -> torch.Tensor:
    """One block's P [n, L, L] -> each head's relevance [n, L] seen from `start` (the probe
    weights `probe` [L] are applied to every head's matrix)."""
    return torch.stack([seen_from(h, start, prefix, probe) for h in p])


def rollout(maps: list[torch.Tensor], start: str, prefix: int,
            probe: torch.Tensor | None = None, keep_steps: bool = False):
    """Attention rollout over blocks' P [n, L, L] (first block first) -> [L] (with
    `keep_steps`, also the list of the rollouts after each block). `probe`: the MAP probe's
    P [n, 1, L] (start 'probe')."""
    _same_length(maps)
    L = maps[0].shape[-1]
    eye = torch.eye(L, dtype=maps[0].dtype)
    joint, steps = eye, []
    q = probe.mean(dim=0)[0] if probe is not None else None
    for p in maps:
        a = 0.5 * p.mean(dim=0) + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
        if keep_steps:
            steps.append(seen_from(joint, start, prefix, q))
    out = seen_from(joint, start, prefix, q)
    return (out, steps) if keep_steps else out


def relevancy(maps: list[torch.Tensor], grads: list[torch.Tensor], start: str, prefix: int,
              probe: torch.Tensor | None = None,
              probe_grad: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient-weighted relevancy (module docstring) -> [L]."""
    _same_length(maps)
    L = maps[0].shape[-1]
    relevance = torch.eye(L, dtype=maps[0].dtype)
    for p, g in zip(maps, grads):
        relevance = relevance + (g * p).clamp_min(0).mean(dim=0) @ relevance
    if start == "mean":
        relevance = relevance - torch.eye(L, dtype=relevance.dtype)
    q = None
    if probe is not None:
        q = ((probe_grad * probe).clamp_min(0).mean(dim=0)[0] if probe_grad is not None
             else probe.mean(dim=0)[0])
    return seen_from(relevance, start, prefix, q)


def to_grid(relevance: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[L] -> the patch part laid out as [gh, gw] (prefix tokens dropped)."""
    gh, gw = grid
    return relevance[relevance.shape[0] - gh * gw:].reshape(gh, gw)


def _same_length(maps: list[torch.Tensor]) -> None:
    if len({p.shape[-1] for p in maps}) > 1:
        raise ValueError("rollout and relevancy multiply the blocks' maps: all blocks must "
                         "have the same tokens (not with --patch-merge-layers)")
