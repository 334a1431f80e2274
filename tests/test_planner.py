"""The layout planner's inputs and counts (megavit/planner/).

GPU specs: the packaged files load, a user's own JSON file is read the same way, and a
file that is missing, not JSON or lacks a field is named with the field. The counts are
checked against real runs where the runs are: held parameters and bytes per parameter in
tests/test_tensor_parallel.py (every layout), each pipeline stage's activation peak in
tests/test_pipeline_memory.py.
"""

from __future__ import annotations

import json

import pytest

from megavit.planner.hardware import GPU_DIR, GpuSpecError, gpu_names, load_gpu


def test_the_packaged_gpus_load_with_their_datasheet_peaks():
    assert {"a100-80gb", "h100-sxm", "h200"} <= set(gpu_names())
    for name in gpu_names():
        spec = load_gpu(name)
        assert spec.name == name and spec.memory_bytes > 0
    assert load_gpu("a100-80gb").peak_flops("bf16") == 312e12
    assert load_gpu("h100-sxm").peak_flops("bf16") == pytest.approx(989.4e12)
    alpha, beta = load_gpu("h100-sxm").link(inter_node=True)
    assert alpha == pytest.approx(10e-6) and beta == pytest.approx(1 / 50e9)


def test_a_users_gpu_file_is_read_and_its_mistakes_are_named(tmp_path):
    raw = json.loads((GPU_DIR / "h100-sxm.json").read_text())
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({**raw, "name": "mine", "memory_bytes": 2**30}))
    assert load_gpu(str(mine)).memory_bytes == 2**30
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in raw.items() if k != "inter_node_latency_us"}))
    with pytest.raises(GpuSpecError, match="bad.json: field 'inter_node_latency_us' must be"):
        load_gpu(str(bad))
    bad.write_text(json.dumps({**raw, "peak_tflops": {"bf16": 1.0}}))
    with pytest.raises(GpuSpecError, match="'peak_tflops' must give bf16, fp16, tf32, fp32"):
        load_gpu(str(bad))
    bad.write_text("{not json")
    with pytest.raises(GpuSpecError, match="not a readable JSON file"):
        load_gpu(str(bad))
    with pytest.raises(GpuSpecError, match="no such file"):
        load_gpu(str(tmp_path / "none.json"))
    with pytest.raises(GpuSpecError, match="--gpu v100: not a packaged GPU"):
        load_gpu("v100")
