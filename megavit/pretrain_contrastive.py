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

from megavit.config import ConfigError
from megavit.contrastive_config import PROG, parse_contrastive_args, validate_contrastive


def main(argv: Sequence[str] | None = None) -> int:
    from megavit.parallel.launcher import LaunchError, detect_launch

    try:
        cfg = parse_contrastive_args(argv)
        info = detect_launch()
        validate_contrastive(cfg, world_size=info.world_size)
    except (ConfigError, LaunchError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    import torch

    from megavit.checkpointing.directory import CheckpointDirectoryError
    from megavit.checkpointing.model_state import CheckpointLoadError
    from megavit.checkpointing.safe_reader import UnsafeCheckpointError
    from megavit.data.datasets import DataError
    from megavit.data.tokenizer import TokenizerError
    from megavit.parallel.comm import CollectiveError
    from megavit.parallel.state import destroy_parallel_state, init_parallel_state
    from megavit.training.contrastive_trainer import pretrain_contrastive
    from megavit.training.step import NonFiniteError

    p = cfg.base.parallel
    try:
        pstate = init_parallel_state(p.tensor_model_parallel_size, p.distributed_backend,
                                     p.device, p.distributed_timeout_minutes,
                                     p.pipeline_model_parallel_size)
    except (LaunchError, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if pstate.device.type == "cpu" and info.local_world_size > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // info.local_world_size))
    try:
        pretrain_contrastive(cfg, pstate)
    except (ConfigError, DataError, TokenizerError, CheckpointLoadError, UnsafeCheckpointError,
            CheckpointDirectoryError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 2
    except (NonFiniteError, CollectiveError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 1
    except BaseException:
        destroy_parallel_state(pstate, barrier=False)
        raise
    destroy_parallel_state(pstate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
