"""The invariant: a parallel run computes the same function as the serial run.

For each layout (TP=2, TP=4, DP=2, TP=2 x DP=2, pipelines, and with sequence parallelism,
recomputation, overlapped gradient reduction and the distributed optimizer: see LAYOUTS)
real gloo processes train every model variant for two steps (the layouts of one
(world, TP, PP) mesh share one group, each its own jobs); the serial run of the same seed
and global batch is the reference. Compared: the loss of each step, the gradient norm, every gradient gathered to
full shape (after DP averaging, before clipping), and every weight after two AdamW steps.

Tolerances (fp32 on CPU):
- losses and gradient norms: 1e-5 relative;
- each gradient tensor: 1e-5 of its largest magnitude (+1e-7 absolute for ~0 tensors);
- the sharded optimizer: the serial AdamW replayed on the layout's own (gathered)
  gradients reproduces the layout's weights to 1e-6 of each tensor's largest magnitude;
- end to end, weights after two AdamW steps against the serial run, element by element:
  1e-6 of the tensor's largest magnitude plus twice the first-order effect of the measured
  gradient differences. Adam normalises each element (m / (sqrt(v) + eps)), so a rounding
  difference d in a small gradient moves its update by up to lr * d / eps; the bound uses
  Adam's exact derivative for each element from the serial run's (clipped) gradients, so it
  is tight where gradients are large and loose only where they are near 0. The config uses
  eps = 1e-6 to keep that worst case meaningful.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megavit.parallel.state import serial_state
from tests.harness import run_distributed
from tests.scenarios import (VARIANTS, block_collectives, debug_config, merge_stages,
                             replay_optimizer, train_steps)

RTOL = 1e-5
LR = debug_config().training.lr
EPS = debug_config().training.adam_eps
SP = {"sequence_parallel": True}
PP2, PP4 = {"pipeline_model_parallel_size": 2}, {"pipeline_model_parallel_size": 4}
# Small buckets (~3,000 elements: 9 buckets, some padded to a multiple of DP) so overlapped
# reduction really interleaves with backward and shards cut through parameters.
OVERLAP = {"overlap_grad_reduce": True, "ddp_bucket_size": 3000}
ZERO1 = {"use_distributed_optimizer": True, "ddp_bucket_size": 3000}
FULL = {"data_parallel_sharding_strategy": "full"}     # FSDP2 under megavit's TP / PP
ZB = {"pipeline_schedule": "zb-h1"}                    # backward split into B and W
# name: (world size, TP size, ParallelConfig overrides, blocks). The "vit22b" variant has 25
# tokens and the "classic" one 17, so every SP layout also covers sequences not divisible by
# TP (padded and masked), through both block types and both the MAP and CLS heads. Pipeline
# layouts use 4 blocks (the serial reference too).
LAYOUTS = {
    "tp2": (2, 2, {}, 2),
    "tp4": (4, 4, {}, 2),
    "dp2": (2, 1, {}, 2),
    "tp2_dp2": (4, 2, {}, 2),
    "tp2_sp": (2, 2, SP, 2),
    "tp4_sp": (4, 4, SP, 2),
    "tp2_sp_regather": (2, 2, {**SP, "sequence_parallel_regather": True}, 2),
    "tp2_sp_selective": (2, 2, {**SP, "recompute_granularity": "selective"}, 2),
    "tp2_full_uniform": (2, 2, {"recompute_granularity": "full", "recompute_method": "uniform",
                                "recompute_num_layers": 2}, 2),
    "tp2_sp_full_block": (2, 2, {**SP, "recompute_granularity": "full",
                                 "recompute_method": "block", "recompute_num_layers": 1}, 2),
    "tp2_dp2_sp_selective": (4, 2, {**SP, "recompute_granularity": "selective"}, 2),
    "pp2": (2, 1, PP2, 4),
    "pp4": (4, 1, PP4, 4),
    "pp2_interleaved": (2, 1, {**PP2, "num_layers_per_virtual_pipeline_stage": 1}, 4),
    "pp2_tp2_sp": (4, 2, {**PP2, **SP}, 4),
    "pp2_dp2": (4, 1, PP2, 4),
    "pp2_full_uniform": (2, 1, {**PP2, "recompute_granularity": "full",
                                "recompute_method": "uniform", "recompute_num_layers": 1}, 4),
    "pp2_uneven": (2, 1, {**PP2, "num_layers_in_first_pipeline_stage": 1,
                          "num_layers_in_last_pipeline_stage": 3}, 4),
    "dp2_overlap": (2, 1, OVERLAP, 2),
    "dp2_distopt": (2, 1, ZERO1, 2),
    "dp2_distopt_overlap": (2, 1, {**ZERO1, **OVERLAP}, 2),
    "tp2_dp2_sp_distopt_overlap": (4, 2, {**SP, **ZERO1, **OVERLAP}, 2),
    "pp2_dp2_distopt_overlap": (4, 1, {**PP2, **ZERO1, **OVERLAP}, 4),
    "pp4_zb": (4, 1, {**PP4, **ZB}, 4),
    "pp2_tp2_sp_regather_selective_zb": (4, 2, {**PP2, **SP, **ZB,
                                                "sequence_parallel_regather": True,
                                                "recompute_granularity": "selective"}, 4),
    "pp2_dp2_zb_full_recompute_overlap": (4, 1, {**PP2, **ZB, **OVERLAP,
                                                 "recompute_granularity": "full",
                                                 "recompute_method": "uniform",
                                                 "recompute_num_layers": 1}, 4),
    "dp2_full": (2, 1, FULL, 2),
    "tp2_dp2_sp_selective_full": (4, 2, {**SP, **FULL, "recompute_granularity": "selective"},
                                  2),
    "pp2_dp2_full_recompute": (4, 1, {**PP2, **FULL, "recompute_granularity": "full",
                                      "recompute_method": "uniform",
                                      "recompute_num_layers": 1}, 4),
}
PLAIN = [name for name, (_, _, extra, _) in LAYOUTS.items() if not extra]


def stage_ranks(name: str) -> list[list[int]]:
    """For each (dp, tp) position, the global ranks of its pipeline stages, in order."""
    world, tp, extra, _ = LAYOUTS[name]
    pp = extra.get("pipeline_model_parallel_size", 1)
    column = world // pp
    return [[k * column + c for k in range(pp)] for c in range(column)]


@functools.lru_cache(maxsize=None)
def serial(variant: str, layers: int = 2):
    return train_steps(serial_state(), debug_config(variant, layers=layers))


def merged_results(name: str, results: dict, variant: str) -> list[dict]:
    """One full-model result per (dp, tp) position (stages merged)."""
    return [merge_stages(results[variant], ranks) for ranks in stage_ranks(name)]


def _mesh(name: str) -> tuple[int, int, int]:
    """(world size, TP, PP): the process group a layout runs in."""
    world, tp, extra, _ = LAYOUTS[name]
    return world, tp, extra.get("pipeline_model_parallel_size", 1)


@functools.lru_cache(maxsize=None)
def _group_results(mesh: tuple[int, int, int]) -> dict[str, dict]:
    """Every layout of one (world, TP, PP) mesh trained in one group of gloo processes
    (jobs "LAYOUT/VARIANT", in turn): {layout: {variant: [result per rank]}}."""
    world, tp, pp = mesh
    names = [n for n in LAYOUTS if _mesh(n) == mesh]
    jobs = {f"{n}/{v}": (train_steps, (debug_config(v, tp=tp, parallel=LAYOUTS[n][2],
                                                    layers=LAYOUTS[n][3]),))
            for n in names for v in VARIANTS}
    got = run_distributed(world, tp, jobs, pp=pp)
    return {n: {v: got[f"{n}/{v}"] for v in VARIANTS} for n in names}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    return request.param, LAYOUTS[request.param][1], _group_results(_mesh(request.param))[
        request.param]


def assert_tensors_close(actual: dict, expected: dict, what: str, rtol: float = RTOL,
                         atol: dict | float = 1e-7) -> None:
    """Per tensor: max |actual - expected| <= rtol * max |expected| + atol (atol may be a
    per-name dict)."""
    assert actual.keys() == expected.keys(), f"{what}: parameter names differ"
    for name, ref in expected.items():
        got = actual[name]
        assert got.shape == ref.shape, f"{what} {name}: shape {got.shape} != {ref.shape}"
        scale = ref.abs().max().item()
        err = (got - ref).abs().max().item()
        bound = rtol * scale + (atol[name] if isinstance(atol, dict) else atol)
        assert err <= bound, f"{what} {name}: max error {err:.3e} > {bound:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_and_grad_norm_match_serial(layout, variant):
    name, _, results = layout
    ref = serial(variant, LAYOUTS[name][3])
    for rank, got in enumerate(merged_results(name, results, variant)):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"{name} column {rank}"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), f"{name} column {rank}"
    for rank, got in enumerate(results[variant]):   # every stage knows the global norm
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), f"{name} rank {rank}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_gradient_matches_serial(layout, variant):
    name, _, results = layout
    ref = serial(variant, LAYOUTS[name][3])
    assert any(g.abs().max() > 0 for g in ref["grads"][0].values())
    for rank, got in enumerate(merged_results(name, results, variant)):
        for step in range(2):
            assert_tensors_close(got["grads"][step], ref["grads"][step],
                                 f"{name} column {rank} step {step} grad")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_optimizer_matches_serial_optimizer(layout, variant):
    """Given the same gradients, AdamW on this layout's shards equals AdamW on full tensors."""
    name, _, results = layout
    got = merged_results(name, results, variant)[0]
    expected = replay_optimizer(debug_config(variant, layers=LAYOUTS[name][3]), got["initial"],
                                got["grads"])
    assert_tensors_close(got["weights"], expected, f"{name} optimizer", rtol=1e-6, atol=1e-8)


