"""What a user watches: tools/plot_metrics.py draws the curves a run logged (matplotlib),
for one run or several; without a terminal, progress lines with an ETA; MFU never above
100 % when the peak was measured."""

from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

from megavit.parallel.state import serial_state
from megavit.tasks.classification import ClassificationTask
from megavit.training.loop import pretrain
from tests.scenarios import debug_config
from tests.test_bad_inputs import tool


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    """Two real --metrics-file files: 12 iterations of vit-debug at two learning rates."""
    root = tmp_path_factory.mktemp("metrics")
    paths = []
    for lr in (5e-3, 1e-3):
        cfg = debug_config(train_iters=12, lr=lr)
        path = root / f"lr{lr}.jsonl"
        cfg.logging = dataclasses.replace(cfg.logging, log_interval=2, eval_interval=6,
                                          eval_iters=2, metrics_file=str(path),
                                          progress_bar="off", peak_tflops=1.0)
        pretrain(ClassificationTask(cfg), serial_state())
        paths.append(path)
    return paths


def test_one_and_several_runs_are_drawn(metrics, tmp_path, capsys):
    plot = tool("plot_metrics")
    out = tmp_path / "curves.png"
    assert plot.main([str(metrics[0]), "--output", str(out)]) == 0
    line = capsys.readouterr().out
    for panel in ("loss", "learning rate", "gradient norm", "throughput per second", "MFU",
                  "accuracy (held-out)"):
        assert panel in line
    with Image.open(out) as image:
        assert image.size[0] > 1000 and image.size[1] > 500
        assert len(image.convert("L").getcolors(maxcolors=2**16)) > 20   # drawn, not blank
    assert plot.main([*map(str, metrics), "--labels", "5e-3", "1e-3", "--output",
                      str(tmp_path / "cmp.png")]) == 0
    assert "2 runs" in capsys.readouterr().out and (tmp_path / "cmp.png").is_file()


def test_bad_files_exit_2_naming_the_file_and_line(metrics, tmp_path, capsys):
    plot = tool("plot_metrics")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(metrics[0].read_text().splitlines()[0] + "\n{not json\n")
    assert plot.main([str(bad), "--output", str(tmp_path / "x.png")]) == 2
    assert f"{bad}:2: not a JSON line" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"hello": 1}) + "\n")
    assert plot.main([str(other), "--output", str(tmp_path / "x.png")]) == 2
    assert "not a megavit metrics record" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_progress_lines_without_a_terminal(capsys):
    from megavit.config import LoggingConfig
    from megavit.training.metrics import MetricsLogger

    log = MetricsLogger(LoggingConfig(progress_bar="auto", progress_interval_seconds=1e-9),
                        enabled=True, total_iters=40)
    log.progress(11)
    log.progress(12)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("[megavit] progress | iteration 12/40 | 30.0% | eta ")
    quiet = MetricsLogger(LoggingConfig(progress_bar="off", progress_interval_seconds=1e-9),
                          enabled=True, total_iters=40)
    quiet.progress(12)
    assert capsys.readouterr().out == ""


def test_mfu_stays_at_most_100_percent_with_a_measured_peak(monkeypatch):
    import megavit.training.loop as loop

    monkeypatch.setattr(loop, "device_peak_flops",
                        lambda *a, **k: (1.0, "measured float32 1024^3 matmul on cpu"))
    records = []
    cfg = debug_config(train_iters=3)
    cfg.logging = dataclasses.replace(cfg.logging, log_interval=1, progress_bar="off",
                                      eval_iters=1)
    task = ClassificationTask(cfg)
    monkeypatch.setattr(loop.MetricsLogger, "train", lambda self, r: records.append(r))
    pretrain(task, serial_state())
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(0 < r["mfu"] <= 1.0 for r in records), [r["mfu"] for r in records]
