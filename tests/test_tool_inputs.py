"""Wrong inputs to the tools and the entry points end in one message naming the flag or file,
exit status 2 (130 for Ctrl-C), no traceback, and nothing half-written (issue 16's sweep).
Each tool's main(argv) runs in this process on tiny inputs; the checkpoints are the
committed fixtures (tests/fixtures/: a vit-debug classifier and a CLIP model, 8x8 grey)."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "tests" / "fixtures" / "classifier_zero1"
CLIP = ROOT / "tests" / "fixtures" / "clip"


@functools.cache
def tool(name: str):
    """tools/NAME.py as a module (its main(argv) runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"tool_inputs_{name}",
                                                  ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, *argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of tools/NAME.py's main(argv); argparse's exits included."""
    try:
        status = tool(name).main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((torch.arange(64).reshape(8, 8) * value % 256).byte().numpy()).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An image folder (one/, two/: three 8x8 PNGs each) whose two/1.png does not decode."""
    root = tmp_path_factory.mktemp("folder") / "val"
    for c, name in enumerate(("one", "two")):
        for k in range(3):
            png(root / name / f"{k}.png", 3 + 2 * c + k)
    (root / "two" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, Path]:
    """Copies of the fixtures: megavit_config.json not JSON, not UTF-8, a list; data files
    with flipped bytes (the classifier and the CLIP model)."""
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for kind, text in (("not_json", b"{not json"), ("not_utf8", b"\xff\xfe\x00{"),
                       ("a_list", b"[1, 2]")):
        out[kind] = shutil.copytree(CLASSIFIER, root / kind)
        (out[kind] / "iter_0000002" / "megavit_config.json").write_bytes(text)
    for kind, source in (("corrupt", CLASSIFIER), ("corrupt_clip", CLIP)):
        out[kind] = shutil.copytree(source, root / kind)
        for data in (out[kind] / "iter_0000002").glob("*.distcp"):
            raw = bytearray(data.read_bytes())
            for i in range(64, len(raw), 512):
                raw[i] ^= 0xFF
            data.write_bytes(bytes(raw))
    return out


# ---------------------------------------------------------------------------------------
# checkpoints: damaged, corrupt, or not checkpoints at all
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,what", [("not_json", "unreadable (Expecting property name"),
                                       ("not_utf8", "unreadable ('utf-8' codec"),
                                       ("a_list", "not a megavit checkpoint description")])
def test_a_damaged_megavit_config_is_named_by_every_tool(kind, what, damaged, tmp_path,
                                                         capsys):
    config = damaged[kind] / "iter_0000002" / "megavit_config.json"
    for name, argv in (("checkpoint_inspect", [damaged[kind]]),
                       ("checkpoint_convert", [damaged[kind], "--to-safetensors",
                                               tmp_path / "w.safetensors"]),
                       ("export_hf", ["--load", damaged[kind], "--format", "timm",
                                     "--output", tmp_path / "out"]),
                       ("zero_shot", [damaged[kind], "--dataset", "digits"])):
        status, err = run(name, *argv, capsys=capsys)
        assert status == 2 and f"{name}: error: {config}: {what}" in err, (name, err)
    assert list(tmp_path.iterdir()) == []


def test_resuming_from_a_damaged_megavit_config_exits_2(damaged, capsys):
    from megavit.checkpointing.model_config import read_checkpoint_info
    from megavit.checkpointing.model_state import CheckpointLoadError

    with pytest.raises(CheckpointLoadError, match=r"megavit_config.json: unreadable .*load an "
                       "earlier one"):
        read_checkpoint_info(damaged["not_json"] / "iter_0000002")
    from megavit.pretrain import main

    flags = ["--img-h", "8", "--img-w", "8", "--num-channels", "1", "--patch-dim", "2",
             "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--ffn-hidden-size", "64", "--pooling", "gap", "--micro-batch-size", "8",
             "--global-batch-size", "16", "--train-iters", "3", "--progress-bar", "off",
             "--peak-tflops", "1"]
    assert main(flags + ["--load", str(damaged["not_utf8"])]) == 2
    err = capsys.readouterr().err
    assert "megavit_config.json: unreadable ('utf-8' codec" in err and "Traceback" not in err


