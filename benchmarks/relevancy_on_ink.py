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
attention.
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


def ink_ratios(checkpoint: Path, count: int, dataset: str = "digits"
               ) -> tuple[dict[str, float], float]:
    """({method: mean ratio}, the mean ink share) over `count` held-out digits."""
    loaded = load_for_inference(checkpoint)
    cfg = loaded.model_config
    held = build_datasets(DataConfig(dataset=dataset, augment="none"), cfg, 0)[1]
    images = held.get(torch.arange(count))[0]
    p, start = cfg.patch_dim, default_start(cfg.pooling)
    sums: dict[str, float] = {"relevancy": 0.0, "rollout": 0.0, "gradient x input": 0.0}
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
        for method, m in pixels.items():
            m = m / m.sum().clamp_min(1e-12)
            sums[method] += m[ink].sum().item() / share
    return {k: v / count for k, v in sums.items()}, share_sum / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a digits classifier's --save directory or iter_N/")
    p.add_argument("--count", type=int, default=359, help="held-out digits (359: all)")
    p.add_argument("--dataset", choices=("digits", "mnist5k"), default="digits",
                   help="the digits the checkpoint was trained on (8x8 scikit-learn digits "
                        "or 28x28 MNIST-5k)")
    args = p.parse_args(argv)
    ratios, share = ink_ratios(Path(args.checkpoint), args.count, args.dataset)
    print(f"checkpoint {args.checkpoint} | {args.dataset} {args.count} | mean ink share "
          f"{share:.3f}")
    for method, ratio in ratios.items():
        print(f"  {method:<18} relevance on ink / ink share {ratio:.2f} "
              f"({'meets' if ratio >= 2 else 'misses'} the 2.0 sanity target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
