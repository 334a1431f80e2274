"""Record the attention probabilities of a ViT's forward pass, whatever its layout.

    with record_attention(model) as rec:          # a VisionTransformer or a StageModel
        logits = model(images)
    maps = rec.maps(tp_group, pp_group)           # {block: [b, n, L, L]}, every head
    probe = rec.probe(tp_group, pp_group)         # [b, n, 1, L] with MAP pooling, else None

Inside the context every attention core of the model (and the MAP head's probe) runs
`models/attention.py: eager_attention`: the same function as the fused kernels with the
probabilities P made explicit over the real tokens (windows placed back on the grid; zero
where a rule forbids a pair). Each rank records its own heads (n/t under TP); `maps`
all-gathers them over the TP group, in head order, and with pipeline parallelism
broadcasts each stage's blocks to every stage, so every rank ends with all maps. With
gradients on, each P keeps its gradient after backward (`P.grad`), for gradient-weighted
methods. Under sequence parallelism the cores see the gathered sequence already, so the
maps are whole.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from megavit.parallel.comm import Group


def _parts(model: nn.Module) -> list[nn.Module]:
    return list(getattr(model, "chunks", [model]))


class Recording:
    """The probabilities recorded in a `record_attention` context (the last forward's)."""

    def __init__(self, model: nn.Module) -> None:
        self.cores = {int(name): block.attention for part in _parts(model)
                      for name, block in part.blocks.items()}
        self.heads = [part.map_head for part in _parts(model)
                      if getattr(part, "map_head", None) is not None]
        self.cfg = _parts(model)[0].cfg
        self.lists = {layer: [] for layer in self.cores}      # what the cores append to
        self.probe_lists = [[] for _ in self.heads]

    def start(self) -> None:
        for layer, core in self.cores.items():
            core.recorded = self.lists[layer]
        for head, kept in zip(self.heads, self.probe_lists):
            head.recorded = kept

    def stop(self) -> None:
        for core in [*self.cores.values(), *self.heads]:
            core.recorded = None

    def local(self) -> dict[int, torch.Tensor]:
        """{block: this rank's heads' P [b, n/t, L, L]} of the blocks held here."""
        return {layer: kept[-1] for layer, kept in sorted(self.lists.items()) if kept}

    def maps(self, tp: Group | None = None, pp: Group | None = None,
             grads: bool = False) -> dict[int, torch.Tensor]:
        """{block: P [b, n, L, L]} of every block (or their gradients, `grads`), heads
        gathered over `tp`, stages shared over `pp` (groups of size 1 or None: as held)."""
        local = {k: (p.grad if grads else p).detach() for k, p in self.local().items()}
        local = {k: _gather_heads(p, tp) for k, p in local.items()}
        if pp is None or pp.size == 1:
            return local
        return _share_stages(local, self.cfg, pp, tp)

    def probe(self, tp: Group | None = None, pp: Group | None = None,
              grads: bool = False) -> torch.Tensor | None:
        """The MAP probe's P [b, n, 1, L] over all L tokens (its gradient with `grads`;
        zeros at the registers, which pooling drops), None without MAP pooling; shared from
        the last stage."""
        held = [kept[-1] for kept in self.probe_lists if kept]
        p = _gather_heads((held[0].grad if grads else held[0]).detach(), tp) if held else None
        if p is not None and self.cfg.dropped_before_pooling:
            p = torch.cat([p.new_zeros(*p.shape[:3], self.cfg.dropped_before_pooling), p],
                          dim=3)
        if pp is None or pp.size == 1 or self.cfg.pooling != "map":
            return p
        n, L = self.cfg.num_attention_heads, self.cfg.seq_length
        batch = next(iter(self.local().values()), None)
        shape = (batch.shape[0] if batch is not None else 0, n, 1, L)
        out = p if p is not None else torch.empty(shape)
        pp.broadcast(out, src=pp.size - 1)
        return out


def _gather_heads(p: torch.Tensor, tp: Group | None) -> torch.Tensor:
    """[b, n/t, ...] on each TP rank -> [b, n, ...] (rank order = head order)."""
    if tp is None or tp.size == 1:
        return p
    return tp.all_gather(p.movedim(1, 0).contiguous()).movedim(0, 1).contiguous()


def _share_stages(local: dict[int, torch.Tensor], cfg, pp: Group,
                  tp: Group | None) -> dict[int, torch.Tensor]:
    """Every stage's maps on every stage: each block's map broadcast from its holder (the
    stages agree on who holds what by sharing their block lists first)."""
    held = torch.zeros(cfg.num_layers, dtype=torch.long)
    for layer in local:
        held[layer] = pp.rank + 1
    pp.all_reduce(held)
    sample = next(iter(local.values()))
    out = {}
    for layer in range(cfg.num_layers):
        if not held[layer]:
            continue
        L = cfg.at_layer(layer).seq_length
        buf = local.get(layer, torch.empty(sample.shape[0], cfg.num_attention_heads, L, L,
                                           dtype=sample.dtype))
        pp.broadcast(buf, src=int(held[layer]) - 1)
        out[layer] = buf
    return out


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[Recording]:
    """Inside: every attention core of `model` (a VisionTransformer, a StageModel of
    them) records its probabilities; outside, the fused paths are back."""
    recording = Recording(model)
    recording.start()
    try:
        yield recording
    finally:
        recording.stop()
