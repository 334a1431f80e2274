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

from tests import cli
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
    return cli.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                   cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _export(load, output, *extra, fmt: str = "transformers") -> subprocess.CompletedProcess:
    return _run("tools/export_hf.py", "--load", str(load), "--format", fmt,
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

    from megavit.checkpointing.offline import read_config
    from megavit.checkpointing.model_state import load_state, model_state_dict
    from megavit.data.datasets import load_digits
    from megavit.models.vit import build_vit
    from megavit.parallel.state import serial_state

    out = trained / "hf"
    proc = _export(trained / "ck", out, "--buffer-mb", "0.01")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exported | transformers ViTForImageClassification | iteration 60" in proc.stdout
    assert sum(line.startswith("export | tensors ") for line in proc.stdout.splitlines()) > 3
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


def _hf_vit(tmp_path):
    """A random transformers ViT shaped for the 8x8 digits, saved offline."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=64, image_size=8, patch_size=2, num_channels=1,
                       num_labels=10, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():      # give the class token's position row a value that matters
        model.vit.embeddings.position_embeddings.normal_(0, 0.5)
        model.vit.embeddings.cls_token.normal_(0, 0.5)
    model.save_pretrained(str(tmp_path / "hf"))
    return model


def _eval_loaded(pstate, flags: list[str], save: str) -> dict:
    """megavit at this layout, resumed from the imported checkpoint, evaluated on digits."""
    from megavit.checkpointing.checkpointer import resume
    from megavit.config import parse_args
    from megavit.tasks.classification import classification_run

    run = classification_run(parse_args(flags), pstate)
    assert resume(run, save, lambda line: None) == 0
    return run.evaluate()


def assert_evaluates_at_tp2_pp2_like(flags: list[str], save, logits: torch.Tensor,
                                     labels: torch.Tensor) -> None:
    """megavit.pretrain `flags` (a model), resumed from `save` at TP=2 x PP=2 (4 gloo
    processes), evaluates the 359 held-out digits with the loss (rel 1e-5) and the correct
    count of `logits`."""
    import torch.nn.functional as F

    from tests.harness import run_distributed

    run_flags = flags + ["--dataset", "digits", "--micro-batch-size", "8",
                         "--global-batch-size", "16", "--train-iters", "1",
                         "--tensor-model-parallel-size", "2",
                         "--pipeline-model-parallel-size", "2"]
    got = run_distributed(4, 2, {"e": (_eval_loaded, (run_flags, str(save)))}, pp=2)["e"]
    loss = F.cross_entropy(logits, labels).item()
    correct = (logits.argmax(-1) == labels).sum().item()
    for r in got:
        assert r["eval_images"] == 359
        assert r["eval_loss"] == pytest.approx(loss, rel=1e-5)
        assert round(r["eval_accuracy"] * 359) == correct


def test_transformers_vit_round_trip_through_megavit_at_tp2_pp2(tmp_path):
    """transformers ViT -> import -> megavit at TP=2 x PP=2 (gloo) evaluates the held-out
    digits exactly as the transformers model does -> export -> the class loads it strictly
    and gives the original logits."""
    from transformers import ViTForImageClassification

    from megavit.interop.hf_vit import model_config_of
    from megavit.interop.mapping import model_flags
    from megavit.data.datasets import load_digits

    original = _hf_vit(tmp_path)
    proc = _run("tools/import_hf.py", "--input", str(tmp_path / "hf"),
                "--save", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flags = proc.stdout.split("model flags: ")[1].split()
    import json

    cfg = model_config_of(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert flags == model_flags(cfg)
    heldout = load_digits(cfg)[1]
    with torch.no_grad():
        logits = original(pixel_values=heldout.images).logits
    assert_evaluates_at_tp2_pp2_like(flags, tmp_path / "ck", logits, heldout.labels)

    assert _export(tmp_path / "ck", tmp_path / "back").returncode == 0
    again, info = ViTForImageClassification.from_pretrained(str(tmp_path / "back"),
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(pixel_values=heldout.images).logits, logits,
                                   rtol=1e-5, atol=1e-6)


def test_import_refuses_other_architectures_pickles_and_missing_tensors(tmp_path):
    import json

    _hf_vit(tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    (other / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors")
                                              .read_bytes())
    bad = _run("tools/import_hf.py", "--input", str(other), "--save", str(tmp_path / "a"))
    assert bad.returncode == 2 and "model_type 'deit'; megavit imports" in bad.stderr
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    bad = _run("tools/import_hf.py", "--input", str(pickled), "--save", str(tmp_path / "b"))
    assert bad.returncode == 2 and "a pickle-only checkpoint is not read" in bad.stderr
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors.pop("vit.encoder.layer.1.intermediate.dense.bias")
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(missing / "model.safetensors"))
    bad = _run("tools/import_hf.py", "--input", str(missing), "--save", str(tmp_path / "c"))
    assert bad.returncode == 2 and "vit.encoder.layer.1.intermediate.dense.bias" in bad.stderr
    (missing / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    save_file(tensors, str(missing / "model.safetensors"))
    bad = _run("tools/import_hf.py", "--input", str(missing), "--save", str(tmp_path / "d"))
    assert bad.returncode == 2 and "the config says" in bad.stderr
    for name in "abcd":
        assert not (tmp_path / name / "iter_0000000").exists()


def test_headless_vit_model_round_trip_and_tp_blocks(tmp_path):
    """A transformers ViTModel (no classifier) imports as megavit features (its tanh pooler
    dropped, and said so), stored in TP=2 blocks; megavit's features are the model's
    last_hidden_state[:, 0]; the export loads strictly into ViTModel again."""
    from transformers import ViTConfig, ViTModel

    from megavit.checkpointing.offline import read_config
    from megavit.checkpointing.model_state import load_state, model_state_dict
    from megavit.checkpointing.safe_reader import check_checkpoint
    from megavit.models.vit import build_vit
    from megavit.parallel.state import serial_state

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=8, patch_size=2, num_channels=1,
                       layer_norm_eps=1e-6)
    original = ViTModel(config).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0, 0.3)
    original.save_pretrained(str(tmp_path / "hf"))
    proc = _run("tools/import_hf.py", "--input", str(tmp_path / "hf"), "--save",
                str(tmp_path / "ck"), "--tensor-model-parallel-size", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dropped | 2 tensor(s) megavit has no use for: pooler.dense.bias, " \
           "pooler.dense.weight" in proc.stdout
    assert "--num-classes 0" in proc.stdout
    checkpoint = tmp_path / "ck" / "iter_0000000"
    stored = check_checkpoint(checkpoint).state_dict_metadata
    assert len(stored["model/blocks.0.qkv.weight/0"].chunks) == 2      # one block per TP rank
    assert len(stored["model/blocks.0.norm1.weight"].chunks) == 1      # replicated

    _, cfg = read_config(checkpoint)
    ours = build_vit(cfg, serial_state().tp, seed=1)
    load_state({f"model/{k}": v for k, v in model_state_dict(ours, serial_state()).items()},
               checkpoint, serial_state(), "model")
    images = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        expected = original(pixel_values=images).last_hidden_state[:, 0]
        torch.testing.assert_close(ours.eval()(images), expected, rtol=1e-5, atol=1e-5)

    assert _export(tmp_path / "ck", tmp_path / "back").returncode == 0
    again, info = ViTModel.from_pretrained(str(tmp_path / "back"), add_pooling_layer=False,
                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(pixel_values=images).last_hidden_state[:, 0],
                                   expected, rtol=1e-5, atol=1e-5)


def test_import_memory_is_bounded_by_the_buffer_not_the_model(tmp_path):
    """A ViT-S-sized transformers model (22M parameters, 88 MB; 350 MB of training state
    written): importing in 8 MiB batches grows the process by a fraction of the model, in
    one batch by more than the model."""
    from transformers import ViTConfig, ViTForImageClassification

    from tests.test_checkpoint_convert import rss_growths

    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536, num_labels=10)
    ViTForImageClassification(config).save_pretrained(str(tmp_path / "hf"))
    size = (tmp_path / "hf" / "model.safetensors").stat().st_size
    bounded, unbounded = rss_growths(
        "import_hf", ["--input", str(tmp_path / "hf"), "--save", str(tmp_path / "a"),
                      "--buffer-mb", "8"],
        ["--input", str(tmp_path / "hf"), "--save", str(tmp_path / "b"), "--buffer-mb", "4096"])
    assert bounded < size / 2, (bounded, size)
    assert unbounded > size, (unbounded, size)


def test_imported_vit_is_a_lit_image_tower(tmp_path):
    """A transformers ViT imported by tools/import_hf.py serves as LiT's locked image tower
    (--image-checkpoint; its classifier dropped): megavit's image features are the
    transformers model's normed class token, and a step leaves them unchanged."""
    from megavit.config import parse_contrastive_args, validate_contrastive
    from megavit.parallel.state import serial_state
    from megavit.tasks.image_text.task import image_text_run

    original = _hf_vit(tmp_path)
    proc = _run("tools/import_hf.py", "--input", str(tmp_path / "hf"), "--save",
                str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flags = proc.stdout.split("model flags: ")[1].split()
    at = flags.index("--num-classes")
    image_flags = flags[:at] + flags[at + 2:]             # a two-tower image tower has none
    cfg = parse_contrastive_args(image_flags + [
        "--text-preset", "text-debug", "--loss", "siglip", "--lock-image-tower",
        "--image-checkpoint", str(tmp_path / "ck"), "--micro-batch-size", "8",
        "--global-batch-size", "8", "--train-iters", "1"])
    validate_contrastive(cfg)
    run = image_text_run(cfg, serial_state())
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = original.vit(pixel_values=images).last_hidden_state[:, 0]
        torch.testing.assert_close(run.model.image(images), expected, rtol=1e-5, atol=1e-5)
    text_before = [p.detach().clone() for p in run.model.text.parameters()]
    run.step(0)
    with torch.no_grad():
        torch.testing.assert_close(run.model.image(images), expected, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(text_before, run.model.text.parameters()))
