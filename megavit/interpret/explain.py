"""One call from a model and an image to the maps a method gives (what
tools/attention_maps.py draws; also used to check that maps mean something).

    maps, titles, caption = explain(model, cfg, names, x, "relevancy", "mean")
"""

from __future__ import annotations

import torch
from torch import nn

from megavit.config import ModelConfig
from megavit.interpret.methods import head_maps, relevancy, rollout, seen_from, to_grid
from megavit.interpret.recording import record_attention

METHODS = ("heads", "rollout", "map-probe", "relevancy", "token-norms")


def explain(model: nn.Module, cfg: ModelConfig, class_names: list[str], x: torch.Tensor,
            method: str, start: str, layer: int | None = None, klass: int | None = None
            ) -> tuple[list[torch.Tensor], list[str], str]:
    """(maps [gh, gw], their titles, a caption) of `method` for one image x [1, c, H, W]
    through a whole serial classifier `model` (ValueError naming what does not apply)."""
    prefix = cfg.prefix_tokens
    grid = cfg.grid_at(cfg.num_layers)
    if method == "token-norms":       # the artefacts registers are for (Darcet et al.)
        layer = cfg.num_layers - 1 if layer is None else layer
        if not 0 <= layer < cfg.num_layers:
            raise ValueError(f"--layer {layer}: blocks 0..{cfg.num_layers - 1}")
        tokens = model.forward_intermediates(x, [layer])[0][0].norm(dim=0)
        return ([tokens], [f"block {layer} output norms"],
                f"patch-token norms: median {tokens.median():.1f}, max {tokens.max():.1f}"
                + (f", {cfg.num_registers} registers" if cfg.num_registers else ""))
    with torch.enable_grad(), record_attention(model) as rec:
        logits = model(x)
    probabilities = logits.detach().softmax(-1)[0]
    klass = int(probabilities.argmax()) if klass is None else klass
    if not 0 <= klass < logits.shape[-1]:
        raise ValueError(f"--class {klass}: the model has classes 0..{logits.shape[-1] - 1}")
    label = class_names[klass] if klass < len(class_names) else str(klass)
    caption = f"class {label} (p {float(probabilities[klass]):.3f}), seen from {start}"
    maps = rec.maps()
    blocks = [maps[k][0] for k in sorted(maps)]
    probe = rec.probe()
    probe = probe[0] if probe is not None else None
    q = probe.mean(dim=0)[0] if probe is not None else None
    if method == "map-probe":
        if probe is None:
            raise ValueError(f"the model pools with '{cfg.pooling}', not a MAP head")
        return [to_grid(q, grid)], ["MAP probe, mean of heads"], f"class {label}"
    if method == "heads":
        layer = cfg.num_layers - 1 if layer is None else layer
        if layer not in maps:
            raise ValueError(f"--layer {layer}: blocks 0..{cfg.num_layers - 1}")
        p = maps[layer][0]
        per_head = head_maps(p, start, prefix, q)
        layer_grid = cfg.grid_at(layer)
        return ([to_grid(h, layer_grid) for h in per_head]
                + [to_grid(seen_from(p.mean(0), start, prefix, q), layer_grid)],
                [f"block {layer} head {i}" for i in range(len(per_head))] + ["mean of heads"],
                caption)
    if method == "rollout":
        _, steps = rollout(blocks, start, prefix, probe, keep_steps=True)
        return ([to_grid(s, grid) for s in steps],
                [f"rollout to block {i}" for i in range(len(steps))], caption)
    if method != "relevancy":
        raise ValueError(f"method {method!r}: one of {', '.join(METHODS)}")
    logits[0, klass].backward()
    grads = rec.maps(grads=True)
    probe_grad = rec.probe(grads=True) if probe is not None else None
    r = relevancy(blocks, [grads[k][0] for k in sorted(grads)], start, prefix, probe,
                  probe_grad[0] if probe_grad is not None else None)
    return [to_grid(r, grid)], [f"relevancy of {label}"], caption