def _clipped(result: dict, step: int, clip: float) -> dict:
    coef = min(1.0, clip / (result["grad_norm"][step] + 1e-6))
    return {k: g * coef for k, g in result["grads"][step].items()}


def assert_two_steps_match(got: dict, ref: dict, cfg, what: str, rtol: float = 1e-5) -> None:
    """A layout's two training steps (`scenarios.train_steps`, stages merged) against the
    serial run's: losses and grad norms to `rtol`, every gradient, and the weights within
    Adam's first-order response to the gradient differences (`adam_first_order_bound`)."""
    assert got["loss"] == pytest.approx(ref["loss"], rel=rtol), what
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=rtol), what
    for step in range(2):
        assert_tensors_close(got["grads"][step], ref["grads"][step], f"{what} step {step} grad")
    bound = adam_first_order_bound(ref, got, cfg)
    for k, w in ref["weights"].items():
        err = (got["weights"][k] - w).abs()
        allowed = 1e-6 * w.abs().max() + 1e-8 + bound[k]
        assert torch.all(err <= allowed), f"{what} weight {k}: max error {err.max():.3e}"


def adam_first_order_bound(ref: dict, got: dict, cfg) -> dict:
    """Per element: 2 x |d(w after two AdamW steps) / d(gradients)| . |gradient differences|,
    with Adam's derivative taken at the serial run's clipped gradients (bias-corrected
    moments, steps 1 and 2)."""
    t = cfg.training
    b1, b2, eps, lr, wd = t.adam_beta1, t.adam_beta2, t.adam_eps, t.lr, t.weight_decay
    bounds = {}
    g1s, g2s = _clipped(ref, 0, t.clip_grad), _clipped(ref, 1, t.clip_grad)
    d1s = {k: (v - g1s[k]).abs() for k, v in _clipped(got, 0, t.clip_grad).items()}
    d2s = {k: (v - g2s[k]).abs() for k, v in _clipped(got, 1, t.clip_grad).items()}
    for k in ref["weights"]:
        g1, g2, d1, d2 = g1s[k].double(), g2s[k].double(), d1s[k].double(), d2s[k].double()
        du1_dg1 = eps / (g1.abs() + eps) ** 2                       # u1 = g1 / (|g1| + eps)
        m = (b1 * g1 + g2) / (1 + b1)                                # bias-corrected moments
        v = (b2 * g1 ** 2 + g2 ** 2) / (1 + b2)
        root = v.sqrt().clamp_min(1e-30)
        denom = root + eps
        def du2(dm: float, dv: torch.Tensor) -> torch.Tensor:     # d(m / (sqrt(v) + eps))
            return (dm * denom - m * dv / (2 * root)).abs() / denom ** 2
        du2_dg1 = du2(b1 / (1 + b1), 2 * b2 * g1 / (1 + b2))
        du2_dg2 = du2(1 / (1 + b1), 2 * g2 / (1 + b2))
        first_order = lr * ((1 - lr * wd) * du1_dg1 * d1 + du2_dg1 * d1 + du2_dg2 * d2)
        bounds[k] = (2 * first_order).float()
    return bounds


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_after_two_steps_match_serial(layout, variant):
    name, _, results = layout
    ref = serial(variant, LAYOUTS[name][3])
    cfg = debug_config(variant, layers=LAYOUTS[name][3])
    for rank, got in enumerate(merged_results(name, results, variant)):
        assert_tensors_close(got["initial"], ref["initial"], f"{name} rank {rank} init", rtol=0,
                             atol=0.0)
        bound = adam_first_order_bound(ref, got, cfg)
        for k, w in ref["weights"].items():
            err = (got["weights"][k] - w).abs()
            allowed = 1e-6 * w.abs().max() + 1e-8 + bound[k]
            worst = (err - allowed).argmax()
            assert torch.all(err <= allowed), (
                f"{name} rank {rank} weight {k}: error {err.flatten()[worst]:.3e} > allowed "
                f"{allowed.flatten()[worst]:.3e} at element {int(worst)}")


