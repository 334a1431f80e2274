"""Inputs a new user got wrong end in one clear message (exit status 2, nothing written),
and the tools say what they found (issue 16's list; in-process, one process)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from megavit.checkpointing.checkpointer import save_checkpoint
from megavit.parallel.state import serial_state
from megavit.pretrain import main
from megavit.tasks.classification import ClassificationTask, classification_run
from megavit.training.loop import pretrain
from tests.scenarios import debug_config

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str):
    """tools/NAME.py as a module (its main(argv) runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A --save directory holding a serial vit-debug checkpoint at iteration 2."""
    save = tmp_path_factory.mktemp("bad") / "ck"
    save_checkpoint(classification_run(debug_config(), serial_state()), str(save), 2, 0,
                    lambda line: None)
    return save


@pytest.mark.parametrize("argv,message", [
    (["--tensor-model", "2"], "unrecognized arguments: --tensor-model 2"),
    (["--lr", "nan"], "argument --lr: invalid finite number value: 'nan'"),
    (["--clip-grad", "inf"], "argument --clip-grad: invalid finite number value: 'inf'"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be positive"),
])
def test_flag_mistakes_exit_2(argv, message, capsys):
    assert main(["--preset", "vit-debug", "--dataset", "digits", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_configuration_error_is_printed_once_per_node(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "4")
    for rank, local_rank, printed in ((0, 0, "error: "), (1, 1, ""),
                                      (2, 0, "error (rank 2): "), (3, 1, "")):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert main(["--preset", "vit-debug", "--tensor-model-parallel-size", "3"]) == 2
        err = capsys.readouterr().err
        assert (printed + "the configuration" in err) if printed else err == ""


def test_a_corrupt_checkpoint_is_named_as_corrupt(checkpoint, tmp_path):
    from megavit.checkpointing.checkpointer import resume
    from megavit.checkpointing.safe_reader import CorruptCheckpointError

    bad = tmp_path / "ck"
    shutil.copytree(checkpoint, bad)
    data = next((bad / "iter_0000002").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    for i in range(64, len(raw), 512):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=rf"{data.name}: corrupt .* load an "
                       "earlier one"):
        resume(classification_run(debug_config(), serial_state()), str(bad), print)


def test_resuming_a_finished_run_evaluates_and_says_so(checkpoint, capsys):
    cfg = debug_config(train_iters=2)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, load=str(checkpoint))
    cfg.logging = dataclasses.replace(cfg.logging, eval_iters=2)
    summary = pretrain(ClassificationTask(cfg), serial_state())
    out = capsys.readouterr().out
    assert "nothing to train: the checkpoint is at iteration 2 and --train-iters is 2" in out
    assert summary["iteration"] == 2 and summary["trained_iterations"] == 0
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and "images_per_second" not in summary


def test_checkpoint_inspect_prints_pasteable_flags_and_finds_truncated_shards(
        checkpoint, tmp_path, capsys):
    from megavit.config import parse_args

    inspect = tool("checkpoint_inspect")
    assert inspect.main([str(checkpoint)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("model flags: "))
    flags = line[len("model flags: "):].split()
    assert "--qk-layernorm" in flags and "--no-add-qkv-bias" in flags
    saved = json.loads((checkpoint / "iter_0000002" / "megavit_config.json").read_text())
    pasted = dataclasses.asdict(parse_args(flags).model)      # pasted back: the same model,
    assert {k: v for k, v in pasted.items() if "drop" not in k} == \
        {k: v for k, v in saved["model"].items() if "drop" not in k}   # regularisation aside
    cut = tmp_path / "cut"
    shutil.copytree(checkpoint, cut)
    data = next((cut / "iter_0000002").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])
    assert inspect.main([str(cut)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_checkpoint_convert_refuses_an_existing_file_unless_overwrite(checkpoint, tmp_path,
                                                                      capsys):
    convert = tool("checkpoint_convert")
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    assert convert.main([str(checkpoint), "--to-safetensors", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert convert.main([str(checkpoint), "--to-safetensors", str(out), "--overwrite"]) == 0
    assert out.stat().st_size > 1000


def test_tools_refuse_flag_prefixes(checkpoint):
    with pytest.raises(SystemExit) as e:
        tool("checkpoint_convert").parse_args([str(checkpoint), "--target-tensor", "2"])
    assert e.value.code == 2


def _image_folder(root: Path) -> Path:
    """train/ and val/ with 2 classes x 3 PNGs of real digits; train/b/2.png (the last
    file: its replacement wraps around to class a) is corrupt."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for k in range(3):
                pixels = (digits.images[c + 10 * k] * 15).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{k}.png")
    (root / "train" / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_an_undecodable_image_is_skipped_the_same_way_on_every_stage_or_fatal(tmp_path,
                                                                              capsys):
    import torch

    from megavit.config import ModelConfig
    from megavit.data.bad_samples import DataWarning
    from megavit.data.datasets import DataError, image_folder

    root = _image_folder(tmp_path / "images")
    model = ModelConfig(img_h=8, img_w=8, num_channels=1, patch_dim=2)
    train, _ = image_folder(str(root), model)
    indices = torch.tensor([3, 5, 0, 5])          # b/0, b/2 (corrupt), a/0, b/2 again
    with pytest.warns(DataWarning, match=r"b/2\.png: cannot read image .*: skipped"):
        images, labels = train.get(indices)
    assert images.shape == (4, 1, 8, 8) and labels.tolist() == [1, 0, 0, 0]
    assert torch.equal(images[1], images[2])      # replaced by the next readable: a/0
    assert list(train.bad) == [5]
    stage_without_images, _ = image_folder(str(root), model)     # another process's view
    with pytest.warns(DataWarning):
        assert torch.equal(stage_without_images.labels_of(indices), labels)
    strict, _ = image_folder(str(root), model, strict=True)
    with pytest.raises(DataError, match=r"b/2\.png: cannot read image .*drop "
                       "--fatal-data-errors"):
        strict.get(indices)
    argv = ["--dataset", "image-folder", "--data-path", str(root), "--img-h", "8", "--img-w",
            "8", "--num-channels", "1", "--patch-dim", "2", "--preset", "vit-debug",
            "--micro-batch-size", "6", "--global-batch-size", "6", "--train-iters", "1",
            "--num-workers", "0", "--progress-bar", "off", "--peak-tflops", "1"]
    assert main(argv + ["--fatal-data-errors"]) == 2
    assert "b/2.png: cannot read image" in capsys.readouterr().err
    with pytest.warns(DataWarning):
        assert main(argv) == 0


def _folder_steps(pstate, root: str) -> dict:
    """Two training steps on the image folder with its corrupt image (4 blocks)."""
    import warnings

    from megavit.config import DataConfig
    from megavit.data.bad_samples import DataWarning
    from tests.scenarios import train_steps

    cfg = debug_config(layers=4, parallel={"pipeline_model_parallel_size": pstate.pp.size},
                       model=dict(img_h=8, img_w=8, patch_dim=2), micro_batch_size=3,
                       global_batch_size=6)
    cfg.data = DataConfig(dataset="image-folder", data_path=root, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return train_steps(pstate, cfg, steps=3)


def test_replaced_images_keep_their_labels_across_pipeline_stages(tmp_path):
    """The stage that reads labels only gets the first stage's (a replacement's label may
    differ): PP=2 trains exactly as one process on a folder with a corrupt image."""
    from tests.harness import run_distributed

    root = str(_image_folder(tmp_path / "images"))
    ref = _folder_steps(serial_state(), root)
    got = run_distributed(2, 1, {"steps": (_folder_steps, (root,))}, pp=2)["steps"]
    assert got[1]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # per step: the labels handed from the first stage and the loss from the last
    assert got[1]["comm"]["pp.broadcast"] == 2 * 3