def test_a_corrupt_data_file_is_named_and_nothing_is_written(damaged, tmp_path, capsys):
    for name, argv in (("checkpoint_convert", [damaged["corrupt"], "--to-safetensors",
                                               tmp_path / "w.safetensors"]),
                       ("checkpoint_convert", [damaged["corrupt"],
                                               "--target-tensor-parallel-size", "2",
                                               "--output", tmp_path / "resharded"]),
                       ("export_hf", ["--load", damaged["corrupt"], "--format", "timm",
                                      "--output", tmp_path / "exported"]),
                       ("zero_shot", [damaged["corrupt_clip"], "--dataset", "digits"])):
        status, err = run(name, *argv, capsys=capsys)
        assert status == 2 and ".distcp: corrupt (" in err, (name, err)
    assert list(tmp_path.iterdir()) == []       # the reshard's --output removed again


def test_a_file_or_another_directory_given_as_a_checkpoint(folder, tmp_path, capsys):
    image = folder / "one" / "0.png"
    status, err = run("checkpoint_inspect", image, capsys=capsys)
    assert status == 2 and f"error: {image}: a file, not a checkpoint directory" in err
    status, err = run("export_hf", "--load", image, "--format", "timm", "--output",
                      tmp_path / "x", capsys=capsys)
    assert status == 2 and f"error: --load {image}: a file, not a checkpoint directory" in err
    status, err = run("checkpoint_convert", folder, "--to-safetensors", tmp_path / "w.st",
                      capsys=capsys)
    assert status == 2 and f"{folder}: neither a checkpoint (no megavit_config.json) nor a " \
        "--save directory" in err and "it holds one/, two/" in err
    status, err = run("zero_shot", tmp_path / "missing", "--dataset", "digits", capsys=capsys)
    assert status == 2 and "neither a checkpoint nor a --save directory with one (no such " \
        "directory)" in err


def test_a_vit_checkpoint_and_a_two_tower_run_differ_by_kind_only():
    from megavit.checkpointing.model_config import model_differences

    vit = json.loads((CLASSIFIER / "iter_0000002" / "megavit_config.json").read_text())
    clip = json.loads((CLIP / "iter_0000002" / "megavit_config.json").read_text())
    assert model_differences(clip, vit, lambda k: False) == \
        ["a two-tower checkpoint, a ViT run here"]
    assert model_differences(vit, clip, lambda k: False) == \
        ["a ViT checkpoint, a two-tower run here"]


# ---------------------------------------------------------------------------------------
# outputs: under a file, already there, interrupted
# ---------------------------------------------------------------------------------------


def test_outputs_under_a_file_exit_2(folder, tmp_path, capsys):
    blocker = tmp_path / "a.png"
    blocker.write_bytes(b"x")
    (tmp_path / "captions.txt").write_text("a digit one\na digit two\n" * 20)
    for name, argv, named in (
            ("checkpoint_convert", [CLASSIFIER, "--target-tensor-parallel-size", "2",
                                    "--output", blocker / "ck"], f"{blocker / 'ck'}"),
            ("make_shards", ["--from", "digits", "--output", blocker / "s"],
             f"--output {blocker / 's'}"),
            ("train_tokenizer", ["--input", tmp_path / "captions.txt", "--output-prefix",
                                 blocker / "spm", "--vocab-size", "20"],
             f"--output-prefix {blocker / 'spm'}")):
        status, err = run(name, *argv, capsys=capsys)
        assert status == 2 and f"{name}: error: {named}: {blocker} is a file, so the" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "captions.txt"]


def test_an_interrupted_reshard_or_image_folder_leaves_nothing(tmp_path, monkeypatch,
                                                               capsys):
    import megavit.checkpointing.reshard as reshard_module
    from PIL import Image

    def interrupted(staging, *args, **kwargs):
        (staging / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(reshard_module, "write_dcp", interrupted)
    status, err = run("checkpoint_convert", CLASSIFIER, "--target-tensor-parallel-size", "2",
                      "--output", tmp_path / "ck", capsys=capsys)
    assert status == 130 and "checkpoint_convert: interrupted; nothing written" in err
    saves = []

    def save(self, *args, **kwargs):
        saves.append(1)
        if len(saves) == 50:
            raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save)
    status, err = run("make_image_folder", "--output", tmp_path / "digits", capsys=capsys)
    assert status == 130 and "make_image_folder: interrupted; nothing written" in err
    assert list(tmp_path.iterdir()) == []