def test_replicas_hold_identical_weights(layout):
    """Replicated parameters (norms, embeddings, heads) stay bit-identical on every rank of
    a pipeline stage."""
    name, _, results = layout
    columns = stage_ranks(name)
    for variant in VARIANTS:
        for stage in range(len(columns[0])):
            ranks = [column[stage] for column in columns]
            first = results[variant][ranks[0]]["weights"]
            for r in ranks[1:]:
                for key, value in first.items():
                    assert torch.equal(results[variant][r]["weights"][key], value), \
                        f"{name} {variant} {key} rank {r}"


@pytest.mark.parametrize("layout", [n for n in LAYOUTS if n.startswith("pp")], indirect=True)
def test_pipeline_stages_hold_disjoint_parts_of_the_model(layout):
    name, _, results = layout
    full = serial("vit22b", LAYOUTS[name][3])["weights"].keys()
    for ranks in stage_ranks(name):
        parts = [set(results["vit22b"][r]["weights"]) for r in ranks]
        assert set().union(*parts) == set(full)
        assert sum(len(p) for p in parts) == len(full)


def test_serial_reference_really_trains():
    """Guard against a vacuous comparison: the reference's weights move and its two
    steps see different batches."""
    ref = serial("vit22b", 2)
    initial = train_steps(serial_state(), debug_config("vit22b"), steps=0)["weights"]
    moved = [k for k in initial if not torch.equal(initial[k], ref["weights"][k])]
    assert len(moved) == len(initial)
    assert ref["loss"][0] != ref["loss"][1]


