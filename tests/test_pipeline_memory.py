"""--recompute-granularity auto: each pipeline stage recomputes the fewest blocks that keep
its block activations, times the micro-batches it holds at once, under the budget."""

from __future__ import annotations

import dataclasses

import pytest

from megavit.models.activation_memory import ActivationSetup, layer_activation_bytes
from megavit.parallel.state import ParallelState, serial_state
from megavit.training.recompute_plan import GIB, StagePlan
from megavit.tasks.classification import classification_run
from tests.harness import run_distributed
from tests.scenarios import debug_config, train_steps

LAYERS = 8   # PP=2: 4 blocks per stage; 4 micro-batches: 1F1B keeps 2 in flight on stage 0
# issue 18: blocks of every attention type (3x3 windows over the 5x5 grid, rope-2d), planned
# block by block with the per-type rows of docs/activation_memory.md
MIXED = dict(attention_type_per_layer="window,linear,local-global,full", window_size=3,
             position_embedding_type="rope-2d")
# issue 19: an 8x8 grid merged at the stage boundary (after block 3) and inside stage 1
# (after block 5): each block planned at its own length, the merges' rows included
MERGED = dict(img_h=16, img_w=16, patch_dim=2, patch_merge_layers="3,5")
# with --feature-layers: stage 1 receives the maps of blocks 1 and 3 (64 tokens each) in the
# tensor that carries its hidden states (16 tokens), and its first block keeps all of it
FEATURES = dict(MERGED, feature_layers="1,3,5,7")


def budget_bytes(model: dict | None = None) -> float:
    """Exactly what stage 1 needs without recomputation (1 micro-batch of its 4 blocks):
    stage 1 then recomputes nothing, stage 0 (2 micro-batches) must recompute."""
    cfg = debug_config("vit22b", layers=LAYERS, model=model).model
    setup = ActivationSetup(tp=1, micro_batch=2)
    return sum(layer_activation_bytes(cfg, setup, l) for l in range(4, 8))


def auto_cfg(model: dict | None = None):
    return debug_config("vit22b", layers=LAYERS, model=model, parallel={
        "pipeline_model_parallel_size": 2, "recompute_granularity": "auto",
        "activation_memory_budget_gb": budget_bytes(model) / GIB})


def measured_step(pstate: ParallelState, model: dict | None = None) -> dict:
    run = classification_run(auto_cfg(model), pstate)
    micro = next(run.batches(0, 1))
    result = run.step(0, micro, measure=True)
    return {"plans": [dataclasses.astuple(p) for p in run.plans],
            "peak": result.stats.peak_saved_bytes, "stage": pstate.pp.rank,
            "loss": result.loss.item()}


# fixed layouts (no plan) whose stage peaks the planner predicts (megavit/planner/memory.py)
FIXED = {"none": {}, "selective": {"recompute_granularity": "selective"},
         "full_uniform_2": {"recompute_granularity": "full", "recompute_method": "uniform",
                            "recompute_num_layers": 2},
         "full_block_3": {"recompute_granularity": "full", "recompute_method": "block",
                          "recompute_num_layers": 3}}


def fixed_cfg(parallel: dict):
    return debug_config("vit22b", layers=LAYERS, parallel={
        "pipeline_model_parallel_size": 2, **parallel})


def fixed_step(pstate: ParallelState, parallel: dict) -> dict:
    run = classification_run(fixed_cfg(parallel), pstate)
    result = run.step(0, next(run.batches(0, 1)), measure=True)
    return {"peak": result.stats.peak_saved_bytes, "stage": pstate.pp.rank}


@pytest.fixture(scope="module")
def pp2():
    return run_distributed(2, 1, {**{f"fixed_{k}": (fixed_step, (v,)) for k, v in FIXED.items()},
                                  "step": (measured_step, ()),
                                  "train": (train_steps, (auto_cfg(),)),
                                  "mixed": (measured_step, (MIXED,)),
                                  "mixed_train": (train_steps, (auto_cfg(MIXED),)),
                                  "merged": (measured_step, (MERGED,)),
                                  "features": (measured_step, (FEATURES,))}, pp=2)


def test_earlier_stages_recompute_more(pp2):
    plans = [StagePlan(*p) for p in pp2["step"][0]["plans"]]
    assert [p.in_flight for p in plans] == [2, 1]
    assert plans[0].recomputed > plans[1].recomputed == 0
    assert pp2["step"][0]["plans"] == pp2["step"][1]["plans"]   # every rank plans the same


def test_measured_saved_bytes_stay_under_the_budget(pp2):
    budget = budget_bytes()
    for got in pp2["step"]:
        plan = StagePlan(*got["plans"][got["stage"]])
        assert 0 < got["peak"] <= budget
        assert got["peak"] == pytest.approx(plan.predicted_bytes, rel=1e-12)


