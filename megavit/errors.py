"""The two kinds of error megavit raises, and the exit status each means.

    UserError    exit status 2: a mistake in what the user gave — flags, data, tokenizer,
                 checkpoint, launch environment, a model that does not convert
    RunFailure   exit status 1: the run itself failed — a NaN/inf loss or gradient, a
                 collective whose peer died or hung
    StoppedBySignal  exit status 128 + signal: SIGTERM / SIGINT stopped the run after a
                 step, its checkpoint saved (not an error: the run can resume)

Every error class of the package subclasses one of them and keeps its older base too
(`ConfigError(UserError, ValueError)`, `CollectiveError(RunFailure, RuntimeError)`), so
code that catches ValueError or RuntimeError still catches it. The entry points map the two
to their exit statuses (`megavit/run_entry.py`). This module imports nothing.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's flags, data, tokenizer or checkpoint (exit status 2); the
    message names the flag or file and the fix."""


class RunFailure(Exception):
    """The run failed while training: a NaN/inf, a failed collective (exit status 1); the
    message names the iteration, rank or group."""


class StoppedBySignal(Exception):
    """The run stopped early on SIGTERM / SIGINT after a consistent step (and a checkpoint
    when --save is set); the training log said where. Exit status 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT), as a shell reports a signalled process."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signal_number
