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


def test_the_pipeline_term_is_the_simulators_makespan_for_equal_stages():
    from megavit.parallel.schedules import build_schedule, simulate
    from megavit.planner.step_time import pipeline_makespan

    for m, stages, chunks in ((8, 4, 1), (4, 2, 2), (6, 3, 2), (1, 1, 1)):
        schedules = [build_schedule(m, stages, k, chunks) for k in range(stages)]
        want = simulate(schedules, chunks, 1.5, 3.25).makespan
        assert pipeline_makespan(m, stages, chunks, 1.5, 3.25) == pytest.approx(want), \
            (m, stages, chunks)


def test_gpt_flops_are_narayanans_equation_3():
    """96 B s l h^2 (1 + s / 6h + V / 16 l h) with full recomputation, 72 without."""
    from megavit.planner.step_time import gpt_shape, model_flops

    B, s, l, h, V = 512, 2048, 24, 2304, 51200
    shape = gpt_shape(l, h, 24, s, V)
    eq3 = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert model_flops(shape, B, "full") == pytest.approx(eq3, rel=1e-12)
    # without recomputation the blocks cost 72 (3 passes), the vocabulary head 6 B s h V
    assert model_flops(shape, B) == pytest.approx(
        72 * B * s * l * h * h * (1 + s / (6 * h)) + 6 * B * s * h * V, rel=1e-12)


def test_the_step_model_predicts_held_out_a100_runs_within_ten_percent():
    """benchmarks/planner_validation.py's leave-one-out check on Narayanan et al.'s Table 1:
    each run predicted with efficiencies fitted on the other nine (the issue's target,
    <= 10 % MAPE on data not used for fitting; the H100 table's figure is reported in
    docs/planner.md, not asserted: it misses)."""
    from benchmarks.planner_validation import GRID, errors, fit, mape
    from megavit.planner.published import NARAYANAN_2021_A100
    from megavit.planner.step_time import Efficiency

    rows = NARAYANAN_2021_A100
    table = {c: errors(rows, Efficiency(*c)) for c in GRID}
    loo = [table[fit(table, [j for j in range(len(rows)) if j != i])][i]
           for i in range(len(rows))]
    assert mape(loo) <= 0.10
