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


@pytest.mark.parametrize("table,gpu", [("narayanan-2021-a100", "a100-80gb"),
                                       ("megatron-2024-h100", "h100-sxm")])
def test_the_step_model_predicts_held_out_published_runs_within_ten_percent(table, gpu):
    """benchmarks/planner_validation.py's leave-one-out check on each published table
    (Narayanan et al.'s Table 1 on A100, Megatron-LM's 2024 H100 table): each run predicted
    with efficiencies fitted on the others — the issue's target, <= 10 % MAPE on data not
    used for fitting — and the GPU spec file holds the constants fitted on all of them."""
    from benchmarks.planner_validation import GRID, errors, fit, mape
    from megavit.planner.published import TABLES
    from megavit.planner.hardware import Efficiency

    rows = TABLES[table]
    errs = {c: errors(rows, Efficiency(*c)) for c in GRID}
    loo = [errs[fit(errs, [j for j in range(len(rows)) if j != i])][i]
           for i in range(len(rows))]
    assert mape(loo) <= 0.10
    spec = load_gpu(gpu).efficiency
    assert (spec.gemm_max, spec.gemm_half, spec.elementwise) == fit(errs, range(len(rows)))


def plan_cli(*args: str):
    import sys

    from tests import cli
    from tests.test_checkpoint_cli import ROOT

    return cli.run([sys.executable, str(ROOT / "tools" / "plan.py"), *args],
                   capture_output=True, text=True, timeout=300, cwd=ROOT)


DEBUG = ("--preset", "vit-debug", "--num-classes", "10", "--global-batch-size", "16")


