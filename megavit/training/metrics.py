"""Log lines, JSON-lines metrics, TensorBoard and the progress bar — from one rank.

Every line starts with "[megavit]" and is a sequence of "key value" fields separated by
" | "; the keys are the same as in the --metrics-file JSON lines, so a line is easy to grep
and to parse:

    [megavit] iteration 100/2000 | loss 0.3456 | lr 9.80e-04 | grad_norm 0.843 | ...
    [megavit] eval iteration 500 | eval_loss 0.1234 | eval_accuracy 0.9712 | ...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megavit.config import ConfigError, LoggingConfig

PREFIX = "[megavit]"


_DECIMALS = {"images_per_second": 1, "pairs_per_second": 1, "step_time_ms": 1,
             "data_wait_ms": 1, "train_seconds": 1, "loss_scale": 0,
             "tflops_per_device": 3, "gpu_mem_gib": 2, "gpu_util_percent": 0, "gpu_power_w": 0}


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{value:.3e}"
        if key == "mfu":
            return f"{value * 100:.2f}%"
        return f"{value:.{_DECIMALS.get(key, 4)}f}"
    return str(value)


def format_fields(fields: dict[str, Any]) -> str:
    return " | ".join(f"{k} {_format_value(k, v)}" for k, v in fields.items())


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class GpuMonitor:
    """Memory, utilisation and power of this process's GPU via nvidia-ml-py; `read()`
    returns {} on a CPU or where NVML is unavailable."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 — no NVML, no GPU metrics; never fail training
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        out = {"gpu_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
        if self.handle is not None:
            try:
                out["gpu_util_percent"] = float(
                    self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
                out["gpu_power_w"] = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            except Exception:  # noqa: BLE001
                pass
        return out


class MetricsLogger:
    """Prints log lines on the main rank and mirrors them to --metrics-file / TensorBoard.
    On other ranks every method is a no-op."""

    def __init__(self, cfg: LoggingConfig, enabled: bool, total_iters: int) -> None:
        self.enabled = enabled
        self.total_iters = total_iters
        self.metrics = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if cfg.metrics_file:
            path = Path(cfg.metrics_file)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.metrics = open(path, "w", buffering=1)
            except OSError as e:
                raise ConfigError(f"--metrics-file {path}: cannot write ({e.strerror}: "
                                  f"{e.filename})") from None
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard-dir needs the tensorboard package: "
                                  "pip install 'megavit[tensorboard]'") from None
            try:
                self.tb = SummaryWriter(cfg.tensorboard_dir)
            except OSError as e:
                raise ConfigError(f"--tensorboard-dir {cfg.tensorboard_dir}: cannot write "
                                  f"({e.strerror}: {e.filename})") from None
        show_bar = cfg.progress_bar == "on" or (cfg.progress_bar == "auto" and sys.stderr.isatty())
        # without a bar: a progress line when nothing was printed for this long
        self.progress_every = (cfg.progress_interval_seconds
                               if cfg.progress_bar == "auto" and not show_bar else None)
        self.started = self.last_line = time.monotonic()
        self.first_iteration: int | None = None
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, desc="train", unit="it", file=sys.stderr,
                            dynamic_ncols=True)

    def info(self, message: str) -> None:
        if self.enabled:
            self._print(f"{PREFIX} {message}")

    def _print(self, line: str) -> None:
        self.last_line = time.monotonic()
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _record(self, kind: str, record: dict[str, Any], iteration: int) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps({"kind": kind, **record}) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self.tb.add_scalar(f"{kind}/{key}", value, iteration)

    def train(self, record: dict[str, Any]) -> None:
        """A training log line; `record` has at least iteration, loss, lr, grad_norm,
        images_per_second."""
        if not self.enabled:
            return
        it = record["iteration"]
        fields = {"iteration": f"{it}/{self.total_iters}",
                  **{k: v for k, v in record.items() if k != "iteration"}}
        self._print(f"{PREFIX} {format_fields(fields)}")
        self._record("train", record, it)

    def eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._print(f"{PREFIX} eval {format_fields(record)}")
        self._record("eval", record, record["iteration"])

    def progress(self, iteration: int, loss: float | None = None) -> None:
        """After iteration `iteration`: the bar, or (no terminal) a line such as
        "[megavit] progress | iteration 120/2400 | 5.0% | eta 0:01:40" when no line was
        printed for --progress-interval-seconds."""
        if self.bar is not None:
            self.bar.n = iteration
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.refresh()
            return
        if not self.enabled or self.progress_every is None:
            return
        if self.first_iteration is None:       # a resumed run starts past 0
            self.first_iteration, self.started = iteration - 1, time.monotonic()
        now = time.monotonic()
        if now - self.last_line < self.progress_every:
            return
        done = iteration - self.first_iteration
        eta = (now - self.started) / max(done, 1) * (self.total_iters - iteration)
        self._print(f"{PREFIX} progress | iteration {iteration}/{self.total_iters} | "
                    f"{100 * iteration / max(self.total_iters, 1):.1f}% | eta {format_eta(eta)}")

    def summary(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._print(f"{PREFIX} done | {format_fields(record)}")
        self._record("summary", record, record.get("iteration", 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()


class Stopwatch:
    """Wall time between log points, with the device synchronised."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed

    def total(self) -> float:
        return time.perf_counter() - self.start
