"""Image-text training from files, end to end through the tools a user runs:
tools/make_shards.py writes webdataset shards of the digits, tools/train_tokenizer.py
trains a tokenizer on their captions, and megavit.pretrain_contrastive trains on the shards
(and saves, with the tokenizer beside the tensors). A shard holding an undecodable image is
skipped with a warning naming the shard and the key; --fatal-data-errors stops instead
(exit 2, the same names)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from tests import cli
from tests.test_checkpoint_cli import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(*args: str) -> cli.Started:
    return cli.start([sys.executable, *args], timeout=300, cwd=ROOT, env=ENV)


def _run(*args: str) -> subprocess.CompletedProcess:
    return _start(*args).wait()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    made = _run("tools/make_shards.py", "--from", "digits", "--output", str(base / "s"),
                "--samples-per-shard", "500", "--split", "train")
    assert made.returncode == 0, made.stderr
    assert "wrote 1438 samples in 3 shards" in made.stdout
    from megavit.data.captions import digit_caption_corpus

    (base / "corpus.txt").write_text("\n".join(digit_caption_corpus()) + "\n")
    tok = _run("tools/train_tokenizer.py", "--input", str(base / "corpus.txt"),
               "--output-prefix", str(base / "tok"), "--vocab-size", "64")
    assert tok.returncode == 0, tok.stderr
    import webdataset

    with webdataset.TarWriter(str(base / "s" / "000003.tar")) as sink:   # one bad sample
        sink.write({"__key__": "broken", "png": b"not a png at all", "txt": "the digit 1"})
        good = io.BytesIO()
        from PIL import Image

        Image.new("L", (8, 8), 128).save(good, format="PNG")
        sink.write({"__key__": "fine", "png": good.getvalue(), "txt": "the digit 2"})
    return base


def _start_train(shards, *extra: str) -> cli.Started:
    return _start("-m", "megavit.pretrain_contrastive", "--preset", "vit-debug",
                  "--num-channels", "1", "--img-h", "16", "--img-w", "16",
                  "--text-preset", "text-debug", "--micro-batch-size", "16",
                  "--global-batch-size", "16", "--log-interval", "5", "--progress-bar", "off",
                  "--image-text-data", "shards", "--image-text-path",
                  str(shards / "s" / "{000000..000003}.tar"),
                  "--tokenizer-model", str(shards / "tok.model"), *extra)


def _train(shards, *extra: str) -> subprocess.CompletedProcess:
    return _start_train(shards, *extra).wait()


def test_training_on_shards_with_a_file_tokenizer(shards, tmp_path):
    proc = _train(shards, "--train-iters", "10", "--save", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data: " in proc.stdout and "1440 pairs" in proc.stdout
    assert "tok.model (64 pieces)" in proc.stdout
    assert "[megavit] done | iteration 10 |" in proc.stdout
    assert (tmp_path / "ck" / "iter_0000010" / "tokenizer.model").read_bytes() == \
        (shards / "tok.model").read_bytes()


def test_an_undecodable_sample_is_skipped_or_fatal(shards):
    # iterate long enough to draw every sample once (1440 / 16 = 90 steps)
    proc, fatal = cli.run_parallel(    # independent: side by side
        _start_train(shards, "--train-iters", "90", "--log-interval", "90"),
        _start_train(shards, "--train-iters", "90", "--fatal-data-errors"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "000003.tar" in proc.stderr and "broken" in proc.stderr
    assert fatal.returncode == 2, fatal.stdout + fatal.stderr
    assert "000003.tar" in fatal.stderr and "broken" in fatal.stderr
    assert "Traceback" not in fatal.stderr


def test_loader_workers_do_not_change_what_is_trained(shards, tmp_path):
    """--num-workers 2 reads and tokenizes ahead in other processes; the losses equal the
    in-process reading's."""
    import json

    logs = {}
    started = {workers: _start_train(shards, "--train-iters", "10", "--log-interval", "1",
                                     "--num-workers", workers,
                                     "--metrics-file", str(tmp_path / f"w{workers}.jsonl"))
               for workers in ("0", "2")}              # independent: side by side
    for workers, proc in zip(started, cli.run_parallel(*started.values())):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        metrics = tmp_path / f"w{workers}.jsonl"
        logs[workers] = [json.loads(x)["loss"] for x in metrics.read_text().splitlines()
                         if json.loads(x)["kind"] == "train"]
    assert logs["0"] == logs["2"] and len(logs["0"]) == 10
