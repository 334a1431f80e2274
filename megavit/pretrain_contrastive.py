"""Entry point: `python -m megavit.pretrain_contrastive [flags]` — CLIP, SigLIP or LiT.

One process:   python -m megavit.pretrain_contrastive --preset vit-debug --text-preset text-debug
torchrun:      torchrun --nproc-per-node 4 -m megavit.pretrain_contrastive \\
                   --tensor-model-parallel-size 2 --loss siglip ...
LiT:           ... --lock-image-tower --image-checkpoint runs/quickstart/ckpt

The image tower takes `megavit.pretrain`'s model flags (and presets), the text tower the
--text-* flags (and --text-preset). `--help` lists every flag. Exit status 2 for a
configuration or data mistake (one message naming the flag), 1 for a NaN/inf or a failed
collective, as `megavit.pretrain`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from megavit.config import parse_contrastive_args, validate_contrastive
from megavit.config.contrastive import PROG


def main(argv: Sequence[str] | None = None) -> int:
    from megavit.run_entry import parse_and_validate

    parsed = parse_and_validate(PROG, parse_contrastive_args, validate_contrastive, argv)
    if isinstance(parsed, int):
        return parsed
    cfg, info = parsed

    from megavit.run_entry import start_and_train
    from megavit.tasks.image_text.task import ImageTextTask
    from megavit.training.loop import pretrain

    return start_and_train(PROG, cfg.base.parallel, info.local_world_size,
                           lambda pstate, stop: pretrain(ImageTextTask(cfg), pstate, stop),
                           cfg.base.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
