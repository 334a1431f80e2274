"""Peak FLOP/s of one device (the denominator of the MFU estimate), and the TF32 switch.

Known GPUs come from a table of dense datasheet figures for the training dtype; on a CPU
(or an unknown GPU) the peak is measured: the best of a few large square matmuls.
"""

from __future__ import annotations

import time

import torch

# Dense datasheet peak TFLOP/s by substring of the device name: (bf16, tf32, plain fp32).
# The first match wins, so specific variants come before the family name.
_GPU_PEAKS: tuple[tuple[str, float, float, float], ...] = (
    ("H200", 989.0, 494.7, 66.9),
    ("H100 PCIe", 756.0, 378.0, 51.2),
    ("H100 NVL", 835.0, 417.5, 60.0),
    ("H100", 989.0, 494.7, 66.9),   # SXM
    ("A100", 312.0, 156.0, 19.5),
    ("L40S", 362.0, 183.0, 91.6),
)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                          n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` n x n x n matmuls on `device`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                      tf32: bool = True,
                      override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from). fp32 on a GPU counts the TF32 tensor-core
    peak when `tf32` is on (see configure_tf32), the plain fp32 peak otherwise."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf16, tf32_peak, fp32 in _GPU_PEAKS:
            if key in name:
                if dtype == torch.bfloat16:
                    return bf16 * 1e12, f"datasheet bf16 for {name}"
                if dtype == torch.float32:
                    kind = "tf32" if tf32 else "fp32"
                    return (tf32_peak if tf32 else fp32) * 1e12, f"datasheet {kind} for {name}"
    flops = measured_matmul_flops(device, dtype)
    return flops, f"measured {str(dtype).replace('torch.', '')} 1024^3 matmul on {device.type}"


def configure_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 tensor cores for fp32 matmuls and convolutions on CUDA.
    Only the CUDA flags are touched: `torch.set_float32_matmul_precision` would also let
    some CPUs compute fp32 matmuls in reduced precision."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def cpu_name() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it (else `platform.processor()`):
    what the benchmarks print beside their tables."""
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
