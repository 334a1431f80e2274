"""The invariant: a parallel run computes the same function as the serial run.

For each layout (TP=2, TP=4, DP=2, TP=2 x DP=2) one group of real gloo processes trains
every model variant for two steps; the serial run of the same seed and global batch is the
reference. Compared: the loss of each step, the gradient norm, every gradient gathered to
full shape (after DP averaging, before clipping), and every weight after two AdamW steps.

Tolerances (fp32 on CPU):
- losses and gradient norms: 1e-5 relative;
- each gradient tensor: 1e-5 of its largest magnitude (+1e-7 absolute for ~0 tensors);
- the sharded optimizer: the serial AdamW replayed on the layout's own (gathered)
  gradients reproduces the layout's weights to 1e-6 of each tensor's largest magnitude;
- end to end, weights after two steps against the serial run: 1e-5 of the largest magnitude
  plus the first-order effect of the measured gradient differences through AdamW. Adam
  divides each element by sqrt(v) + eps, so a difference d in one element's gradient moves
  its update by up to lr * d / eps (the worst case, a gradient near 0); summed over the two
  steps that is (lr / eps) * (d_1 + d_2), with d_s the tensor's largest gradient difference
  at step s (itself checked above). The config uses eps = 1e-6 so that this bound stays
  meaningful (about 5e-5 here); at the default 1e-8 it would exceed the update itself.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megavit.parallel.state import serial_state
from tests.harness import run_distributed
from tests.scenarios import (VARIANTS, block_collectives, debug_config, replay_optimizer,
                             train_steps)

LAYOUTS = {"tp2": (2, 2), "tp4": (4, 4), "dp2": (2, 1), "tp2_dp2": (4, 2)}  # world, tp
RTOL = 1e-5
LR = debug_config().training.lr
EPS = debug_config().training.adam_eps


@functools.lru_cache(maxsize=None)
def serial(variant: str):
    return train_steps(serial_state(), debug_config(variant))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    world, tp = LAYOUTS[request.param]
    jobs = {v: (train_steps, (debug_config(v, tp=tp),)) for v in VARIANTS}
    return request.param, tp, run_distributed(world, tp, jobs)


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
    ref = serial(variant)
    for rank, got in enumerate(results[variant]):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"{name} rank {rank}"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), f"{name} rank {rank}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_gradient_matches_serial(layout, variant):
    name, _, results = layout
    ref = serial(variant)
    assert any(g.abs().max() > 0 for g in ref["grads"][0].values())
    for rank, got in enumerate(results[variant]):
        for step in range(2):
            assert_tensors_close(got["grads"][step], ref["grads"][step],
                                 f"{name} rank {rank} step {step} grad")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_optimizer_matches_serial_optimizer(layout, variant):
    """Given the same gradients, AdamW on this layout's shards equals AdamW on full tensors."""
    name, _, results = layout
    got = results[variant][0]
    expected = replay_optimizer(debug_config(variant), got["initial"], got["grads"])
    assert_tensors_close(got["weights"], expected, f"{name} optimizer", rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_after_two_steps_match_serial(layout, variant):
    name, _, results = layout
    ref = serial(variant)
    for rank, got in enumerate(results[variant]):
        assert_tensors_close(got["initial"], ref["initial"], f"{name} rank {rank} init", rtol=0,
                             atol=0.0)
        adam_bound = {k: LR / EPS * sum((g[k] - r[k]).abs().max().item()
                                        for g, r in zip(got["grads"], ref["grads"])) + 1e-7
                      for k in ref["weights"]}
        assert_tensors_close(got["weights"], ref["weights"], f"{name} rank {rank} weight",
                             atol=adam_bound)


def test_replicas_hold_identical_weights(layout):
    """Replicated parameters (norms, embeddings, heads) stay bit-identical on every rank."""
    name, _, results = layout
    for variant in VARIANTS:
        first = results[variant][0]["weights"]
        for rank, got in enumerate(results[variant][1:], 1):
            for key, value in first.items():
                assert torch.equal(got["weights"][key], value), f"{name} {variant} {key} rank {rank}"


def test_serial_reference_really_trains():
    """Guard against a vacuous comparison: the reference's weights move and its two
    steps see different batches."""
    ref = serial("vit22b")
    initial = train_steps(serial_state(), debug_config("vit22b"), steps=0)["weights"]
    moved = [k for k in initial if not torch.equal(initial[k], ref["weights"][k])]
    assert len(moved) == len(initial)
    assert ref["loss"][0] != ref["loss"][1]


# --- collective counts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp2_collectives():
    jobs = {bt: (block_collectives, (bt,)) for bt in ("parallel", "sequential")}
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
        assert got["forward"][0] == {("tp", "all_reduce"): 2}
        assert got["backward"][0] == {("tp", "all_reduce"): 2}


def test_training_step_communication(layout):
    """Per step on TP: one all-reduce per block each way per micro-batch, one for the
    QK-norm partial gradients and one for the grad norm (the GAP head adds none); on DP:
    one gradient all-reduce and one for the logged loss."""
    name, tp, results = layout
    got = results["gap"][0]["comm"]  # GAP head: no TP collectives outside the blocks
    world = LAYOUTS[name][0]
    dp = world // tp
    micro = 8 // (2 * dp)
    layers = 2
    if tp > 1:
        assert got["tp.all_reduce"] == 2 * (micro * layers * 2 + 1 + 1)
    else:
        assert "tp.all_reduce" not in got
    if dp > 1:
        assert got["dp.all_reduce"] == 2 * 2  # gradients + loss, per step
    else:
        assert "dp.all_reduce" not in got
