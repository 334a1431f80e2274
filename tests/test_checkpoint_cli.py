"""`--save`, `--load`, `--save-interval`, `--keep-last-checkpoints` through the entry point:
a run stopped after 3 iterations and resumed to 6 logs exactly the losses of an uninterrupted
6-iteration run, and ends with the same evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import cli

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "vit-debug", "--num-channels", "1", "--img-h", "16", "--img-w", "16",
          "--dataset", "digits", "--micro-batch-size", "8", "--global-batch-size", "16",
          "--lr-warmup-iters", "1", "--lr-decay-iters", "6", "--log-interval", "1",
          "--eval-iters", "2", "--progress-bar", "off"]


def start_pretrain(*args: str) -> cli.Started:
    """`python -m megavit.pretrain COMMON ARGS`, started (tests/cli.py)."""
    return cli.start([sys.executable, "-m", "megavit.pretrain", *COMMON, *args],
                     timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def pretrain(*args: str) -> subprocess.CompletedProcess:
    return start_pretrain(*args).wait()


def records(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    save = tmp_path / "ckpt"
    straight, first = cli.run_parallel(   # independent: side by side
        start_pretrain("--train-iters", "6", "--metrics-file", str(tmp_path / "s.jsonl")),
        start_pretrain("--train-iters", "3", "--save", str(save), "--save-interval", "1",
                       "--keep-last-checkpoints", "2",
                       "--metrics-file", str(tmp_path / "a.jsonl")))
    second = pretrain("--train-iters", "6", "--load", str(save), "--save", str(save),
                      "--keep-last-checkpoints", "2", "--metrics-file", str(tmp_path / "b.jsonl"))
    for proc in (straight, first, second):
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "saved checkpoint | iteration 3 | path" in first.stdout
    assert f"loaded checkpoint | iteration 3 | path {save / 'iter_0000003'}" in second.stdout
    assert sorted(p.name for p in save.iterdir()) == [
        "iter_0000003", "iter_0000006", "latest_checkpointed_iteration.txt"]
    expected = {r["iteration"]: r["loss"] for r in records(tmp_path / "s.jsonl", "train")}
    resumed = {r["iteration"]: r["loss"] for r in records(tmp_path / "a.jsonl", "train")
               + records(tmp_path / "b.jsonl", "train")}
    assert resumed == expected
    assert records(tmp_path / "b.jsonl", "eval")[-1] == records(tmp_path / "s.jsonl", "eval")[-1]
    # --eval-only reproduces the saving run's last eval line and writes no checkpoint
    before = sorted(p.name for p in save.rglob("*"))
    only = pretrain("--train-iters", "6", "--load", str(save), "--eval-only",
                    "--metrics-file", str(tmp_path / "e.jsonl"))
    assert only.returncode == 0, only.stdout + only.stderr
    assert records(tmp_path / "e.jsonl", "eval") == [records(tmp_path / "b.jsonl", "eval")[-1]]
    assert not records(tmp_path / "e.jsonl", "train")
    assert sorted(p.name for p in save.rglob("*")) == before


def test_checkpoint_flag_mistakes_exit_2(tmp_path):
    proc = pretrain("--train-iters", "1", "--save-interval", "5")
    assert proc.returncode == 2 and "--save-interval / --keep-last-checkpoints need --save DIR" \
        in proc.stderr
    proc = pretrain("--train-iters", "1", "--load", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    proc = pretrain("--eval-only", "--save", str(tmp_path / "s"))
    assert proc.returncode == 2 and "add --load" in proc.stderr and \
        "--save with --eval-only" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = pretrain("--eval-only", "--load", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "holds no checkpoint to evaluate" in proc.stderr, \
        proc.stdout + proc.stderr


def test_a_checkpoint_of_another_model_is_refused_naming_each_field(tmp_path):
    save = tmp_path / "ckpt"
    assert pretrain("--train-iters", "1", "--save", str(save)).returncode == 0
    config = json.loads((save / "iter_0000001" / "megavit_config.json").read_text())
    assert config["iteration"] == 1 and config["layout"]["tp"] == 1
    assert config["model"]["hidden_size"] == 32
    proc = pretrain("--train-iters", "2", "--load", str(save), "--hidden-size", "64",
                    "--num-layers", "3", "--hidden-dropout", "0.1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "a different model, not loaded" in proc.stderr
    assert "--hidden-size 32 in the checkpoint, 64 here" in proc.stderr
    assert "--num-layers 2 in the checkpoint, 3 here" in proc.stderr
    assert "dropout" not in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_inspect_reports_iteration_layout_and_tensors(tmp_path):
    save = tmp_path / "ckpt"
    assert pretrain("--train-iters", "2", "--save", str(save)).returncode == 0
    proc = cli.run([sys.executable, str(ROOT / "tools" / "checkpoint_inspect.py"),
                    str(save), "--tensors"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"checkpoint: {save / 'iter_0000002'}" in out and "iteration: 2" in out
    assert "saved at: tp 1 x pp 1 x dp 1" in out and "--hidden-size 32" in out
    assert "model/blocks.0.in_proj.weight/3" in out and "[128, 32]" in out
    assert "optimizer/exp_avg_sq" in out
    bad = cli.run([sys.executable, str(ROOT / "tools" / "checkpoint_inspect.py"),
                   str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "neither a checkpoint nor a --save directory" in bad.stderr


def _tampered(source: Path, target: Path, change) -> Path:
    """A copy of checkpoint `source` (iteration 1) whose tensors `change` edited in place."""
    import shutil

    import torch.distributed.checkpoint as dcp

    from megavit.checkpointing.offline import read_tensors
    from megavit.checkpointing.safe_reader import check_checkpoint

    tensors = read_tensors(source, check_checkpoint(source),
                           list(check_checkpoint(source).state_dict_metadata))
    change(tensors)
    final = target / source.name
    dcp.save(tensors, checkpoint_id=str(final), no_dist=True)
    shutil.copy(source / "megavit_config.json", final)
    (target / "latest_checkpointed_iteration.txt").write_text("1\n")
    return target


def test_missing_extra_or_reshaped_tensors_are_named_and_nothing_loads(tmp_path):
    import warnings

    import torch

    save = tmp_path / "ckpt"
    assert pretrain("--train-iters", "1", "--save", str(save)).returncode == 0
    source = save / "iter_0000001"
    cases = {
        "extra": (lambda t: t.update({"model/blocks.7.norm.weight": torch.ones(32)}),
                  "1 not in this model (model/blocks.7.norm.weight)"),
        "missing": (lambda t: t.pop("model/blocks.1.norm.weight"),
                    "1 missing (model/blocks.1.norm.weight)"),
        "reshaped": (lambda t: t.update({"model/map_head.probe": torch.ones(2, 32)}),
                     "1 shaped differently (model/map_head.probe [2, 32] (model: [32]))"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for case, (change, message) in cases.items():
            bad = _tampered(source, tmp_path / case, change)
            proc = pretrain("--train-iters", "2", "--load", str(bad))
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert "tensors do not fit this model, nothing was loaded" in proc.stderr, case
            assert message in proc.stderr, (case, proc.stderr)
            assert "Traceback" not in proc.stderr
