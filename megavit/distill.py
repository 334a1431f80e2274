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
    from megavit.run_entry import parse_and_validate, report_config_error

    parsed = parse_and_validate(PROG, parse_distillation_args, validate_distillation, argv)
    if isinstance(parsed, int):
        return parsed
    cfg, info = parsed

    from megavit.config import ConfigError
    from megavit.run_entry import start_and_train
    from megavit.tasks.distillation.task import DistillationTask
    from megavit.training.loop import pretrain
    from megavit.training.run import check_schedule, pipeline_layout

    parallel = cfg.base.parallel
    try:   # the pipeline split and schedule, before any process group starts
        dp = info.world_size // (parallel.tensor_model_parallel_size
                                 * parallel.pipeline_model_parallel_size)
        check_schedule(cfg.base, pipeline_layout(cfg.base), dp)
    except ConfigError as e:
        return report_config_error(PROG, e, info)
    return start_and_train(PROG, parallel, info.local_world_size,
                           lambda pstate, stop: pretrain(DistillationTask(cfg), pstate, stop),
                           cfg.base.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