def test_measured_saved_bytes_follow_the_plan_with_every_attention_type(pp2):
    """Window, linear, local-global and full blocks with rope-2d: the plan's prediction is
    what the step keeps at its peak, and the earlier stage recomputes more."""
    plans = [StagePlan(*p) for p in pp2["mixed"][0]["plans"]]
    assert plans[0].recomputed > plans[1].recomputed == 0
    for got in pp2["mixed"]:
        plan = StagePlan(*got["plans"][got["stage"]])
        assert 0 < got["peak"] <= budget_bytes(MIXED)
        assert got["peak"] == pytest.approx(plan.predicted_bytes, rel=1e-12)


@pytest.mark.parametrize("model", [None, MIXED], ids=["full", "mixed"])
def test_auto_recomputation_computes_the_same_function(pp2, model):
    ref = train_steps(serial_state(), debug_config("vit22b", layers=LAYERS, model=model))
    last_stage = pp2["mixed_train" if model else "train"][1]
    assert last_stage["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert last_stage["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


def test_a_budget_too_small_for_any_plan_is_a_clear_error():
    from megavit.config import ConfigError
    from megavit.parallel.pipeline_layout import PipelineLayout
    from megavit.training.recompute_plan import plan_stage

    cfg = debug_config("vit22b", layers=LAYERS).model
    with pytest.raises(ConfigError, match="is too small for pipeline stage 0"):
        plan_stage(cfg, PipelineLayout(LAYERS, 2), 0, 4, ActivationSetup(1, 2), 1024)


def interleaved_step(pstate: ParallelState) -> dict:
    cfg = debug_config("vit22b", layers=LAYERS, parallel={
        "pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 2,
        "recompute_granularity": "auto",
        "activation_memory_budget_gb": budget_bytes() / GIB})
    run = classification_run(cfg, pstate)
    result = run.step(0, next(run.batches(0, 1)), measure=True)
    plan = run.plans[pstate.pp.rank]
    return {"plan": dataclasses.astuple(plan), "peak": result.stats.peak_saved_bytes}


def test_interleaved_plan_keeps_the_measured_peak_under_the_budget():
    """Two virtual stages of 2 blocks: more chunk-forwards in flight (stage 0: 5 of 8)."""
    ranks = run_distributed(2, 1, {"i": (interleaved_step, ())}, pp=2)["i"]
    budget = budget_bytes()
    for got in ranks:
        plan = StagePlan(*got["plan"])
        assert 0 < got["peak"] <= plan.predicted_bytes <= budget
    assert StagePlan(*ranks[0]["plan"]).in_flight > StagePlan(*ranks[1]["plan"]).in_flight


def test_measured_saved_bytes_follow_the_plan_with_patch_merging(pp2):
    plans = [StagePlan(*p) for p in pp2["merged"][0]["plans"]]
    assert plans[0].recomputed > plans[1].recomputed == 0
    for got in pp2["merged"]:
        plan = StagePlan(*got["plans"][got["stage"]])
        assert 0 < got["peak"] <= budget_bytes(MERGED)
        assert got["peak"] == pytest.approx(plan.predicted_bytes, rel=1e-12)


def test_measured_saved_bytes_follow_the_plan_with_carried_feature_maps(pp2):
    from megavit.models.activation_memory import carried_feature_bytes

    cfg = debug_config("vit22b", layers=LAYERS, model=FEATURES).model
    carried = carried_feature_bytes(cfg, ActivationSetup(tp=1, micro_batch=2), 4)
    assert carried == 2 * 4 * 64 * 2 * cfg.hidden_size          # two maps, fp32, 2 images
    plans = [StagePlan(*p) for p in pp2["features"][0]["plans"]]
    assert plans[1].recomputed > 0          # the maps no longer fit stage 1 in the budget
    for got in pp2["features"]:
        plan = StagePlan(*got["plans"][got["stage"]])
        assert got["peak"] == pytest.approx(plan.predicted_bytes, rel=1e-12)


@pytest.mark.parametrize("name", list(FIXED))
def test_the_planner_predicts_each_stages_measured_activation_peak(pp2, name):
    """memory_per_stage's activations (the formula per chunk times the chunk-forwards the
    1F1B schedule holds: 2 on stage 0, 1 on stage 1 with 4 micro-batches) are what a real
    PP=2 step keeps at its peak, without recomputation, selective, and full (uniform groups
    of 2, block with 3 of 4 blocks)."""
    from megavit.planner.memory import memory_per_stage

    stages = memory_per_stage(fixed_cfg(FIXED[name]), dp=1)
    assert [s.in_flight for s in stages] == [2, 1]
    for got in pp2[f"fixed_{name}"]:
        assert got["peak"] == pytest.approx(stages[got["stage"]].activations, rel=1e-12), \
            (name, got["stage"])
