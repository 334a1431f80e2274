"""Sequence parallelism and recomputation beyond the end-to-end equivalence runs in
test_tensor_parallel.py: collectives of one block, recomputation really recomputing, and
dropout streams reproduced by recomputation."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed
from tests.scenarios import block_collectives

AG, RS, AR = ("tp", "all_gather"), ("tp", "reduce_scatter"), ("tp", "all_reduce")


@pytest.fixture(scope="module")
def sp_blocks():
    jobs = {f"{bt}-{mode}": (block_collectives, (bt, mode))
            for bt in ("parallel", "sequential") for mode in ("keep", "regather")}
    return run_distributed(2, 2, jobs)


def test_parallel_block_with_sp_gathers_and_scatters_once_each_way(sp_blocks):
    """Forward: all-gather entering in_proj, reduce-scatter leaving out_proj; backward the
    conjugates; no all-reduce. Bytes: the full [s, b, h] activation for each."""
    for got in sp_blocks["parallel-keep"]:
        act = got["activation_bytes"]
        assert got["forward"] == ({AG: 1, RS: 1}, {AG: act, RS: act})
        assert got["backward"] == ({AG: 1, RS: 1}, {AG: act, RS: act})


def test_regather_adds_one_all_gather_backward(sp_blocks):
    for got in sp_blocks["parallel-regather"]:
        act = got["activation_bytes"]
        assert got["forward"] == ({AG: 1, RS: 1}, {AG: act, RS: act})
        assert got["backward"] == ({AG: 2, RS: 1}, {AG: 2 * act, RS: act})


def test_sequential_block_with_sp(sp_blocks):
    for mode, extra in (("keep", 0), ("regather", 2)):
        for got in sp_blocks[f"sequential-{mode}"]:
            assert got["forward"][0] == {AG: 2, RS: 2}
            assert got["backward"][0] == {AG: 2 + extra, RS: 2}
            assert AR not in got["forward"][0] and AR not in got["backward"][0]


# --- recomputation ------------------------------------------------------------------------

from megavit.config import preset_model_config  # noqa: E402
from megavit.models import transformer  # noqa: E402
from megavit.models.transformer import Runtime  # noqa: E402
from megavit.models.vit import build_vit  # noqa: E402
from megavit.parallel.random import MODEL_PARALLEL, RNGTracker  # noqa: E402
from megavit.parallel.state import serial_state  # noqa: E402
from tests.scenarios import debug_config, train_steps  # noqa: E402


@pytest.mark.parametrize("granularity,method,n,blocks,cores", [
    (None, None, 1, 4, 4),            # 4 blocks, each run once
    ("selective", None, 1, 4, 8),     # attention cores run again in backward
    ("full", "uniform", 2, 8, 8),     # every block again (2 chunks of 2)
    ("full", "block", 1, 5, 5),       # only the first block again
    ("full", "block", 3, 7, 7),
])
def test_recomputation_really_recomputes(monkeypatch, granularity, method, n, blocks, cores):
    calls = {"block": 0, "core": 0}
    block_forward, core = transformer.ParallelBlock.forward, transformer.AttentionCore.core

    def counted_block(self, *a):
        calls["block"] += 1
        return block_forward(self, *a)

    def counted_core(self, *a):
        calls["core"] += 1
        return core(self, *a)

    monkeypatch.setattr(transformer.ParallelBlock, "forward", counted_block)
    monkeypatch.setattr(transformer.AttentionCore, "core", counted_core)
    cfg = preset_model_config("vit-debug", num_layers=4, num_classes=10)
    rt = Runtime(serial_state().tp, recompute_granularity=granularity, recompute_method=method,
                 recompute_num_layers=n)
    model = build_vit(cfg, rt, seed=0)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert (calls["block"], calls["core"]) == (blocks, cores)
    assert all(p.grad is not None for p in model.parameters())


DROPOUT = {"hidden_dropout": 0.2, "attention_dropout": 0.2}
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1},
}


def _dropout_runs(pstate, tp: int, sp: bool) -> dict:
    runs = {name: train_steps(pstate, debug_config(
        "vit22b", tp=tp, model=DROPOUT, parallel={**extra, "sequence_parallel": sp}))
        for name, extra in RECOMPUTE.items()}
    runs_without = train_steps(pstate, debug_config("vit22b", tp=tp,
                                                    parallel={"sequence_parallel": sp}))
    return {"runs": runs, "no_dropout_loss": runs_without["loss"]}


def _assert_identical(runs: dict) -> None:
    ref = runs["none"]
    for name, got in runs.items():
        assert got["loss"] == ref["loss"], name
        for step in range(2):
            for k, g in ref["grads"][step].items():
                assert torch.equal(got["grads"][step][k], g), f"{name} step {step} {k}"


def test_recomputed_dropout_draws_the_same_masks_serial():
    got = _dropout_runs(serial_state(), 1, False)
    _assert_identical(got["runs"])
    assert got["runs"]["none"]["loss"][0] != got["no_dropout_loss"][0]   # dropout acted


def test_recomputed_dropout_draws_the_same_masks_tp2_sp():
    """Under SP the hidden dropout is on sequence shards (model-parallel stream), the
    attention dropout on each rank's heads: recomputation must restore both streams."""
    results = run_distributed(2, 2, {"runs": (_dropout_runs, (2, True))})["runs"]
    for got in results:
        _assert_identical(got["runs"])
        assert got["runs"]["none"]["loss"][0] != got["no_dropout_loss"][0]


