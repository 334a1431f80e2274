"""What both entry points (`megavit.pretrain`, `megavit.pretrain_contrastive`) do once the
configuration is valid: start the process group, run the training, map failures to exit
statuses and close the group.

    exit status 0   done
    exit status 2   a user mistake found while starting or training (`UserError`): a
                    configuration, data, tokenizer or checkpoint problem (one message naming
                    the flag or file)
    exit status 1   the run failed (`RunFailure`): a NaN/inf (with the NaN check on) or a
                    failed collective (a peer died or hung past
                    --distributed-timeout-minutes; the message names the group)
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from megavit.config import ParallelConfig
from megavit.errors import RunFailure, UserError


def start_and_train(prog: str, parallel: ParallelConfig, local_world_size: int,
                    train: Callable[[Any], Any]) -> int:
    """Initialise the parallel state from `parallel` and the launcher's environment, run
    `train(pstate)`, and return the exit status."""
    import torch

    from megavit.parallel.state import destroy_parallel_state, init_parallel_state

    p = parallel
    try:
        pstate = init_parallel_state(p.tensor_model_parallel_size, p.distributed_backend,
                                     p.device, p.distributed_timeout_minutes,
                                     p.pipeline_model_parallel_size)
    except (UserError, RuntimeError) as e:   # a bad launch environment, a failed rendezvous
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if pstate.device.type == "cpu" and local_world_size > 1:
        # Processes on one host share its cores; oversubscribed threads slow everything down.
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world_size))
    try:
        train(pstate)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 2
    except RunFailure as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 1
    except BaseException:
        destroy_parallel_state(pstate, barrier=False)
        raise
    destroy_parallel_state(pstate)
    return 0