def test_make_image_folder_creates_missing_parents_and_refuses_a_file_on_the_path(
        tmp_path, monkeypatch, capsys):
    """README's `--output data/digits` works where data/ does not exist yet."""
    module = tool("make_image_folder")
    images = torch.zeros(20, 8, 8, dtype=torch.uint8).numpy()
    labels = torch.arange(20) % 10
    monkeypatch.setitem(module.LOADERS, "digits", lambda: (images, labels.numpy()))
    status, err = run("make_image_folder", "--output", tmp_path / "data" / "digits",
                      capsys=capsys)
    assert status in (0, None), err
    assert sorted(p.name for p in (tmp_path / "data" / "digits").iterdir()) == ["train", "val"]
    assert len(list((tmp_path / "data" / "digits").rglob("*.png"))) == 20
    (tmp_path / "afile").write_text("x")
    status, err = run("make_image_folder", "--output", tmp_path / "afile" / "sub" / "digits",
                      capsys=capsys)
    assert status == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err


def test_make_shards_refuses_existing_shards_and_removes_an_unfinished_set(tmp_path,
                                                                          monkeypatch, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "000000.tar").write_bytes(b"keep")
    status, err = run("make_shards", "--from", "digits", "--output", tmp_path / "old",
                      capsys=capsys)
    assert status == 2 and "already holds .tar shards" in err
    status, err = run("make_shards", "--from", "digits", "--csv", "x.csv", "--output",
                      tmp_path / "new", capsys=capsys)
    assert status == 2 and "--csv applies to --from csv (not --from digits)" in err
    make_shards = tool("make_shards")

    def three_then_ctrl_c(*args):
        for i in range(3):
            yield {"__key__": f"{i:08d}", "txt": "a caption", "png": b"png"}
        raise KeyboardInterrupt

    monkeypatch.setattr(make_shards, "digit_samples", three_then_ctrl_c)
    status, err = run("make_shards", "--from", "digits", "--output", tmp_path / "new",
                      "--samples-per-shard", "1", capsys=capsys)
    assert status == 130 and "interrupted; no shard left" in err
    (tmp_path / "empty").mkdir()         # an existing folder stays, without the new shards
    status, _ = run("make_shards", "--from", "digits", "--output", tmp_path / "empty",
                    "--samples-per-shard", "1", capsys=capsys)
    assert status == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old"]
    assert list((tmp_path / "empty").iterdir()) == []
    assert (tmp_path / "old" / "000000.tar").read_bytes() == b"keep"


# ---------------------------------------------------------------------------------------
# zero_shot's images and flags
# ---------------------------------------------------------------------------------------


