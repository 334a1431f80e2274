"""Stopping a run early without losing it: SIGTERM / SIGINT and a wall-clock budget.

A signal only sets a flag (`--exit-signal-handler`, on by default; the entry point installs
it as soon as the process group exists, so building the run and loading a checkpoint are
covered too). After resuming, and after each step, every rank tells the others what it has
seen — one all-reduce (MAX) of two numbers on the world group — so all ranks stop at the
same point, whichever of them was signalled (under torchrun all are; under Slurm or mpirun
perhaps only some). The loop then saves a checkpoint when --save is set and exits. A step is
never cut in half: the signal is acted on when the step in progress, and any evaluation or
save of that iteration, has finished. A signal during the final evaluation is ignored (the
last checkpoint exists).

    stop = StopRequests(cfg.checkpoint, pstate, started)
    ...after resuming and after each step...
    if (reason := stop.check()) is not None: save, log, stop

A second SIGINT more than 2 s after the first (a user pressing Ctrl-C again; torchrun's
forwarded copy of the first arrives sooner) raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import signal
import threading
import time

import torch

from megavit.parallel.state import ParallelState

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_ABORT_AFTER_S = 2.0


class StopRequests:
    """The signals this process received and the --exit-duration-in-mins budget; `check`
    agrees on them with every rank."""

    def __init__(self, checkpoint_cfg, pstate: ParallelState,
                 started: float | None = None) -> None:
        """`started`: time.monotonic() when the run began (the budget counts from there;
        default: now)."""
        self.pstate = pstate
        self.budget_s = (checkpoint_cfg.exit_duration_in_mins * 60
                         if checkpoint_cfg.exit_duration_in_mins else None)
        self.received: int | None = None       # the first signal this process saw
        self.received_at = 0.0
        self.stopped_by = 0                     # the signal every rank agreed to stop on
        self.started = time.monotonic() if started is None else started
        self._previous: dict[int, object] = {}
        # handlers can be installed from the main thread only (a harness thread keeps
        # the default behaviour)
        if checkpoint_cfg.exit_signal_handler and \
                threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    @property
    def active(self) -> bool:
        """Whether `check` has anything to agree on (else it costs nothing)."""
        return bool(self._previous) or self.budget_s is not None

    def _on_signal(self, signum: int, frame) -> None:
        now = time.monotonic()
        if (signum == signal.SIGINT and self.received is not None
                and now - self.received_at > _ABORT_AFTER_S):
            raise KeyboardInterrupt
        if self.received is None:
            self.received, self.received_at = signum, now

    def check(self, budget: bool = True) -> str | None:
        """On every rank: why the run stops now ("SIGTERM", "SIGINT", "--exit-duration-in-mins
        30 reached"), or None to go on. `budget` False: signals only (before the first
        step, so a run always makes a step of progress within its budget)."""
        if not self.active:
            return None
        over = (budget and self.budget_s is not None
                and time.monotonic() - self.started > self.budget_s)
        flags = torch.tensor([float(self.received or 0), float(over)],
                             device=self.pstate.device)
        signum, out_of_time = self.pstate.world.all_reduce(
            flags, op=torch.distributed.ReduceOp.MAX).tolist()
        if signum:
            self.stopped_by = int(signum)
            return signal.Signals(self.stopped_by).name
        if out_of_time:
            return f"--exit-duration-in-mins {self.budget_s / 60:g} reached"
        return None

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
