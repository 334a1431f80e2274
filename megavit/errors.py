"""The two kinds of error megavit raises, and the exit status each means.

    UserError    exit status 2: a mistake in what the user gave — flags, data, tokenizer,
                 checkpoint, launch environment, a model that does not convert
    RunFailure   exit status 1: the run itself failed — a NaN/inf loss or gradient, a
                 collective whose peer died or hung

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
