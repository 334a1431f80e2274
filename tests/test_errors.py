"""Every error megavit raises is a UserError (exit status 2) or a RunFailure (exit status 1)
and still the ValueError / RuntimeError it was before."""

from __future__ import annotations

import pytest

from megavit.checkpointing.offline import ConvertError
from megavit.checkpointing.directory import CheckpointDirectoryError
from megavit.checkpointing.errors import CheckpointLoadError
from megavit.checkpointing.safe_reader import UnsafeCheckpointError
from megavit.config import ConfigError
from megavit.data.datasets import DataError
from megavit.data.tokenizer import TokenizerError
from megavit.errors import RunFailure, UserError
from megavit.parallel.comm import CollectiveError
from megavit.parallel.launcher import LaunchError
from megavit.parallel.pipeline_layout import PipelineLayoutError
from megavit.parallel.schedules import ScheduleError
from megavit.training.step import NonFiniteError


@pytest.mark.parametrize("error,kind,old_base", [
    (ConfigError, UserError, ValueError), (TokenizerError, UserError, ValueError),
    (PipelineLayoutError, UserError, ValueError), (ScheduleError, UserError, ValueError),
    (DataError, UserError, RuntimeError), (CheckpointLoadError, UserError, RuntimeError),
    (UnsafeCheckpointError, UserError, RuntimeError),
    (CheckpointDirectoryError, UserError, RuntimeError), (LaunchError, UserError, RuntimeError),
    (ConvertError, UserError, RuntimeError), (NonFiniteError, RunFailure, RuntimeError),
    (CollectiveError, RunFailure, RuntimeError),
])
def test_every_error_is_a_user_error_or_a_run_failure_and_keeps_its_base(error, kind,
                                                                           old_base):
    assert issubclass(error, kind) and issubclass(error, old_base)
    assert not issubclass(error, UserError if kind is RunFailure else RunFailure)
