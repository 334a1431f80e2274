"""Peak FLOP/s of one device, the denominator of the MFU estimate.

Known GPUs come from a table of dense datasheet figures for the training dtype; on a CPU
(or an unknown GPU) the peak is measured: the best of a few large square matmuls.
"""

from __future__ import annotations

import time

import torch

# Dense peak TFLOP/s by (substring of the device name, dtype).
_GPU_PEAKS: tuple[tuple[str, torch.dtype, float], ...] = (
    ("H200", torch.bfloat16, 989.0), ("H200", torch.float32, 494.7),  # fp32 via TF32
    ("H100", torch.bfloat16, 989.0), ("H100", torch.float32, 494.7),
    ("A100", torch.bfloat16, 312.0), ("A100", torch.float32, 156.0),
    ("L40S", torch.bfloat16, 362.0), ("L40S", torch.float32, 183.0),
)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                          n: int = 1024, repeats: int = 5) -> float:
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
                      override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, dt, tflops in _GPU_PEAKS:
            if key in name and dt == dtype:
                return tflops * 1e12, f"datasheet for {name}"
    flops = measured_matmul_flops(device, dtype)
    return flops, f"measured {str(dtype).replace('torch.', '')} 1024^3 matmul on {device.type}"
