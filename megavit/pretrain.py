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

from megavit.config import ConfigError, parse_args, validate


def main(argv: Sequence[str] | None = None) -> int:
    prog = "python -m megavit.pretrain"
    from megavit.parallel.launcher import LaunchError, detect_launch

    try:
        cfg = parse_args(argv)
        info = detect_launch()
        validate(cfg, world_size=info.world_size)
        if cfg.model.num_classes == 0:
            raise ConfigError("--num-classes 0 builds a feature extractor; pretraining needs a "
                              "classifier (leave --num-classes unset to use the dataset's)")
    except (ConfigError, LaunchError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    import torch

    from megavit.data.datasets import DataError
    from megavit.parallel.state import destroy_parallel_state, init_parallel_state
    from megavit.training.trainer import pretrain

    from megavit.training.trainer import check_schedule, pipeline_layout

    p = cfg.parallel
    try:   # the pipeline split and schedule, before any process group starts
        dp = info.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
        check_schedule(cfg, pipeline_layout(cfg), dp)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        pstate = init_parallel_state(p.tensor_model_parallel_size, p.distributed_backend,
                                     p.device, p.distributed_timeout_minutes,
                                     p.pipeline_model_parallel_size)
    except (LaunchError, RuntimeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if pstate.device.type == "cpu" and info.local_world_size > 1:
        # Processes on one host share its cores; oversubscribed threads slow everything down.
        torch.set_num_threads(max(1, torch.get_num_threads() // info.local_world_size))
    from megavit.checkpointing.directory import CheckpointDirectoryError
    from megavit.checkpointing.model_state import CheckpointLoadError
    from megavit.checkpointing.safe_reader import UnsafeCheckpointError
    from megavit.parallel.comm import CollectiveError
    from megavit.training.step import NonFiniteError

    try:
        pretrain(cfg, pstate)
    except (ConfigError, DataError, CheckpointLoadError, UnsafeCheckpointError,
            CheckpointDirectoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 2
    except (NonFiniteError, CollectiveError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 1
    except BaseException:
        destroy_parallel_state(pstate, barrier=False)
        raise
    destroy_parallel_state(pstate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
