"""Entry point: `python -m megavit.segment [flags]` (or `megavit-segment`) — semantic
segmentation with a ViT, a feature pyramid and a per-pixel decoder.

One process:   python -m megavit.segment --preset vit-debug --dataset mnist-seg --img-h 64 ...
torchrun:      torchrun --nproc-per-node 4 -m megavit.segment --tensor-model-parallel-size 2 ...

It takes `megavit.pretrain`'s model, parallel, training, precision, data, logging and
checkpoint flags plus --neck, --neck-channels, --decoder-channels and --ignore-index.
`--help` lists every flag. Exit status 2 for a configuration or data mistake (one message
naming the flag), 1 for a NaN/inf or a failed collective, as `megavit.pretrain`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from megavit.config.segmentation import PROG, parse_segmentation_args, validate_segmentation


def main(argv: Sequence[str] | None = None) -> int:
    from megavit.run_entry import parse_and_validate

    parsed = parse_and_validate(PROG, parse_segmentation_args, validate_segmentation, argv)
    if isinstance(parsed, int):
        return parsed
    cfg, info = parsed

    from megavit.run_entry import train_task_entry
    from megavit.tasks.segmentation import SegmentationTask

    return train_task_entry(PROG, cfg.base, info, lambda: SegmentationTask(cfg))


if __name__ == "__main__":
    sys.exit(main())