def test_plan_evaluates_a_given_layout_with_the_planners_counts():
    """--layout: one row whose memory is memory_per_stage's worst stage for those flags and
    whose step time is predict_step's; --json gives the same figures."""
    from megavit.config import parse_args
    from megavit.planner.memory import memory_per_stage
    from megavit.planner.search import PlannedModel
    from megavit.planner.step_time import PlanLayout, predict_step

    flags = (*DEBUG, "--num-gpus", "8", "--layout", "--tensor-model-parallel-size", "2",
             "--pipeline-model-parallel-size", "2", "--sequence-parallel",
             "--micro-batch-size", "2", "--use-distributed-optimizer")
    table = plan_cli(*flags)
    assert table.returncode == 0, table.stderr
    assert "| 1 | 2 | 2 | 1 | 2 | on | none | 2 | ZeRO-1 |" in table.stdout, table.stdout
    got = [json.loads(line) for line in plan_cli(*flags, "--json").stdout.splitlines()]
    assert len(got) == 1
    cfg = parse_args([*DEBUG, "--tensor-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                      "--micro-batch-size", "2", "--use-distributed-optimizer", "--bf16"])
    worst = max(memory_per_stage(cfg, dp=2), key=lambda m: m.total)
    assert got[0]["memory_gib_per_gpu"] == pytest.approx(worst.total / 2**30, rel=1e-12)
    step = predict_step(PlannedModel.vit(cfg).shape, PlanLayout(2, 2, 2, 1, True, "none", 2,
                                                                16, True), load_gpu("h100-sxm"))
    assert got[0]["step_time_s"] == pytest.approx(step.step_s, rel=1e-12)
    assert {"step_time_s", "mfu", "memory_gib_per_gpu", "fits"} <= set(got[0])


def test_plan_searches_ranks_and_marks_what_does_not_fit(tmp_path):
    """The search: fitting layouts first, fastest first; on a GPU of 1 KiB nothing fits and
    every row says so; progress lines on stderr."""
    rows = [json.loads(line) for line in plan_cli(*DEBUG, "--num-gpus", "4", "--json",
                                                  "--top", "1000").stdout.splitlines()]
    assert len(rows) > 20 and all(r["fits"] for r in rows)
    times = [r["step_time_s"] for r in rows]
    assert times == sorted(times)
    assert {(r["tp"], r["pp"], r["dp"]) for r in rows} >= {(1, 1, 4), (2, 2, 1), (4, 1, 1)}
    raw = json.loads((GPU_DIR / "h100-sxm.json").read_text())
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({**raw, "name": "tiny", "memory_bytes": 2**10}))
    proc = plan_cli(*DEBUG, "--num-gpus", "4", "--gpu", str(tiny), "--top", "3")
    assert proc.returncode == 0, proc.stderr
    assert "0 fit" in proc.stdout and proc.stdout.count("| NO |") == 3, proc.stdout
    assert "plan | evaluated" in proc.stderr


def test_plan_names_its_mistakes():
    bad = plan_cli(*DEBUG, "--num-gpus", "4", "--gpu", "v100")
    assert bad.returncode == 2 and "--gpu v100: not a packaged GPU" in bad.stderr
    gpt = plan_cli("--model-kind", "gpt", "--num-layers", "4", "--num-gpus", "8")
    assert gpt.returncode == 2 and "needs --seq-length and --vocab-size" in gpt.stderr
    classes = plan_cli("--preset", "vit-debug", "--num-gpus", "8")
    assert classes.returncode == 2 and "--num-classes" in classes.stderr
    odd = plan_cli(*DEBUG, "--num-gpus", "6", "--layout", "--tensor-model-parallel-size", "4")
    assert odd.returncode == 2 and "not a multiple of TP 4" in odd.stderr
    block = plan_cli(*DEBUG, "--num-gpus", "4", "--layout", "--recompute-granularity", "full",
                     "--recompute-method", "block", "--recompute-num-layers", "1")
    assert block.returncode == 2 and "every block on its own" in block.stderr


def test_the_gpu_check_says_there_is_no_cuda_device_and_exits_0(capsys):
    """benchmarks/gpu_check.py on this CPU machine: one clear line, exit 0 (the check itself
    runs where a GPU is; its megavit part, train + save + resume, runs here on vit-debug)."""
    import torch

    from benchmarks.gpu_check import gpu_spec_for, main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: run benchmarks/gpu_check.sh instead")
    assert main([]) == 0
    assert "gpu_check: no CUDA device" in capsys.readouterr().out
    assert gpu_spec_for("NVIDIA H100 80GB HBM3").name == "h100-sxm"
    assert gpu_spec_for("NVIDIA A100-SXM4-80GB").name == "a100-80gb"
    assert gpu_spec_for("Tesla T4") is None


def test_the_gpu_checks_megavit_run_trains_saves_and_resumes(tmp_path):
    from benchmarks.gpu_check import megavit_run

    from tests import cli

    got = megavit_run("vit-debug", 8, 3, tmp_path, precision=(),   # fp32: bf16 is slow here
                      run=lambda argv, **kw: cli.run(argv, timeout=300, **kw))
    assert got["step_s"] > 0 and got["images_per_second"] > 0
    assert got["save_load"], got
    assert got["nvml"] is False and got["peak_gib"] is None      # no GPU: no NVML fields


def test_full_sharding_plans_shard_the_state_and_pay_gathers(tmp_path):
    """With full sharding (--data-parallel-sharding-strategy full) the parameters,
    gradients and optimizer state are fp32 1/DP shards (memory.py, as FSDP2 cuts them),
    plus the gathered bf16 units (every unit of the stage under PP, else the root and two
    blocks); the gathers cost time only where the network is slower than a block's
    compute; the search lists such layouts only when asked."""
    from megavit.config import parse_args
    from megavit.planner.search import PlannedModel, layouts, memory_of
    from megavit.planner.step_time import PlanLayout, fsdp_unit, predict_step

    model = PlannedModel.vit(parse_args([*DEBUG, "--num-layers", "4"]))
    assert fsdp_unit(model.shape, 1) == pytest.approx(model.shape.parameters / 4)
    for pp in (1, 2):
        full = PlanLayout(1, pp, 4, micro_batch=2, global_batch=16, full_sharding=True)
        plain = memory_of(model, PlanLayout(1, pp, 4, micro_batch=2, global_batch=16))
        sharded = memory_of(model, full)
        held = plain["parameters"] / 2                         # bf16: 2 bytes each
        if pp == 1:   # fp32 shards, rows padded to a multiple of DP: a little over held / 4
            assert held / 4 <= sharded["parameters"] / 4 <= held / 4 * 1.01
            assert sharded["activations"] == plain["activations"]
        assert sharded["gradients"] == sharded["parameters"]
        assert sharded["optimizer"] == 2 * sharded["parameters"]
        # gathered in bf16 (2 bytes per element, 4 x the fp32 shard's elements): every unit
        # of the stage under PP, otherwise the root and two blocks
        assert (sharded["gathered"] >= 1.9 * sharded["parameters"]) == (pp > 1)
    raw = json.loads((GPU_DIR / "h100-sxm.json").read_text())
    slow, fast = tmp_path / "slow.json", tmp_path / "fast.json"
    slow.write_text(json.dumps({**raw, "name": "slow", "intra_node_bandwidth_gbps": 1e-3,
                                "inter_node_bandwidth_gbps": 1e-3}))
    fast.write_text(json.dumps({**raw, "name": "fast", "intra_node_latency_us": 1e-9,
                                "intra_node_bandwidth_gbps": 1e9}))
    full = PlanLayout(1, 2, 4, micro_batch=2, global_batch=16, full_sharding=True)
    assert predict_step(model.shape, full, load_gpu(str(slow))).parts["fsdp_exposed"] > 0.1
    assert predict_step(model.shape, full, load_gpu(str(fast))).parts["fsdp_exposed"] == 0.0
    assert not any(lay.full_sharding for lay in layouts(model, 4, 8, 16))
    assert any(lay.full_sharding for lay in layouts(model, 4, 8, 16, full_sharding=True))
