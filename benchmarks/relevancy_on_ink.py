"""Do the attention maps mean something? The share of relevance that falls on a digit's ink.

    python -m benchmarks.relevancy_on_ink runs/quickstart/ckpt      # after make quickstart
                                                                    # with --save there

For the first --count held-out digits of --dataset digits, each method's map for the
predicted class is spread over the pixels (each patch's value over its pixels, negatives
clipped, normalised to sum 1); "ink" is the pixels above the midpoint of the image's value
range. Printed per method: the relevance mass on ink divided by the ink's share of the
image (1.0: no preference for ink; the issue's sanity target: at least 2.0), and the mean
ink share. Methods: relevancy and rollout as tools/attention_maps.py draws them (seen from
the model's pooling query), and gradient x input on the pixels as a baseline that needs no
attention. With --occlusion, also the model's own evidence as a reference: each patch in
turn blanked (set to the image's background value), the drop of the predicted class's
logit as that patch's relevance — what a faithful patch-level map could at best show.

tests/test_interpret.py runs `ink_ratios` on a small MNIST-5k class-token model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megavit.checkpointing.inference import load_for_inference
from megavit.config import DataConfig
from megavit.data.datasets import build_datasets
from megavit.interpret.explain import explain
from megavit.interpret.methods import default_start


def ink_ratios(checkpoint: Path, count: int, dataset: str = "digits", occlusion: bool = False
               ) -> tuple[dict[str, float], float]:
    """({method: mean ratio}, the mean ink share) over `count` held-out digits."""
    loaded = load_for_inference(checkpoint)
    cfg = loaded.model_config
    held = build_datasets(DataConfig(dataset=dataset, augment="none"), cfg, 0)[1]
    images = held.get(torch.arange(count))[0]
    p, start = cfg.patch_dim, default_start(cfg.pooling)
    sums: dict[str, float] = {"relevancy": 0.0, "rollout": 0.0, "gradient x input": 0.0}
    if occlusion:
        sums["occlusion"] = 0.0
    share_sum = 0.0
    for x in images:
        ink = x[0] > (x[0].min() + x[0].max()) / 2
        share = ink.float().mean().item()
        share_sum += share
        pixels = {}
        for method in ("relevancy", "rollout"):
            maps = explain(loaded.model, cfg, [], x[None], method, start)[0]
            grid = maps[-1].detach().clamp_min(0)
            pixels[method] = grid.repeat_interleave(p, 0).repeat_interleave(p, 1)
        xx = x[None].clone().requires_grad_(True)
        logits = loaded.model(xx)
        logits[0, int(logits.argmax())].backward()
        pixels["gradient x input"] = (xx.grad * xx).detach()[0, 0].abs()
        if occlusion:
            pixels["occlusion"] = blanked_patch_drop(loaded.model, x, p, logits.detach()[0])
        for method, m in pixels.items():
            m = m / m.sum().clamp_min(1e-12)
            sums[method] += m[ink].sum().item() / share
    return {k: v / count for k, v in sums.items()}, share_sum / count


def blanked_patch_drop(model, x: torch.Tensor, p: int, logits: torch.Tensor) -> torch.Tensor:
    """[H, W]: per patch of x [c, H, W], how much the predicted class's logit drops when
    that patch alone is set to the image's background (minimum) value; negatives clipped."""
    _, H, W = x.shape
    gh, gw = H // p, W // p
    blanked = x.expand(gh * gw, *x.shape).clone()
    for k in range(gh * gw):
        i, j = divmod(k, gw)
        blanked[k, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = x.min()
    klass = int(logits.argmax())
    with torch.no_grad():
        drop = (logits[klass] - model(blanked)[:, klass]).clamp_min(0).reshape(gh, gw)
    return drop.repeat_interleave(p, 0).repeat_interleave(p, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a digits classifier's --save directory or iter_N/")
    p.add_argument("--count", type=int, default=359, help="held-out digits (359: all)")
    p.add_argument("--dataset", choices=("digits", "mnist5k"), default="digits",
                   help="the digits the checkpoint was trained on (8x8 scikit-learn digits "
                        "or 28x28 MNIST-5k)")
    p.add_argument("--occlusion", action="store_true",
                   help="also the blanked-patch reference (one forward per patch and image)")
    args = p.parse_args(argv)
    ratios, share = ink_ratios(Path(args.checkpoint), args.count, args.dataset, args.occlusion)
    print(f"checkpoint {args.checkpoint} | {args.dataset} {args.count} | mean ink share "
          f"{share:.3f}")
    for method, ratio in ratios.items():
        print(f"  {method:<18} relevance on ink / ink share {ratio:.2f} "
              f"({'meets' if ratio >= 2 else 'misses'} the 2.0 sanity target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
