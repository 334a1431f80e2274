"""Session set-up shared by every test file."""

from __future__ import annotations

import pytest
import torch

# One intra-op thread in this process, as in every worker and entry point the tests start
# (OMP_NUM_THREADS=1): the models are tiny, so a second thread only adds synchronisation,
# and OpenMP threads that spin-wait slow down badly when the gloo workers, forked from this
# process, want both cores. It also keeps in-process results independent of the core count.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _prewarmed_imports():
    """Import the heavy modules most tests need (torch.distributed.checkpoint, scikit-learn,
    the training engine) once in this process, so the gloo workers of tests/harness.py and
    the entry points run by tests/cli.py, all forked from it, start with them loaded."""
    from tests.cli import prewarm

    prewarm()
