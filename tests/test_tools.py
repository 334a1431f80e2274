"""User-facing tools."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "model_summary.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_model_summary_vit22b_tp8():
    proc = _run("--preset", "vit-22b", "--tensor-model-parallel-size", "8")
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.splitlines()[-1]
    total, per_rank = [float(x.replace(",", "")) for x in re.findall(r"([\d,]+\.\d) M", row)]
    assert 22_000 < total < 22_400               # 21.74 B in the blocks + MAP head, embeddings
    assert total / 8 < per_rank < total / 8 * 1.01   # replicated norms/embeddings are small


def test_model_summary_lists_every_preset_and_refuses_bad_tp():
    proc = _run()
    assert proc.returncode == 0 and proc.stdout.count("| vit-") == 10
    bad = _run("--preset", "vit-b", "--tensor-model-parallel-size", "5")
    assert bad.returncode == 2 and "does not divide --num-attention-heads 12" in bad.stderr
