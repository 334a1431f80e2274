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
    exit status 143 / 130  SIGTERM / SIGINT stopped the run after a step (its checkpoint
                    saved when --save is set: resume with --load), or Ctrl-C aborted it
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable

from megavit.config import ParallelConfig
from megavit.errors import RunFailure, StoppedBySignal, UserError


def report_config_error(prog: str, error: Exception, rank: int | None) -> int:
    """Print a configuration mistake found before the process group starts — once: every
    rank finds the same one, so only global rank 0 (or a process whose rank is unknown)
    prints it. Returns the exit status, 2."""
    if not rank:
        print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def _stop_before_training(signum: int, frame) -> None:
    raise StoppedBySignal(f"stopped | {signal.Signals(signum).name} before training started "
                          "| nothing to save", signum, logged=False)


def start_and_train(prog: str, parallel: ParallelConfig, local_world_size: int,
                    train: Callable[[Any], Any], exit_signal_handler: bool = True) -> int:
    """Initialise the parallel state from `parallel` and the launcher's environment, run
    `train(pstate)`, and return the exit status. With `exit_signal_handler`, SIGTERM
    before the training loop starts ends the run with a message (the loop then handles
    signals itself, see training/stopping.py)."""
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
    if exit_signal_handler:     # until the loop takes over: SIGTERM ends the start-up
        signal.signal(signal.SIGTERM, _stop_before_training)
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
    except StoppedBySignal as e:    # the log said where the checkpoint is
        if not e.logged:
            print(f"{prog}: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return e.exit_status
    except KeyboardInterrupt:       # Ctrl-C before the loop, or twice
        print(f"{prog}: interrupted (no checkpoint saved by this interruption)",
              file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 130
    except BaseException:
        destroy_parallel_state(pstate, barrier=False)
        raise
    destroy_parallel_state(pstate)
    return 0