# --- collective counts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp2_collectives():
    jobs = {bt: (block_collectives, (bt,)) for bt in ("parallel", "sequential", "map")}
    return run_distributed(2, 2, jobs)


def test_parallel_block_does_one_all_reduce_each_way(tp2_collectives):
    for got in tp2_collectives["parallel"]:
        act = got["activation_bytes"]
        assert got["forward"][0] == {("tp", "all_reduce"): 1}
        assert got["forward"][1] == {("tp", "all_reduce"): act}
        assert got["backward"][0] == {("tp", "all_reduce"): 1}
        assert got["backward"][1] == {("tp", "all_reduce"): act}


def test_sequential_block_does_two_all_reduces_each_way(tp2_collectives):
    for got in tp2_collectives["sequential"]:
        act = got["activation_bytes"]
        assert got["forward"] == ({("tp", "all_reduce"): 2}, {("tp", "all_reduce"): 2 * act})
        assert got["backward"] == ({("tp", "all_reduce"): 2}, {("tp", "all_reduce"): 2 * act})


def test_map_head_communication(tp2_collectives):
    """Forward: attention-out and MLP-out of the one pooled token ([1, b, h] each).
    Backward: input gradients of the probe's query ([h]), keys/values ([s, b, h]) and fc1."""
    s, b, h = 16, 3, 32
    for got in tp2_collectives["map"]:
        assert got["forward"] == ({("tp", "all_reduce"): 2}, {("tp", "all_reduce"): 2 * b * h * 4})
        assert got["backward"] == ({("tp", "all_reduce"): 3},
                                   {("tp", "all_reduce"): (h + s * b * h + b * h) * 4})


