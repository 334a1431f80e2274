"""Entry point: `python -m megavit.distill [flags]` (or `megavit-distill`) — a student ViT
classifier trained on the labels and on a frozen teacher's logits.

One process:   python -m megavit.distill --teacher-checkpoint runs/teacher --dataset mnist5k ...
torchrun:      torchrun --nproc-per-node 4 -m megavit.distill --tensor-model-parallel-size 2 ...

It takes `megavit.pretrain`'s flags for the student plus --teacher-checkpoint and the
--distill-* flags (megavit/config/distillation.py). `--help` lists every flag. Exit status 2
for a configuration, data or checkpoint mistake (one message naming the flag or file), 1 for
a NaN/inf or a failed collective, as `megavit.pretrain`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from megavit.config.distillation import PROG, parse_distillation_args, validate_distillation


def main(argv: Sequence[str] | None = None) -> int:
    from megavit.run_entry import parse_and_validate

    parsed = parse_and_validate(PROG, parse_distillation_args, validate_distillation, argv)
    if isinstance(parsed, int):
        return parsed
    cfg, info = parsed

    from megavit.run_entry import train_task_entry
    from megavit.tasks.distillation.task import DistillationTask

    return train_task_entry(PROG, cfg.base, info, lambda: DistillationTask(cfg))


if __name__ == "__main__":
    sys.exit(main())
