"""Checkpoints written by earlier code still load and continue exactly.

tests/fixtures/ holds two small checkpoints made by the code of commit 3c6f303 with
tests/fixtures/make_fixtures.sh (the flags below are that script's): a classifier saved
from a ZeRO-1 run at DP=2 and a CLIP two-tower model, both at iteration 2, and the losses
that code logged for iterations 3 and 4 when resuming them at TP=PP=DP=1. Today's code must
accept each `megavit_config.json` as it is, load every tensor, and reproduce those losses:
a refactor that changes the on-disk format, the config sections or the training function
fails here.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests import cli
from tests.test_checkpoint_cli import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
MODEL = ("--img-h 8 --img-w 8 --num-channels 1 --patch-dim 2 --num-layers 2 --hidden-size 32 "
         "--num-attention-heads 4 --ffn-hidden-size 64 --pooling gap").split()
TRAIN = ("--micro-batch-size 8 --global-batch-size 16 --lr 2e-3 --lr-warmup-iters 1 "
         "--lr-decay-style cosine --weight-decay 0.05 --clip-grad 1.0 --seed 11 "
         "--log-interval 1 --progress-bar off --train-iters 4").split()
CLASSIFIER = ["--dataset", "digits", "--augment", "affine", *MODEL, *TRAIN]
CLIP = ["--image-text-data", "digits", "--text-preset", "text-debug", "--loss", "clip",
        *MODEL, *TRAIN, "--micro-batch-size", "16"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Both fixtures resumed to iteration 4 (`python -m megavit.pretrain` and
    `megavit.pretrain_contrastive`, side by side): ({name: {iteration: loss}},
    {name: what it printed})."""
    tmp = tmp_path_factory.mktemp("fixtures")
    args = {"classifier": ("megavit.pretrain", [*CLASSIFIER, "--load",
                                                str(FIXTURES / "classifier_zero1"),
                                                "--metrics-file", str(tmp / "classifier.jsonl")]),
            "clip": ("megavit.pretrain_contrastive", [*CLIP, "--load", str(FIXTURES / "clip"),
                                                      "--metrics-file", str(tmp / "clip.jsonl")])}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGAVIT_CACHE_DIR": str(tmp / "cache")}
    procs = cli.run_parallel(*[cli.start([sys.executable, "-m", module, *flags], cwd=ROOT,
                                         env=env, timeout=300)
                               for module, flags in args.values()])
    out, printed = {}, {}
    for name, proc in zip(args, procs):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = [json.loads(x) for x in (tmp / f"{name}.jsonl").read_text().splitlines()]
        out[name] = {str(r["iteration"]): r["loss"] for r in rows if r["kind"] == "train"}
        printed[name] = proc.stdout
    return out, printed


@pytest.mark.parametrize("name", ["classifier", "clip"])
def test_old_checkpoint_resumes_with_the_same_losses(resumed, name):
    losses, printed = resumed
    expected = json.loads((FIXTURES / "expected_losses.json").read_text())[name]
    assert losses[name].keys() == expected.keys() == {"3", "4"}
    for it, loss in expected.items():
        assert losses[name][it] == pytest.approx(loss, rel=1e-5), (name, it)
    path = FIXTURES / ("classifier_zero1" if name == "classifier" else "clip") / "iter_0000002"
    assert f"loaded checkpoint | iteration 2 | path {path}" in printed[name]