@pytest.mark.parametrize("layout", PLAIN, indirect=True)
def test_training_step_communication(layout):
    """Per step on TP: one all-reduce per block each way per micro-batch, one for the
    QK-norm partial gradients and one for the grad norm (the GAP head adds none); on DP:
    one all-reduce per gradient bucket (here two: everything, and the QK-norm weights'
    bucket) and one for the logged loss."""
    name, tp, results = layout
    gap = results["gap"][0]["comm"]        # GAP head: no TP collectives outside the blocks
    mapped = results["vit22b"][0]["comm"]  # MAP head: 2 forward + 3 backward per micro-batch
    dp = LAYOUTS[name][0] // tp
    micro = 8 // (2 * dp)
    layers = 2
    if tp > 1:
        assert gap["tp.all_reduce"] == 2 * (micro * layers * 2 + 1 + 1)
        assert mapped["tp.all_reduce"] == 2 * (micro * (layers * 2 + 5) + 1 + 1)
    else:
        assert "tp.all_reduce" not in gap and "tp.all_reduce" not in mapped
    got = gap
    if dp > 1:
        assert got["dp.all_reduce"] == 2 * 3  # 2 gradient buckets + the loss, per step
    else:
        assert "dp.all_reduce" not in got


SP_PLAIN = [n for n, (_, _, extra, _) in LAYOUTS.items() if extra.get("sequence_parallel")
            and "recompute_granularity" not in extra and "pipeline_model_parallel_size" not in extra]


@pytest.mark.parametrize("layout", SP_PLAIN, indirect=True)
def test_sequence_parallel_training_step_communication(layout):
    """GAP variant, per micro-batch: each block all-gathers once and reduce-scatters once
    forward, and the same backward (plus one all-gather to re-gather each column-parallel
    input under --sequence-parallel-regather); the embedding's scatter all-gathers its
    gradient and the gather before the head all-gathers forward. No all-reduce but the two
    per step (partial gradients, grad norm)."""
    name, tp, results = layout
    regather = LAYOUTS[name][2].get("sequence_parallel_regather", False)
    got = results["gap"][0]["comm"]
    micro = 8 // (2 * (LAYOUTS[name][0] // tp))
    layers = 2
    per_micro_gathers = layers * (2 + regather) + 2
    assert got["tp.all_gather"] == 2 * micro * per_micro_gathers
    assert got["tp.reduce_scatter"] == 2 * micro * layers * 2
    assert got["tp.all_reduce"] == 2 * 2


