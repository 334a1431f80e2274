"""What the planner knows about a GPU: a JSON file per device.

    spec = load_gpu("h100-sxm")              # one of the files in megavit/planner/gpus/
    spec = load_gpu("my_cluster.json")       # or a user's own file, same fields
    spec.peak_flops("bf16")                  # dense FLOP/s
    gpu_names()                              # the packaged names

Fields (every one required; bandwidths in GB/s = 1e9 bytes/s, each way, per GPU):

    name                       how tables name the device
    description                free text: the system it assumes (GPUs a node, links)
    peak_tflops                {"bf16": ..., "fp16": ..., "tf32": ..., "fp32": ...} dense
    memory_bytes               usable device memory (what the allocator can get)
    memory_bandwidth_gbps      HBM bandwidth
    intra_node_bandwidth_gbps  NVLink (or the node's fabric) per GPU, each way
    inter_node_bandwidth_gbps  the network per GPU, each way
    intra_node_latency_us      the alpha of a message inside a node
    inter_node_latency_us      the alpha of a message between nodes
    sources                    where the figures come from
    efficiency                 optional: the step-time model's fitted constants
                               {"gemm_max", "gemm_half", "elementwise", "fitted_on"}
                               (default: `Efficiency()`'s, unfitted)

A file that is missing, not JSON, or lacks / mistypes a field is a `GpuSpecError` naming the
file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megavit.errors import UserError

GPU_DIR = Path(__file__).with_name("gpus")
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")
_NUMBERS = ("memory_bytes", "memory_bandwidth_gbps", "intra_node_bandwidth_gbps",
            "inter_node_bandwidth_gbps", "intra_node_latency_us", "inter_node_latency_us")


class GpuSpecError(UserError):
    """A GPU spec that cannot be read or lacks a field."""


@dataclass(frozen=True)
class Efficiency:
    """The step-time model's fitted constants (megavit/planner/step_time.py)."""

    gemm_max: float = 0.80        # the fraction of peak the largest GEMMs reach
    gemm_half: float = 96.0       # the smallest GEMM dimension at half of that
    elementwise: float = 16.0     # bytes per [token, width] element per block forward


@dataclass(frozen=True)
class GpuSpec:
    name: str
    description: str
    peak_tflops: dict[str, float]
    memory_bytes: float
    memory_bandwidth_gbps: float
    intra_node_bandwidth_gbps: float
    inter_node_bandwidth_gbps: float
    intra_node_latency_us: float
    inter_node_latency_us: float
    sources: str
    efficiency: Efficiency | None = None
    efficiency_note: str = "not fitted: default constants"

    def peak_flops(self, precision: str) -> float:
        """Dense FLOP/s at `precision` (one of PRECISIONS)."""
        return self.peak_tflops[precision] * 1e12

    @property
    def memory_bandwidth(self) -> float:
        return self.memory_bandwidth_gbps * 1e9

    def link(self, inter_node: bool) -> tuple[float, float]:
        """(alpha seconds, beta seconds per byte) of a message on the node's fabric or the
        network."""
        if inter_node:
            return self.inter_node_latency_us * 1e-6, 1 / (self.inter_node_bandwidth_gbps * 1e9)
        return self.intra_node_latency_us * 1e-6, 1 / (self.intra_node_bandwidth_gbps * 1e9)


def gpu_names() -> list[str]:
    """The packaged GPU specs' names."""
    return sorted(p.stem for p in GPU_DIR.glob("*.json"))


def load_gpu(name_or_path: str) -> GpuSpec:
    """A packaged spec by name, or a JSON file by path (a name ending in .json or an
    existing file)."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".json") or path.is_file()):
        if name_or_path not in gpu_names():
            raise GpuSpecError(f"--gpu {name_or_path}: not a packaged GPU ({', '.join(gpu_names())}) "
                               "and not a JSON file")
        path = GPU_DIR / f"{name_or_path}.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise GpuSpecError(f"--gpu {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise GpuSpecError(f"--gpu {path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise GpuSpecError(f"--gpu {path}: expected a JSON object of fields")
    return _spec(raw, path)


def _spec(raw: dict, path: Path) -> GpuSpec:
    def number(key: str) -> float:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise GpuSpecError(f"{path}: field '{key}' must be a positive number (got "
                               f"{value!r})")
        return float(value)

    for key in ("name", "description", "sources"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise GpuSpecError(f"{path}: field '{key}' must be a non-empty string")
    peaks = raw.get("peak_tflops")
    if not isinstance(peaks, dict) or any(p not in peaks for p in PRECISIONS):
        raise GpuSpecError(f"{path}: field 'peak_tflops' must give {', '.join(PRECISIONS)} "
                           "(dense TFLOP/s)")
    tflops = {}
    for p in PRECISIONS:
        value = peaks[p]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise GpuSpecError(f"{path}: field 'peak_tflops.{p}' must be a positive number "
                               f"(got {value!r})")
        tflops[p] = float(value)
    eff, note = None, "not fitted: default constants"
    if "efficiency" in raw:
        e = raw["efficiency"]
        keys = ("gemm_max", "gemm_half", "elementwise")
        if not isinstance(e, dict) or any(
                isinstance(e.get(k), bool) or not isinstance(e.get(k), (int, float))
                or e[k] < 0 for k in keys) or not 0 < e["gemm_max"] <= 1:
            raise GpuSpecError(f"{path}: field 'efficiency' must give gemm_max (0..1], "
                               "gemm_half and elementwise (numbers >= 0)")
        eff = Efficiency(*(float(e[k]) for k in keys))
        note = str(e.get("fitted_on", "fitted (no note)"))
    return GpuSpec(raw["name"], raw["description"], tflops,
                   **{k: number(k) for k in _NUMBERS}, sources=raw["sources"],
                   efficiency=eff, efficiency_note=note)
