"""timm's parallel-block ViT <-> megavit, checked by the real timm classes (random init
offline; nothing is downloaded).

timm imports torchvision, which loads only beside torch 2.14.1 here, so the timm half runs in
the timm venv (`make test` builds it: .venv-timm, or $MEGAVIT_TIMM_PYTHON) through
tests/timm_side.py; tensors cross over as safetensors files. Checked:
- random timm models (a ViT-22B-like one: MAP head, LayerNorm with biases, QK-norm, MLP
  bias; an "xp"-like one: RMSNorm, pre-norm, class token with a position row, QKV bias, no
  output-projection bias) -> tools/import_hf.py -> megavit at TP=2 x PP=2 (gloo) evaluates
  the held-out digits as timm does -> tools/export_hf.py --format timm -> timm's
  `create_model('local-dir:...', pretrained=True)` (strict) and transformers'
  TimmWrapperForImageClassification give the original logits;
- a parallel-block ViT trained by megavit on digits exports and timm predicts its classes;
- refusals: a sequential-block model, timm settings megavit has no equivalent for (each
  named), a missing tensor, a shape that contradicts the config.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_checkpoint_cli import ROOT
from tests.test_export_hf import _export, _run, assert_evaluates_at_tp2_pp2_like

TIMM_PYTHON = Path(os.environ.get("MEGAVIT_TIMM_PYTHON", Path(ROOT) / ".venv-timm/bin/python"))

DIGITS = {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 32,
          "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
VIT22B_LIKE = {"model_name": "vit_base_patch16_xp_224", **DIGITS, "global_pool": "map",
               "class_token": False, "pre_norm": False, "norm_layer": "layernorm",
               "qkv_bias": False, "qk_norm": True, "proj_bias": True, "fc_norm": False}
XP_LIKE = {"model_name": "vit_base_patch16_xp_224", **DIGITS, "no_embed_class": False,
           "qkv_bias": True, "proj_bias": False,   # registered: RMSNorm, pre-norm, cls token
           "act_layer": "gelu_tanh"}


@pytest.fixture(scope="module")
def timm_side(tmp_path_factory):
    """`timm_side(command, *args)`: tests/timm_side.py's make / run in one process of the timm
    venv for the whole module (importing torch, timm and transformers there takes longer
    than anything it does); each command must succeed."""
    if not TIMM_PYTHON.is_file():
        pytest.fail(f"{TIMM_PYTHON} missing: `make test` creates the timm venv (timm needs "
                    "torchvision, which loads only beside torch 2.14.1 here); or set "
                    "MEGAVIT_TIMM_PYTHON")
    log = tmp_path_factory.mktemp("timm_side") / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([str(TIMM_PYTHON), str(Path(ROOT) / "tests/timm_side.py"),
                                 "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    def call(*args: str) -> None:
        proc.stdin.write(json.dumps(args) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        answer = proc.stdout.readline() if ready else ""
        assert answer, f"the timm side gave no answer to {args}:\n{log.read_text()[-5000:]}"
        assert json.loads(answer) == "ok", json.loads(answer)

    yield call
    proc.kill()      # nothing to finish: every answer has been read
    proc.wait()


def _heldout():
    from megavit.config import ModelConfig
    from megavit.data.datasets import load_digits

    return load_digits(ModelConfig(img_h=8, img_w=8, num_channels=1))[1]


@pytest.mark.parametrize("args", [VIT22B_LIKE, XP_LIKE], ids=["vit22b-like", "xp-like"])
def test_timm_round_trip_through_megavit_at_tp2_pp2(tmp_path, timm_side, args):
    heldout = _heldout()
    save_file({"images": heldout.images.contiguous()}, str(tmp_path / "images.safetensors"))
    timm_side("make", str(tmp_path / "timm"), json.dumps(args),
              str(tmp_path / "images.safetensors"), str(tmp_path / "original.safetensors"))
    logits = load_file(str(tmp_path / "original.safetensors"))["timm"]

    proc = _run("tools/import_hf.py", "--input", str(tmp_path / "timm"), "--save",
                str(tmp_path / "ck"), "--tensor-model-parallel-size", "2", "--buffer-mb", "0.05")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "imported | timm vit_base_patch16_xp_224 | tp 2" in proc.stdout
    assert "import | tensors" in proc.stdout                       # batches, with progress
    flags = proc.stdout.split("model flags: ")[1].split()
    assert_evaluates_at_tp2_pp2_like(flags, tmp_path / "ck", logits, heldout.labels)

    proc = _export(tmp_path / "ck", tmp_path / "back", fmt="timm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    timm_side("run", str(tmp_path / "back"), str(tmp_path / "images.safetensors"),
              str(tmp_path / "again.safetensors"))
    again = load_file(str(tmp_path / "again.safetensors"))
    for key in ("timm", "wrapper"):
        torch.testing.assert_close(again[key], logits, rtol=1e-5, atol=1e-5)


def _megavit_vs_timm(tmp_path: Path, timm_side, flags: list[str], iters: int):
    """Train megavit on digits, export to timm; (megavit's held-out logits, timm's and the
    transformers wrapper's, the labels)."""
    from megavit.checkpointing.offline import read_config
    from megavit.checkpointing.model_state import load_state, model_state_dict
    from megavit.models.vit import build_vit
    from megavit.parallel.state import serial_state

    proc = _run("-m", "megavit.pretrain", *flags, "--dataset", "digits", "--img-h", "8",
                "--img-w", "8", "--num-channels", "1", "--patch-dim", "2",
                "--micro-batch-size", "64", "--global-batch-size", "64", "--lr", "1e-2",
                "--lr-warmup-iters", "20", "--clip-grad", "1.0", "--train-iters", str(iters),
                "--progress-bar", "off", "--save", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _export(tmp_path / "ck", tmp_path / "timm", "--buffer-mb", "0.02", fmt="timm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"exported | timm VisionTransformer (ParallelScalingBlock) | iteration {iters}" \
        in proc.stdout

    heldout = _heldout()
    save_file({"images": heldout.images.contiguous()}, str(tmp_path / "images.safetensors"))
    timm_side("run", str(tmp_path / "timm"), str(tmp_path / "images.safetensors"),
              str(tmp_path / "out.safetensors"))
    theirs = load_file(str(tmp_path / "out.safetensors"))
    checkpoint = tmp_path / "ck" / f"iter_{iters:07d}"
    _, cfg = read_config(checkpoint)
    ours = build_vit(cfg, serial_state().tp, seed=1)
    load_state({f"model/{k}": v for k, v in model_state_dict(ours, serial_state()).items()},
               checkpoint, serial_state(), "model")
    with torch.no_grad():
        expected = ours.eval()(heldout.images)
    return expected, theirs, heldout.labels


def test_megavit_trained_parallel_vit_exports_to_timm_with_its_classes(tmp_path, timm_side):
    """The ViT-22B block and MAP head (vit-debug), trained for 300 iterations on digits:
    69.4 % held-out accuracy measured (OMP_NUM_THREADS=1). The point is that timm gives
    megavit's logits; "it learned" only asks for clearly more than chance (10 %)."""
    expected, theirs, labels = _megavit_vs_timm(tmp_path, timm_side, ["--preset", "vit-debug"],
                                                300)
    assert (expected.argmax(-1) == labels).float().mean() > 0.5   # it learned
    for key in ("timm", "wrapper"):
        assert (theirs[key] - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6
        assert torch.equal(theirs[key].argmax(-1), expected.argmax(-1))


def test_megavit_options_export_to_timm(tmp_path, timm_side):
    """RMSNorm, a pre-norm (timm's patch projection has no bias then: megavit's, trained
    away from 0, moves into the position table), a class token, QKV bias, no MLP bias, the
    tanh GELU."""
    flags = ["--preset", "vit-debug", "--normalization", "rmsnorm", "--pre-norm",
             "--pooling", "cls", "--add-qkv-bias", "--no-add-mlp-bias", "--add-proj-bias",
             "--activation", "gelu_tanh"]
    expected, theirs, _ = _megavit_vs_timm(tmp_path, timm_side, flags, 5)
    for key in ("timm", "wrapper"):
        assert (theirs[key] - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6


def test_timm_refusals_name_what_does_not_map(tmp_path):
    """Checked in-process (the CLI's exit status 2 is checked once, at the end)."""
    from megavit.checkpointing.offline import ConvertError
    from megavit.interop.export_hf import export_plan
    from megavit.interop.import_hf import import_directory
    from megavit.interop.timm_vit import model_config_of, timm_config
    from megavit.config import ModelConfig

    # megavit -> timm: a sequential-block ViT, a two-tower model
    sequential = ModelConfig(block_type="sequential", norm_epsilon=1e-5)
    with pytest.raises(ConvertError) as e:
        export_plan("timm", {"model": {}}, sequential, None)
    for difference in ("--block-type is 'sequential'", "--norm-epsilon is 1e-05"):
        assert difference in str(e.value)
    with pytest.raises(ConvertError, match="a two-tower checkpoint"):
        export_plan("timm", {"model": {}, "text": {}}, sequential, None)

    # timm -> megavit: directories made offline (config and tensors), no timm needed
    cfg = model_config_of({"architecture": "vit_base_patch16_xp_224",
                           "model_args": {k: v for k, v in VIT22B_LIKE.items()
                                          if k != "model_name"}})
    config = timm_config(cfg)
    plan = export_plan("timm", {"model": {}}, cfg, None)
    tensors = {e.name: torch.randn(e.shape) for e in plan.entries}

    def directory(name: str, config: dict, tensors: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        return tmp_path / name

    def refused(path: Path, *needles: str) -> None:
        with pytest.raises(ConvertError) as e:
            import_directory(path, tmp_path / "ck", report=lambda line: None)
        for needle in needles:
            assert needle in str(e.value), (needle, str(e.value))
        assert not (tmp_path / "ck").exists()

    args = config["model_args"]
    refused(directory("extras", {**config, "model_args": {
        **args, "reg_tokens": 1, "init_values": 1e-5, "act_layer": "silu", "fc_norm": True}},
        tensors), "reg_tokens 1", "init_values 1e-05", "act_layer 'silu'", "fc_norm")
    refused(directory("unknown", {**config, "model_args": {**args, "fuse_out_proj": True}},
                      tensors), "model_args fuse_out_proj")
    refused(directory("token", {**config, "model_args": {**args, "class_token": True}},
                      tensors), "class_token True with global_pool 'map'")
    refused(directory("arch", {**config, "architecture": "vit_pwee_patch16_reg1_gap_256"},
                      tensors), "architecture 'vit_pwee_patch16_reg1_gap_256'")
    refused(directory("missing", config, {k: v for k, v in tensors.items()
                                          if k != "blocks.2.mlp_bias"}),
            "blocks.2.mlp_bias missing")
    refused(directory("shape", {**config, "model_args": {**args, "mlp_ratio": 3.0}}, tensors),
            "blocks.0.in_proj.weight would be [160, 32]", "the config says [192, 32]")
    refused(directory("width", {**config, "model_args": {**args, "embed_dim": 48}}, tensors),
            "cannot be made from", "the tensors do not fit config.json")
    refused(directory("extra", config, {**tensors, "blocks.0.ls.gamma": torch.ones(32)}),
            "blocks.0.ls.gamma")
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{not json")
    save_file(tensors, str(tmp_path / "bad_json" / "model.safetensors"))
    refused(tmp_path / "bad_json", "config.json: not JSON")

    good = directory("good", config, tensors)
    assert import_directory(good, tmp_path / "taken", report=lambda line: None)
    proc = _run("tools/import_hf.py", "--input", str(good), "--save", str(tmp_path / "taken"))
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_square_timm_model_imports_and_exports(tmp_path, timm_side):
    """12x8 images (6 x 4 patches, row-major in both libraries), no classifier: megavit's
    serial features equal timm's, and the export gives them back."""
    from megavit.checkpointing.offline import read_config
    from megavit.checkpointing.model_state import load_state, model_state_dict
    from megavit.models.vit import build_vit
    from megavit.parallel.state import serial_state

    args = {**VIT22B_LIKE, "img_size": [12, 8], "num_classes": 0}
    images = torch.randn(5, 1, 12, 8)
    save_file({"images": images}, str(tmp_path / "images.safetensors"))
    timm_side("make", str(tmp_path / "timm"), json.dumps(args),
              str(tmp_path / "images.safetensors"), str(tmp_path / "original.safetensors"))
    features = load_file(str(tmp_path / "original.safetensors"))["timm"]
    proc = _run("tools/import_hf.py", "--input", str(tmp_path / "timm"), "--save",
                str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--img-h 12 --img-w 8" in proc.stdout and "--num-classes 0" in proc.stdout
    checkpoint = tmp_path / "ck" / "iter_0000000"
    _, cfg = read_config(checkpoint)
    ours = build_vit(cfg, serial_state().tp, seed=1)
    load_state({f"model/{k}": v for k, v in model_state_dict(ours, serial_state()).items()},
               checkpoint, serial_state(), "model")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), features, rtol=1e-5, atol=1e-5)
    assert _export(tmp_path / "ck", tmp_path / "back", fmt="timm").returncode == 0
    timm_side("run", str(tmp_path / "back"), str(tmp_path / "images.safetensors"),
              str(tmp_path / "again.safetensors"))
    again = load_file(str(tmp_path / "again.safetensors"))
    for key in ("timm", "wrapper"):
        torch.testing.assert_close(again[key], features, rtol=1e-5, atol=1e-5)