@pytest.mark.parametrize("layout", [n for n in LAYOUTS if n.startswith("pp")], indirect=True)
def test_pipeline_point_to_point_traffic(layout):
    """Per step, each of the P*v - 1 boundaries between consecutive chunks carries one
    activation forward and one gradient back per micro-batch, of [s(/t), m, h] fp32 each."""
    name, tp, results = layout
    world, _, extra, _ = LAYOUTS[name]
    pp = extra["pipeline_model_parallel_size"]
    v = 4 // pp // extra.get("num_layers_per_virtual_pipeline_stage", 4 // pp)
    micro = 8 // (2 * (world // (tp * pp)))
    cfg = debug_config("vit22b", layers=4)   # 25 tokens: under SP padded to a multiple of t
    tokens = cfg.model.seq_length
    if extra.get("sequence_parallel"):
        tokens = -(-tokens // tp)            # this rank's shard of the padded sequence
    message = tokens * 2 * cfg.model.hidden_size * 4
    for ranks in stage_ranks(name):
        got = [results["vit22b"][r] for r in ranks]
        sends = sum(g["comm"].get("pp.send", 0) for g in got)
        assert sends == sum(g["comm"].get("pp.recv", 0) for g in got) == 2 * 2 * (pp * v - 1) * micro
        for g in got:   # every message is one activation (or its gradient)
            assert g["comm_bytes"].get("pp.send", 0) == g["comm"].get("pp.send", 0) * message
            assert g["comm_bytes"].get("pp.recv", 0) == g["comm"].get("pp.recv", 0) * message


@pytest.mark.parametrize("layout", [n for n in LAYOUTS if n.endswith("zb") or "_zb_" in n],
                         indirect=True)
def test_zero_bubble_gives_every_weight_gradient_in_a_w_pass(layout):
    """Under ZB-H1 each tensor-parallel linear weight of a stage gets its gradient from a W
    pass once per micro-batch (and the results above equal the serial run's)."""
    name, _, results = layout
    for variant in VARIANTS:
        for rank, got in enumerate(results[variant]):
            assert got["deferred_weight_grads"] == \
                2 * got["micro_batches"] * got["linear_weights"] > 0, (name, variant, rank)


def test_the_planner_counts_what_each_rank_holds(layout):
    """megavit/planner on paper = the run: each rank's held parameters (its stage's part of
    the model), its parameter + gradient + optimizer bytes per trained parameter as the
    optimizer measures them after two steps (fp32: 16, or 8 + 8/d with the distributed
    optimizer), and the bytes of every TP, DP, PP and world collective of a step as the
    counting layer recorded them. Fully sharded (FSDP2), on DP rank 0, whose shard is the
    largest: its held elements, its bytes per parameter of the stage (16 per held element),
    and FSDP2's all-gathers and reduce-scatters as a dispatch mode saw them."""
    from megavit.planner.communication import step_collective_bytes
    from megavit.planner.memory import memory_per_stage
    from megavit.training.run import pipeline_layout
    from megavit.planner.memory import held_parameters

    name, tp, results = layout
    world, _, extra, layers = LAYOUTS[name]
    pp = extra.get("pipeline_model_parallel_size", 1)
    for variant in VARIANTS:
        cfg = debug_config(variant, tp=tp, parallel=extra, layers=layers,
                           model={"num_classes": 10})        # the run reads 10 from digits
        stages = memory_per_stage(cfg, dp=world // (tp * pp))
        sent = step_collective_bytes(cfg, dp=world // (tp * pp))
        full = extra.get("data_parallel_sharding_strategy") == "full"
        for rank, got in enumerate(results[variant]):
            planned = stages[rank // (world // pp)]
            if full and (rank // tp) % (world // (tp * pp)):
                # other DP ranks hold as much or (odd row counts) less
                assert got["held_parameters"] <= planned.held_parameters
                continue
            measured = got["comm_bytes"]
            planned_bytes = {k: 2 * v for k, v in sent[rank // (world // pp)].items()}
            assert planned_bytes == measured, (name, variant, rank)         # 2 steps
            assert planned.held_parameters == got["held_parameters"], (name, variant, rank)
            per_parameter = (planned.parameters + planned.gradients + planned.optimizer) \
                / (held_parameters(cfg.model, pipeline_layout(cfg), rank // (world // pp), tp)
                   if full else planned.held_parameters)
            assert per_parameter == pytest.approx(sum(got["bytes_per_parameter"].values()),
                                                  rel=1e-12), (name, variant, rank)
