"""Entry point: `python -m megavit.pretrain [flags]` (or `megavit-pretrain`).

One process:   python -m megavit.pretrain --preset vit-s --dataset digits ...
torchrun:      torchrun --nproc-per-node 4 -m megavit.pretrain --tensor-model-parallel-size 2 ...
mpirun/srun:   mpirun -n 4 python -m megavit.pretrain ...   (no MASTER_ADDR needed)

`--help` lists every flag. A configuration mistake prints one message naming the flag and
the fix, and exits with status 2 (no traceback). A NaN/inf (with the NaN check on) or a
failed collective (a peer died or hung past --distributed-timeout-minutes; the message names
the group and its ranks) exits with status 1.
"""

from __future__ import annotations

import sys
from typing import Sequence

from megavit.config import Config, ConfigError, parse_args, validate


def validate_classification(cfg: Config, world_size: int) -> None:
    """`validate`, and what a classifier needs of the data and the head."""
    validate(cfg, world_size=world_size)
    if cfg.data.dataset == "mnist-seg":
        raise ConfigError("--dataset mnist-seg has a label per pixel, not per image: train "
                          "it with python -m megavit.segment")
    if cfg.model.feature_layers:
        raise ConfigError(f"--feature-layers {cfg.model.feature_layers}: a classifier reads "
                          "the last block only; feature layers feed a dense head (python -m "
                          "megavit.segment --neck fpn)")
    if cfg.model.num_classes == 0:
        raise ConfigError("--num-classes 0 builds a feature extractor; pretraining needs a "
                          "classifier (leave --num-classes unset to use the dataset's)")


def main(argv: Sequence[str] | None = None) -> int:
    from megavit.run_entry import parse_and_validate

    prog = "python -m megavit.pretrain"
    parsed = parse_and_validate(prog, parse_args, validate_classification, argv)
    if isinstance(parsed, int):
        return parsed
    cfg, info = parsed

    from megavit.run_entry import train_task_entry
    from megavit.tasks.classification import ClassificationTask

    return train_task_entry(prog, cfg, info, lambda: ClassificationTask(cfg))


if __name__ == "__main__":
    sys.exit(main())
