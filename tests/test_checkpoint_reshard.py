"""Model weights saved at one layout load at another (megavit/checkpointing/model_state.py):
written at TP=2 x PP=2 after a training step, read at DP=2, TP=4, PP=4 with virtual stages
and in one process, each bit-identical to what was saved; a shape mismatch is refused before
anything is read."""

from __future__ import annotations

import pytest
import torch

from megavit.checkpointing.model_state import CheckpointLoadError, load_model, save_model
from megavit.parallel.sharding import full_state
from megavit.parallel.state import ParallelState, serial_state
from megavit.tasks.classification import classification_run
from tests.harness import run_distributed
from tests.scenarios import debug_config, merge_stages

LAYERS = 4


def _trained(pstate: ParallelState, path: str, parallel: dict) -> dict:
    run = classification_run(debug_config(parallel=parallel, layers=LAYERS,
                                         tp=pstate.tp.size), pstate)
    run.step(0, next(iter(run.batches(0, 1))))
    save_model(run.model, pstate, path)
    return full_state(run.model, pstate.tp)


def _loaded(pstate: ParallelState, path: str, parallel: dict, model: dict | None = None) -> dict:
    run = classification_run(debug_config(parallel=parallel, layers=LAYERS, model=model,
                                         tp=pstate.tp.size), pstate)
    load_model(run.model, pstate, path)
    return full_state(run.model, pstate.tp)


def _merged(results: list[dict], stages: list[list[int]]) -> dict:
    return merge_stages([{"initial": r, "weights": r, "grads": [], "loss": [], "grad_norm": []}
                         for r in results], stages[0])["weights"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "model")
    results = run_distributed(4, 2, {"s": (_trained, (path, {"pipeline_model_parallel_size": 2}))},
                              pp=2)["s"]
    return path, _merged(results, [[0, 2]])


@pytest.mark.parametrize("world,tp,pp,parallel", [
    (2, 1, 1, {}),                                                     # DP=2
    (4, 4, 1, {}),                                                     # TP=4
    (4, 1, 4, {"pipeline_model_parallel_size": 4}),                    # PP=4
    (2, 1, 2, {"pipeline_model_parallel_size": 2,                      # PP=2, 2 virtual
               "num_layers_per_virtual_pipeline_stage": 1}),
], ids=["dp2", "tp4", "pp4", "pp2_virtual"])
def test_weights_load_at_another_layout(saved, world, tp, pp, parallel):
    path, expected = saved
    results = run_distributed(world, tp, {"l": (_loaded, (path, parallel))}, pp=pp)["l"]
    column = world // pp
    got = _merged(results, [[k * column for k in range(pp)]])
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        assert torch.equal(got[name], w), name


def test_weights_load_in_one_process(saved):
    path, expected = saved
    got = _loaded(serial_state(), path, {})
    for name, w in expected.items():
        assert torch.equal(got[name], w), name


def test_a_shape_mismatch_is_refused_before_anything_is_read(saved):
    path, _ = saved
    cfg = debug_config(layers=LAYERS, model={"ffn_hidden_size": 64})
    run = classification_run(cfg, serial_state())
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    with pytest.raises(CheckpointLoadError, match=r"do not fit this model, nothing was "
                       r"loaded: .*shaped differently \(blocks.0.in_proj.bias \[128\] "
                       r"\(model: \[64\]\)"):
        load_model(run.model, serial_state(), path)
    for n, p in run.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was changed by a refused load"


def test_missing_directory_is_a_clear_error(tmp_path):
    run = classification_run(debug_config(), serial_state())
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_model(run.model, serial_state(), tmp_path / "nothing")