def test_zero_shot_leaves_out_an_unreadable_image_and_names_it(folder, tmp_path, capsys):
    status = tool("zero_shot").main([str(CLIP), "--image-folder", str(folder),
                                     "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert status == 0 and "Traceback" not in err
    assert f"zero_shot: warning: {folder / 'two' / '1.png'}: cannot read image" in err
    assert "| images 5 | classes 2 | unreadable 1" in out
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"no image")
    status, err = run("zero_shot", CLIP, "--image-folder", tmp_path, capsys=capsys)
    assert status == 2 and f"--image-folder {tmp_path}: none of its 1 images is readable" in err


@pytest.mark.parametrize("argv,message", [
    (["--templates", "{} and {}"], "--templates '{} and {}': needs exactly one {}"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--class-names", ""], "--class-names gives 1 names (some empty) for the 2 class folders"),
    (["--class-names", "a,"], "--class-names gives 2 names (some empty)"),
])
def test_zero_shot_flag_mistakes(argv, message, folder, capsys):
    status, err = run("zero_shot", CLIP, "--image-folder", folder, *argv, capsys=capsys)
    assert status == 2 and message in err


# ---------------------------------------------------------------------------------------
# data files of the other tools and of training
# ---------------------------------------------------------------------------------------


def test_plot_metrics_bad_files_and_outputs(folder, tmp_path, monkeypatch, capsys):
    good = tmp_path / "m.jsonl"
    good.write_text(json.dumps({"iteration": 1, "kind": "train", "loss": 1.0}) + "\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    for argv, message in (([latin1, "--output", tmp_path / "c.png"], "not UTF-8 text"),
                          ([folder, "--output", tmp_path / "c.png"], "a directory, not a "
                                                                     "--metrics-file"),
                          ([good, "--output", tmp_path], "a directory; name the figure file"),
                          ([good, "--output", tmp_path / "c.xyz"], "the suffix names the "
                                                                   "figure format, one of")):
        status, err = run("plot_metrics", *argv, capsys=capsys)
        assert status == 2 and message in err, err
    import matplotlib.figure

    def no_permission(self, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_permission)
    status, err = run("plot_metrics", good, "--output", tmp_path / "c.png", capsys=capsys)
    assert status == 2 and f"--output {tmp_path / 'c.png'}: cannot write (Permission " \
        "denied)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.jsonl", "m.jsonl"]


def test_train_tokenizer_input_and_coverage_mistakes(folder, tmp_path, capsys):
    (tmp_path / "captions.txt").write_text("a digit one\na digit two\n" * 20)
    for argv, message in (
            (["--input", folder / "one" / "0.png"], "a binary file, not text"),
            (["--input", folder], f"--input {folder}: a directory; give a text file"),
            (["--input", tmp_path / "captions.txt", "--character-coverage", "0.5"],
             "--character-coverage 0.5: SentencePiece takes 0.98 to 1.0")):
        status, err = run("train_tokenizer", *argv, "--output-prefix", tmp_path / "tok" / "spm",
                          "--vocab-size", "20", capsys=capsys)
        assert status == 2 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt"]


def test_an_empty_tokenizer_model_is_named_as_empty(tmp_path):
    from megavit.data.tokenizer import Tokenizer, TokenizerError

    (tmp_path / "spm.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"spm.model: an empty file, not a SentencePiece"):
        Tokenizer.load(tmp_path / "spm.model", 8)


def test_shard_pattern_mistakes_are_named(tmp_path):
    from megavit.config import ModelConfig
    from megavit.data.bad_samples import DataError
    from megavit.data.image_text import WebDatasetShards

    model = ModelConfig(img_h=8, img_w=8, num_channels=1, patch_dim=2)
    for k in range(2):
        (tmp_path / f"00000{k}.tar").write_bytes(b"")
    for pattern, message in (
            (f"{tmp_path}/{{000000..000001.tar", "not a shard pattern (Unbalanced braces"),
            (str(tmp_path), f"is a directory; name its shards with a brace pattern such as "
                            f"'{tmp_path}/{{000000..000001}}.tar'"),
            (f"{tmp_path}/*.tar", "wildcards are not expanded")):
        with pytest.raises(DataError, match=None) as e:
            WebDatasetShards(pattern, model)
        assert str(e.value).startswith(f"--image-text-path {pattern}: ") and message in \
            str(e.value)


def test_an_image_folder_error_in_a_loader_worker_is_its_one_message(folder):
    from megavit.config import ModelConfig
    from megavit.data.bad_samples import DataError
    from megavit.data.datasets import ImageFolderDataset
    from megavit.data.sampler import GlobalBatchSampler, train_batches

    model = ModelConfig(img_h=8, img_w=8, num_channels=1, patch_dim=2)
    strict = ImageFolderDataset(folder, ["one", "two"], model, "val", strict=True)
    batches = train_batches(strict, GlobalBatchSampler(6, 6, 0), 0, 1, 0, 1, 6, num_workers=1)
    with pytest.raises(DataError) as e:
        next(batches)
    assert str(e.value).startswith(f"{folder / 'two' / '1.png'}: cannot read image")
    assert "Traceback" not in str(e.value) and "worker" not in str(e.value)


def test_import_hf_input_mistakes(folder, tmp_path, capsys):
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[]")
    (tmp_path / "list" / "model.safetensors").write_bytes(b"")
    for source, message in ((tmp_path / "missing", "no such directory"),
                            (folder / "one" / "0.png", "a file; give the model's directory"),
                            (tmp_path / "list", "config.json: not a model configuration")):
        status, err = run("import_hf", "--input", source, "--save", tmp_path / "ck",
                          capsys=capsys)
        assert status == 2 and message in err, err
    assert not (tmp_path / "ck").exists()