def _replicated_dropout(pstate) -> dict:
    return train_steps(pstate, debug_config("vit22b", tp=2, model=DROPOUT))


def test_dropout_on_replicated_activations_keeps_replicas_identical():
    """Without SP the block outputs are replicated over TP: both ranks must draw the same
    hidden-dropout masks (default stream), or the replicated weights would drift apart."""
    ranks = run_distributed(2, 2, {"d": (_replicated_dropout, ())})["d"]
    assert ranks[0]["loss"] == ranks[1]["loss"]
    for k, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][k]), k
    plain = train_steps(serial_state(), debug_config("vit22b"))
    assert ranks[0]["loss"][0] != plain["loss"][0]


def test_rng_streams_per_tp_rank():
    a = RNGTracker(seed=5, tp_rank=0, device=torch.device("cpu"))
    default_a = torch.rand(4)
    with a.fork(MODEL_PARALLEL):
        mp_a = torch.rand(4)
    b = RNGTracker(seed=5, tp_rank=1, device=torch.device("cpu"))
    default_b = torch.rand(4)
    with b.fork(MODEL_PARALLEL):
        mp_b = torch.rand(4)
    assert torch.equal(default_a, default_b)          # replicated activations: same masks
    assert not torch.equal(mp_a, mp_b)                # sharded activations: own masks
    states = b.get_states()
    with b.fork(MODEL_PARALLEL):
        first = torch.rand(4)
    with b.fork(MODEL_PARALLEL):
        assert not torch.equal(torch.rand(4), first)  # the stream advances
    b.set_states(states)
    with b.fork(MODEL_PARALLEL):
        assert torch.equal(torch.rand(4), first)      # and restores


def test_full_recompute_gives_gradients_even_when_no_input_needs_one():
    """Frozen embeddings: the blocks' input needs no gradient, the blocks' weights do."""
    cfg = preset_model_config("vit-debug", num_classes=10)
    for rt in (Runtime(serial_state().tp), Runtime(serial_state().tp, recompute_granularity="full",
                                                    recompute_method="uniform",
                                                    recompute_num_layers=1)):
        model = build_vit(cfg, rt, seed=0)
        for p in model.patch_embed.parameters():
            p.requires_grad_(False)
        model.pos_embed.weight.requires_grad_(False)
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("blocks.")}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_recompute_passes_non_tensor_outputs_and_arguments():
    from megavit.parallel.recompute import recompute

    x = torch.randn(3, requires_grad=True)
    y, label = recompute(lambda t, scale, tag: (t * scale, tag), x, 2.0, "ok")
    assert label == "ok"
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
