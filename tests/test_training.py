"""Training pieces on one process: schedule, optimizer groups, clipping, logging."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megavit.config import TrainingConfig, preset_model_config
from megavit.models.vit import build_vit
from megavit.parallel.state import serial_state
from megavit.training.lr_schedule import LRSchedule
from megavit.training.metrics import GpuMonitor, MetricsLogger, format_fields
from megavit.config import ConfigError, LoggingConfig


def test_lr_warmup_then_cosine_to_min():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=14, style="cosine")
    assert [s.lr_at(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr_at(4) == pytest.approx(1.0)
    assert s.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr_at(14) == pytest.approx(0.1) and s.lr_at(100) == pytest.approx(0.1)


def test_lr_linear_and_constant():
    lin = LRSchedule(lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=10, style="linear")
    assert [lin.lr_at(i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = LRSchedule(lr=0.3, min_lr=0.0, warmup_iters=2, decay_iters=10, style="constant")
    assert [const.lr_at(i) for i in (0, 1, 2, 50)] == pytest.approx([0.15, 0.3, 0.3, 0.3])


def _serial_optimizer(cfg=None, training=None):
    from megavit.parallel.data_parallel import DataParallelBuffers
    from megavit.training.optimizer import MixedPrecisionOptimizer

    cfg = cfg or preset_model_config("vit-debug", num_classes=10, pooling="cls")
    pstate = serial_state()
    model = build_vit(cfg, pstate.tp, seed=0)
    buffers = DataParallelBuffers(list(model.named_parameters()), pstate.dp, pstate.tp,
                                  torch.float32, 10**9)
    return model, buffers, MixedPrecisionOptimizer(buffers, training or TrainingConfig(
        weight_decay=0.1), pstate, master_weights=False)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model, _, opt = _serial_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.adamw.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.adamw.param_groups[1]["params"]}
    assert opt.adamw.param_groups[0]["weight_decay"] == 0.1
    assert opt.adamw.param_groups[1]["weight_decay"] == 0
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2} - {"pos_embed.weight"}
    assert {"pos_embed.weight", "cls_token", "blocks.0.norm.weight",
            "blocks.0.attention.q_norm.weight", "head.bias"} <= plain


def test_clipping_by_the_global_norm_on_one_process():
    model, buffers, opt = _serial_optimizer(training=TrainingConfig(lr=0.0, weight_decay=0.0))
    buffers.start_step(1)
    model(torch.randn(4, 3, 16, 16)).square().sum().backward()
    buffers.finish()
    ref = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    expected = torch.sqrt(sum(g.double().pow(2).sum() for g in ref.values())).float()
    max_norm = expected.item() / 4                      # clipping is active
    outcome = opt.step(0.0, max_norm, None)
    assert outcome.grad_norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.main_grad, ref[n] * (max_norm / (expected + 1e-6)))
    assert not outcome.skipped


def test_metrics_file_and_log_line(tmp_path, capsys):
    path = tmp_path / "m" / "metrics.jsonl"
    log = MetricsLogger(LoggingConfig(metrics_file=str(path), progress_bar="off"), True, 10)
    log.train({"iteration": 5, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.25,
               "images_per_second": 1234.5, "mfu": 0.123})
    log.eval({"iteration": 5, "eval_loss": 0.4, "eval_accuracy": 0.9})
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("[megavit] iteration 5/10 | loss 0.5000 | lr 1.000e-03 | grad_norm 1.2500 "
                      "| images_per_second 1234.5 | mfu 12.30%")
    assert out[1] == "[megavit] eval iteration 5 | eval_loss 0.4000 | eval_accuracy 0.9000"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["kind"] == "train" and lines[0]["loss"] == 0.5 and lines[0]["iteration"] == 5
    assert lines[1] == {"kind": "eval", "iteration": 5, "eval_loss": 0.4, "eval_accuracy": 0.9}


def test_non_main_ranks_log_nothing(tmp_path, capsys):
    log = MetricsLogger(LoggingConfig(metrics_file=str(tmp_path / "x.jsonl")), False, 10)
    log.train({"iteration": 1, "loss": 1.0})
    log.info("hello")
    assert capsys.readouterr().out == "" and not (tmp_path / "x.jsonl").exists()


def test_gpu_metrics_absent_on_cpu():
    assert GpuMonitor(torch.device("cpu")).read() == {}


def test_format_fields_stable():
    assert format_fields({"a": 1, "lr": 0.5, "loss": 0.123456, "images_per_second": 12.34,
                          "s": "ok"}) == "a 1 | lr 5.000e-01 | loss 0.1235 | images_per_second 12.3 | s ok"
    assert not math.isnan(0.0)


def test_tensorboard_scalars_written(tmp_path):
    log = MetricsLogger(LoggingConfig(tensorboard_dir=str(tmp_path / "tb"), progress_bar="off"),
                        True, 10)
    log.train({"iteration": 1, "loss": 1.5, "lr": 0.1})
    log.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [1.5]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="--tensorboard-dir needs the tensorboard package"):
        MetricsLogger(LoggingConfig(tensorboard_dir=str(tmp_path)), True, 10)


def test_progress_bar_on_goes_to_stderr(capsys):
    log = MetricsLogger(LoggingConfig(progress_bar="on"), True, 4)
    for i in range(1, 5):
        log.progress(i)
    log.summary({"iteration": 4, "loss": 0.1})
    captured = capsys.readouterr()
    assert "4/4" in captured.err
    assert captured.out.strip() == "[megavit] done | iteration 4 | loss 0.1000"


def test_tf32_switch_and_the_peak_it_implies(monkeypatch):
    from megavit.training.peak_flops import configure_tf32, device_peak_flops

    configure_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    configure_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert device_peak_flops(cuda, torch.float32, tf32=True)[0] == pytest.approx(494.7e12)
    assert device_peak_flops(cuda, torch.float32, tf32=False)[0] == pytest.approx(66.9e12)
    assert device_peak_flops(cuda, torch.bfloat16)[0] == pytest.approx(989.0e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 PCIe")
    assert device_peak_flops(cuda, torch.bfloat16)[0] == pytest.approx(756.0e12)
    assert device_peak_flops(torch.device("cpu"), override_tflops=2.0) == (2e12, "--peak-tflops")
    cpu_peak, source = device_peak_flops(torch.device("cpu"))
    assert cpu_peak > 1e9 and source.startswith("measured float32")
