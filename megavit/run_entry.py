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

import sys
import time
from typing import Any, Callable

from megavit.config import ParallelConfig
from megavit.errors import RunFailure, StoppedBySignal, UserError


def report_config_error(prog: str, error: Exception, launch: Any = None) -> int:
    """Print a configuration mistake found before the process group starts, once per node:
    every rank of a node finds the same one (paths are checked on each node's own file
    system, so another node may find another), so the node's first process prints it
    (`launch`: the LaunchInfo; None, e.g. the launch itself was wrong: print). Returns the
    exit status, 2."""
    if launch is None or launch.local_rank == 0:
        where = f" (rank {launch.rank})" if launch is not None and launch.rank else ""
        print(f"{prog}: error{where}: {error}", file=sys.stderr)
    return 2


def parse_and_validate(prog: str, parse: Callable[[Any], Any],
                       validate: Callable[..., None], argv: Any) -> tuple[Any, Any] | int:
    """(the validated config, the launch info) from `argv`, or the exit status to return:
    2 after printing a configuration or launch mistake once per node, 0 after --help."""
    from megavit.config import ConfigError
    from megavit.parallel.launcher import LaunchError, detect_launch

    info = None
    try:
        cfg = parse(argv)
        info = detect_launch()
        validate(cfg, world_size=info.world_size)
    except (ConfigError, LaunchError) as e:
        return report_config_error(prog, e, info)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    return cfg, info


def train_task_entry(prog: str, base: Any, info: Any, make_task: Callable[[], Any]) -> int:
    """An entry point after parsing: check the pipeline split and schedule of the run's
    Config `base` before any process group starts (exit 2 naming the problem), then
    `start_and_train` the task `make_task()` builds (`info`: the LaunchInfo)."""
    from megavit.config import ConfigError
    from megavit.training.loop import pretrain
    from megavit.training.run import check_schedule, pipeline_layout

    parallel = base.parallel
    try:
        dp = info.world_size // (parallel.tensor_model_parallel_size
                                 * parallel.pipeline_model_parallel_size)
        check_schedule(base, pipeline_layout(base), dp)
    except ConfigError as e:
        return report_config_error(prog, e, info)
    return start_and_train(prog, parallel, info.local_world_size,
                           lambda pstate, stop: pretrain(make_task(), pstate, stop),
                           base.checkpoint)


def start_and_train(prog: str, parallel: ParallelConfig, local_world_size: int,
                    train: Callable[[Any, Any], Any], checkpoint: Any) -> int:
    """Initialise the parallel state from `parallel` and the launcher's environment, run
    `train(pstate, stop)`, and return the exit status. `stop` (training/stopping.py) turns
    SIGTERM / SIGINT into a flag from here on, as the checkpoint flags (`checkpoint`:
    --exit-signal-handler, --exit-duration-in-mins, counted from this call) say."""
    import torch

    from megavit.parallel.state import init_parallel_state
    from megavit.training.stopping import StopRequests

    started = time.monotonic()

    p = parallel
    try:
        pstate = init_parallel_state(p.tensor_model_parallel_size, p.distributed_backend,
                                     p.device, p.distributed_timeout_minutes,
                                     p.pipeline_model_parallel_size)
    except (UserError, RuntimeError) as e:   # a bad launch environment, a failed rendezvous
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    stop = StopRequests(checkpoint, pstate, started)
    if pstate.device.type == "cpu" and local_world_size > 1:
        # Processes on one host share its cores; oversubscribed threads slow everything down.
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world_size))
    try:
        return _train(prog, pstate, stop, train)
    finally:
        stop.close()          # the process's own signal handlers again


def _train(prog: str, pstate: Any, stop: Any, train: Callable[[Any, Any], Any]) -> int:
    from megavit.parallel.state import destroy_parallel_state

    try:
        train(pstate, stop)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 2
    except RunFailure as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 1
    except StoppedBySignal as e:    # the log said where the checkpoint is
        destroy_parallel_state(pstate, barrier=False)
        return e.exit_status
    except KeyboardInterrupt:       # Ctrl-C twice
        print(f"{prog}: interrupted (no checkpoint saved by this interruption)",
              file=sys.stderr)
        destroy_parallel_state(pstate, barrier=False)
        return 130
    except BaseException:
        destroy_parallel_state(pstate, barrier=False)
        raise
    destroy_parallel_state(pstate)
    return 0
