"""Where a trained ViT looks: attention maps of a checkpoint on one image, as a PNG.

    python tools/attention_maps.py runs/quickstart/ckpt --image digit.png \\
        --method relevancy --output relevancy.png
    python tools/attention_maps.py CKPT --image photo.jpg --method heads --layer 3 \\
        --output heads.png
    python tools/attention_maps.py CKPT --image photo.jpg --method rollout --output strip.png

Methods (megavit/interpret/methods.py has the formulas):
    heads       every head's map of block --layer (default: the last) and their mean
    rollout     attention rollout (Abnar & Zuidema 2020), a strip: after each block
    map-probe   the MAP head probe's attention: where ViT-22B-style pooling looks
    relevancy   gradient-weighted relevancy (Chefer et al. 2021) for --class (default:
                the predicted class)
    token-norms the norms of block --layer's output patch tokens (default: the last):
                high-norm outliers are the artefacts --num-registers is for
seen from --start: the class token ('cls'), the mean of the patch tokens ('mean') or the
MAP probe ('probe'); the default follows the model's pooling. The checkpoint (a classifier,
any saved layout) runs in one process with its attention computed eagerly so that the
probabilities exist (megavit/interpret/recording.py): same outputs as the fused kernels.
Each map is drawn over the image by the ViT authors' recipe (normalise, upsample, blur about
one patch). Exit status 2 with a message for a missing image, a checkpoint that is not a
classifier, or a method / start the model does not have.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megavit.errors import UserError
from megavit.interpret.explain import METHODS, explain
from megavit.interpret.methods import STARTS, default_start


class MapError(UserError, ValueError):
    """A request the checkpoint cannot answer; the message names the flag."""


def parser() -> argparse.ArgumentParser:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="a --save directory or iter_N/")
    p.add_argument("--image", required=True, metavar="FILE", help="the image to look at")
    p.add_argument("--method", choices=METHODS, default="relevancy", help="see above")
    p.add_argument("--layer", type=int, metavar="N",
                   help="heads, token-norms: the block (default: the last)")
    p.add_argument("--start", choices=STARTS,
                   help="the query the maps are seen from (default: by the pooling)")
    p.add_argument("--class", dest="klass", type=int, metavar="K",
                   help="relevancy: the class to explain (default: the predicted one)")
    p.add_argument("--output", required=True, metavar="OUT.png", help="the PNG to write")
    return p


def main(argv=None) -> int:
    from megavit.checkpointing.inference import load_for_inference
    from megavit.data.preprocessing import read_pixels
    from megavit.interpret.render import save_panels

    args = parser().parse_args(argv)
    try:
        if not Path(args.image).is_file():
            raise MapError(f"--image {args.image}: no such file")
        loaded = load_for_inference(Path(args.checkpoint))
        if loaded.kind != "classifier":
            raise MapError(f"{loaded.checkpoint}: a {loaded.kind} checkpoint; attention maps "
                           "are drawn for ViT classifiers (megavit.pretrain)")
        cfg, pre = loaded.model_config, loaded.preprocessing
        start = args.start or default_start(cfg.pooling)
        try:
            pixels = read_pixels(args.image, pre)
        except (OSError, ValueError) as e:
            raise MapError(f"--image {args.image}: cannot read it ({e})") from None
        x = pre.normalise(pixels[None])
        try:
            maps, titles, caption = explain(loaded.model, cfg, loaded.class_names, x,
                                            args.method, start, args.layer, args.klass)
        except ValueError as e:
            raise MapError(f"--method {args.method} --start {start}: {e}") from None
        image = pixels.permute(1, 2, 0).numpy() if pixels.shape[0] == 3 else pixels[0].numpy()
        patch = cfg.img_h / cfg.grid_at(cfg.num_layers)[0]
        columns = min(len(maps) + 1, 6)
        out = save_panels(args.output, image, maps, titles, patch, columns=columns,
                          suptitle=f"{args.method}: {caption}")
    except UserError as e:
        print(f"attention_maps: error: {e}", file=sys.stderr)
        return 2
    print(f"attention_maps | method {args.method} | start {start} | {caption} | output {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
