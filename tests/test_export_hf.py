"""tools/export_hf.py --format transformers, checked by the real class (random init offline;
nothing is downloaded): a sequential-block ViT trained by megavit on digits exports to a
directory that `ViTForImageClassification.from_pretrained` loads with no missing,
unexpected or mismatched tensor, and gives megavit's logits (<= 1e-5) and classes on held-out
digits; the same export from a checkpoint resharded to TP=2 is byte-identical; a ViT-22B-style
model is refused with every difference named, and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.test_checkpoint_cli import ROOT
from tests.test_checkpoint_convert import convert

SEQUENTIAL = ["--dataset", "digits", "--img-h", "8", "--img-w", "8", "--num-channels", "1",
              "--patch-dim", "2", "--num-layers", "2", "--hidden-size", "32",
              "--num-attention-heads", "4", "--ffn-hidden-size", "64",
              "--block-type", "sequential", "--pooling", "cls", "--add-qkv-bias",
              "--add-proj-bias", "--norm-bias", "--no-qk-layernorm",
              "--micro-batch-size", "64", "--global-batch-size", "64", "--lr", "3e-3",
              "--progress-bar", "off"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _export(load, output, *extra) -> subprocess.CompletedProcess:
    return _run("tools/export_hf.py", "--load", str(load), "--format", "transformers",
                "--output", str(output), *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    proc = _run("-m", "megavit.pretrain", *SEQUENTIAL, "--train-iters", "60",
                "--save", str(base / "ck"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return base


def test_exported_vit_loads_strictly_and_predicts_like_megavit(trained):
    from transformers import ViTForImageClassification    # a test dependency (setup.cfg)

    from megavit.checkpointing.convert import read_config
    from megavit.checkpointing.model_state import load_state, model_state_dict
    from megavit.data.datasets import load_digits
    from megavit.models.vit import build_vit
    from megavit.parallel.state import serial_state

    out = trained / "hf"
    proc = _export(trained / "ck", out, "--buffer-mb", "0.01")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exported | transformers ViTForImageClassification | iteration 60" in proc.stdout
    theirs, info = ViTForImageClassification.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]

    checkpoint = trained / "ck" / "iter_0000060"
    _, cfg = read_config(checkpoint)
    ours = build_vit(cfg, serial_state().tp, seed=1)
    load_state({f"model/{k}": v for k, v in model_state_dict(ours, serial_state()).items()},
               checkpoint, serial_state(), "model")
    images = load_digits(cfg)[1].images[:128]                 # held-out digits
    with torch.no_grad():
        expected = ours.eval()(images)
        got = theirs.eval()(pixel_values=images).logits
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item() + 1e-6
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert expected.argmax(-1).unique().numel() > 1           # a trained, not constant, model

    resharded = trained / "tp2"
    assert convert(str(trained / "ck"), "--target-tensor-parallel-size", "2", "--output",
                   str(resharded)).returncode == 0
    assert _export(resharded, trained / "hf_tp2").returncode == 0
    assert (trained / "hf_tp2" / "model.safetensors").read_bytes() == \
        (out / "model.safetensors").read_bytes()


def test_a_model_that_does_not_map_is_refused_naming_every_difference(tmp_path, trained):
    proc = _run("-m", "megavit.pretrain", "--preset", "vit-debug", "--num-channels", "1",
                "--img-h", "16", "--img-w", "16", "--micro-batch-size", "8",
                "--global-batch-size", "8", "--train-iters", "1", "--progress-bar", "off",
                "--save", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stderr
    bad = _export(tmp_path / "ck", tmp_path / "hf")
    assert bad.returncode == 2
    for difference in ("--block-type is 'parallel'", "--pooling is 'map'",
                       "--qk-layernorm is True", "--add-qkv-bias is False", "--norm-bias is False"):
        assert difference in bad.stderr, (difference, bad.stderr)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
    taken = _export(trained / "ck", trained)            # an existing directory
    assert taken.returncode == 2 and "exists; choose a new directory" in taken.stderr
