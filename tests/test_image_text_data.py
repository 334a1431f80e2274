"""Image-text data: captions keyed by (seed, index, iteration), CSV / TSV pairs, webdataset
shards read by index, bad samples skipped the same way in every layout, make_shards."""

from __future__ import annotations

import io
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from megavit.config import preset_model_config
from megavit.data.captions import (CAPTION_TEMPLATES, DIGIT_CLASS_NAMES, ZERO_SHOT_TEMPLATES,
                                   digit_captions, zero_shot_texts)
from megavit.data.datasets import DataError, load_digits
from megavit.data.image_text import (CsvImageText, DataWarning, WebDatasetShards,
                                     _decode_image, build_image_text, build_image_text_data,
                                     captioned_digits, open_image_text)
from megavit.data.sampler import GlobalBatchSampler
from tests import cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = preset_model_config("vit-debug", num_channels=1)    # 16 x 16 grey


def png(seed: int, side: int = 24) -> bytes:
    """A noise image (distinct per seed, large enough that cutting it hits pixel data)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Captions of the embedded digits
# ---------------------------------------------------------------------------------------


def test_caption_depends_only_on_seed_index_and_iteration():
    labels, idx = torch.arange(200) % 10, torch.arange(200)
    a = digit_captions(labels, idx, seed=5, iteration=3)
    assert a == digit_captions(labels, idx, seed=5, iteration=3)
    perm = torch.randperm(200)                                # any order, any slicing
    assert digit_captions(labels[perm], idx[perm], 5, 3) == [a[i] for i in perm.tolist()]
    assert digit_captions(labels[7:9], idx[7:9], 5, 3) == a[7:9]
    assert digit_captions(labels, idx, 5, 4) != a             # other iterations differ ...
    assert digit_captions(labels, idx, 6, 3) != a             # ... and other seeds
    for caption, c in zip(a, labels.tolist()):                # each names its class
        assert any(t.format(n) == caption for t in CAPTION_TEMPLATES for n in DIGIT_CLASS_NAMES[c])
    used = {t for t in CAPTION_TEMPLATES for c in a if c.startswith(t.split("{")[0])}
    assert len(used) == len(CAPTION_TEMPLATES)                # every template is drawn


def test_zero_shot_prompts_are_per_class_templates_with_both_names():
    texts = zero_shot_texts()
    assert len(texts) == 10 and all(len(t) == 2 * len(ZERO_SHOT_TEMPLATES) for t in texts)
    assert "the digit seven" in texts[7] and "the digit 7" in texts[7]


@pytest.fixture(scope="module")
def digits():
    return captioned_digits(MODEL, seed=11)


def test_captioned_digits_keep_the_classification_split(digits):
    train, held = digits
    ref_train, ref_held = load_digits(MODEL)
    assert torch.equal(train.images, ref_train.images) and torch.equal(held.labels, ref_held.labels)
    images, captions = train.get(torch.tensor([4, 0, 9]), iteration=2)
    assert torch.equal(images, ref_train.images[[4, 0, 9]])
    assert captions == digit_captions(ref_train.labels[[4, 0, 9]], torch.tensor([4, 0, 9]), 11, 2)


@pytest.mark.parametrize("dp", [2, 4])
def test_captioned_digits_batches_are_the_same_in_every_dp_layout(digits, dp):
    train = digits[0]
    sampler = GlobalBatchSampler(len(train), 32, seed=11)
    for it in (0, 44, 45):                                  # 1438 / 32: 44 straddles an epoch
        whole = train.get(sampler.global_indices(it), it)
        parts = [train.get(sampler.local_indices(it, r, dp), it) for r in range(dp)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert sum((p[1] for p in parts), []) == whole[1]


def test_build_image_text_data_pairs_digits_with_their_cached_tokenizer(tmp_path):
    from types import SimpleNamespace

    from megavit.config import TextConfig

    flags = SimpleNamespace(
        base=SimpleNamespace(model=MODEL), text=TextConfig(context_length=16),
        contrastive=SimpleNamespace(image_text_data="digits", image_text_path=None,
                                    tokenizer_model=None, fatal_data_errors=False,
                                    zero_shot_transfer="digits"))
    data = build_image_text(flags, 11, cache_dir=tmp_path)
    assert (len(data.train), len(data.heldout), len(data.transfer)) == (1438, 359, 359)
    idx = torch.tensor([3, 1, 4])
    images, captions = data.train.get(idx, iteration=5)
    assert data.train.get(idx, iteration=5, images=False) == (None, captions)
    ids = data.tokenizer.encode(captions)
    assert ids.shape == (3, 16) and data.tokenizer.decode(ids) == captions
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".model", ".vocab"]
    assert len(data.heldout.class_prompts()) == 10
    with pytest.raises(DataError, match="--image-text-data csv needs --tokenizer-model"):
        build_image_text_data("csv", MODEL, 11, 16, data_path="pairs.csv")


# ---------------------------------------------------------------------------------------
# CSV / TSV
# ---------------------------------------------------------------------------------------


def write_images(folder: Path, n: int) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    data = [png(i) for i in range(n)]
    for i, d in enumerate(data):
        (folder / f"{i}.png").write_bytes(d)
    return data


def test_csv_and_tsv_resolve_relative_paths_against_their_folder(tmp_path):
    data = write_images(tmp_path / "imgs", 3)
    (tmp_path / "pairs.csv").write_text(
        "image,caption\nimgs/0.png,\"a zero, quoted\"\n"
        f"{tmp_path / 'imgs' / '1.png'},an absolute path\n\nimgs/2.png,two\n")
    (tmp_path / "pairs.tsv").write_text(
        "Filepath\tTitle\textra\nimgs/2.png\ta \"quoted\" title\tx\nimgs/0.png\tzero\ty\n")
    csv_ = open_image_text(str(tmp_path / "pairs.csv"), MODEL)
    images, captions = csv_.get(torch.tensor([2, 0, 1]))
    assert captions == ["two", "a zero, quoted", "an absolute path"]
    assert torch.equal(images, torch.stack([_decode_image(data[i], MODEL) for i in (2, 0, 1)]))
    assert images.shape == (3, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    tsv = open_image_text(str(tmp_path / "pairs.tsv"), MODEL)
    images, captions = tsv.get(torch.arange(2))
    assert captions == ['a "quoted" title', "zero"]
    assert torch.equal(images[1], _decode_image(data[0], MODEL))


def test_csv_header_must_name_the_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("url,label\na.png,x\n")
    with pytest.raises(DataError, match=r"bad.csv.*image column one of image, filepath"):
        CsvImageText(tmp_path / "bad.csv", MODEL)
    with pytest.raises(DataError, match="expected a .csv or .tsv"):
        CsvImageText(tmp_path / "pairs.txt", MODEL)


def test_csv_missing_image_and_caption_are_skipped_naming_the_row(tmp_path):
    write_images(tmp_path, 3)
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\n0.png,zero\nmissing.png,gone\n1.png,\n2.png,two\n")
    ds = CsvImageText(path, MODEL)
    with pytest.warns(DataWarning) as caught:
        _, captions = ds.get(torch.arange(4))
    assert captions == ["zero", "two", "two", "two"]        # bad rows read the next good one
    messages = [str(w.message) for w in caught]
    assert any(f"{path} line 3" in m and "missing.png" in m for m in messages)
    assert any(f"{path} line 4: missing caption" in m for m in messages)
    assert ds.bad.keys() == {1, 2}
    with pytest.raises(DataError, match=rf"{path} line 3: cannot read image .*missing.png"):
        CsvImageText(path, MODEL, strict=True).get(torch.tensor([1]))


# ---------------------------------------------------------------------------------------
# webdataset shards
# ---------------------------------------------------------------------------------------


def write_shards(folder: Path, shards: int = 3, per_shard: int = 4, bad: dict | None = None
                 ) -> tuple[str, list[bytes], list[str]]:
    """shards x per_shard samples written with webdataset.TarWriter; `bad` maps a sample to
    'garbage' (image bytes), 'truncated' (image cut in half), 'no-caption' or 'json'."""
    bad = bad or {}
    images, captions = [], []
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as w:
            for k in range(s * per_shard, (s + 1) * per_shard):
                image, caption = png(k), f"caption number {k}"
                sample = {"__key__": f"sample{k:04d}", "png": image, "txt": caption}
                kind = bad.get(k)
                if kind == "garbage":
                    sample["png"] = b"certainly not an image" * 4
                elif kind == "truncated":
                    sample["png"] = image[:len(image) // 2]
                elif kind == "no-caption":
                    del sample["txt"]
                elif kind == "json":
                    del sample["txt"]
                    sample["json"] = {"caption": caption, "width": 24}
                w.write(sample)
                images.append(image)
                captions.append(caption)
    return f"{folder}/{{000000..{shards - 1:06d}}}.tar", images, captions


def test_shards_read_by_index_in_any_order_equal_sequential_reading(tmp_path):
    pattern, images, captions = write_shards(tmp_path, bad={5: "json"})
    ds = WebDatasetShards(pattern, MODEL)
    assert len(ds) == 12 and ds.keys[5] == "sample0005"
    seq_images, seq_captions = ds.get(torch.arange(12))
    assert seq_captions == captions
    assert torch.equal(seq_images, torch.stack([_decode_image(b, MODEL) for b in images]))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    x, c = ds.get(perm)
    assert torch.equal(x, seq_images[perm]) and c == [captions[i] for i in perm.tolist()]
    one_by_one = [ds.get(torch.tensor([i])) for i in range(12)]
    assert torch.equal(torch.cat([o[0] for o in one_by_one]), seq_images)
    assert ds.get(perm, images=False) == (None, c)


def test_our_index_groups_members_like_webdataset_streaming(tmp_path):
    pattern, _, captions = write_shards(tmp_path)
    stream = [(s["__key__"], s["txt"].decode()) for s in wds.WebDataset(pattern, shardshuffle=False)]
    ds = WebDatasetShards(pattern, MODEL)
    assert stream == list(zip(ds.keys, ds.get(torch.arange(len(ds)))[1]))


def test_corrupt_and_captionless_samples_are_skipped_naming_shard_and_key(tmp_path):
    pattern, _, captions = write_shards(tmp_path, bad={1: "garbage", 6: "truncated",
                                                       7: "no-caption", 11: "garbage"})
    ds = WebDatasetShards(pattern, MODEL)
    with pytest.warns(DataWarning) as caught:
        _, got = ds.get(torch.arange(12))
    # a bad index reads the next readable one (wrapping around: 11 -> 0)
    expect = [0, 2, 2, 3, 4, 5, 8, 8, 8, 9, 10, 0]
    assert got == [captions[i] for i in expect]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4                                 # once per bad sample
    for key, shard, what in ((1, 0, "cannot decode the image"), (6, 1, "cannot decode the image"),
                             (7, 1, "missing caption"), (11, 2, "cannot decode the image")):
        assert any(f"{tmp_path / f'{shard:06d}.tar'} key sample{key:04d}: {what}" in m
                   for m in messages), (key, messages)
    assert sorted(ds.bad) == [1, 6, 7, 11]
    with pytest.warns(DataWarning):                           # captions alone pair the same way
        assert WebDatasetShards(pattern, MODEL).get(torch.arange(12), images=False)[1] == got
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # reported once per process
        assert ds.get(torch.tensor([7]))[1] == [captions[8]]
    strict = WebDatasetShards(pattern, MODEL, strict=True)
    assert strict.get(torch.tensor([0]))[1] == [captions[0]]
    with pytest.raises(DataError, match=r"000001.tar key sample0007: missing caption"):
        strict.get(torch.tensor([7]))


def test_skipping_is_the_same_in_every_dp_layout(tmp_path):
    pattern, _, _ = write_shards(tmp_path, shards=4, per_shard=5,
                                 bad={0: "garbage", 3: "no-caption", 4: "truncated", 13: "garbage"})
    sampler = GlobalBatchSampler(20, 8, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        reference = [WebDatasetShards(pattern, MODEL).get(sampler.global_indices(it))
                     for it in range(5)]
        for dp in (2, 4):
            ranks = [WebDatasetShards(pattern, MODEL) for _ in range(dp)]   # one reader each
            for it in range(5):
                parts = [ranks[r].get(sampler.local_indices(it, r, dp)) for r in range(dp)]
                assert torch.equal(torch.cat([p[0] for p in parts]), reference[it][0])
                assert sum((p[1] for p in parts), []) == reference[it][1]


def test_a_shard_cut_short_and_a_non_tar_shard(tmp_path):
    pattern, _, captions = write_shards(tmp_path, shards=2)
    whole = (tmp_path / "000001.tar").read_bytes()
    with tarfile.open(tmp_path / "000001.tar") as tf:
        cut = tf.getmember("sample0006.txt").offset_data + 5
    (tmp_path / "000001.tar").write_bytes(whole[:cut])        # cut in sample 6's caption
    with pytest.warns(DataWarning, match=r"000001.tar: the tar file ends early after key sample0006"):
        ds = WebDatasetShards(pattern, MODEL)
    assert ds.keys == [f"sample{k:04d}" for k in range(7)]   # sample 7's headers are gone
    with pytest.warns(DataWarning, match=r"000001.tar key sample0006: member truncated"):
        assert ds.get(torch.tensor([6]))[1] == [captions[0]]
    with pytest.raises(DataError, match=r"000001.tar: the tar file ends early"):
        WebDatasetShards(pattern, MODEL, strict=True)
    (tmp_path / "000001.tar").write_bytes(b"\x1f\x8b" + b"\0" * 2000)
    with pytest.warns(DataWarning, match=r"000001.tar: not an uncompressed tar file"):
        assert len(WebDatasetShards(pattern, MODEL)) == 4
    with pytest.raises(DataError, match=r"000001.tar: not an uncompressed tar file"):
        WebDatasetShards(pattern, MODEL, strict=True)
    with pytest.raises(DataError, match="shard .*000002.tar does not exist"):
        WebDatasetShards(f"{tmp_path}/{{000000..000009}}.tar", MODEL)


def test_shards_pickle_for_loader_workers(tmp_path):
    import pickle

    pattern, _, captions = write_shards(tmp_path, shards=1)
    ds = WebDatasetShards(pattern, MODEL)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.get(torch.tensor([3, 1]))[1] == [captions[3], captions[1]]


# ---------------------------------------------------------------------------------------
# tools/make_shards.py
# ---------------------------------------------------------------------------------------


def test_make_shards_from_digits_reads_back_as_the_captioned_digits(tmp_path, digits, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_shards
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert make_shards.main(["--from", "digits", "--output", str(tmp_path), "--split", "heldout",
                             "--samples-per-shard", "100", "--seed", "11"]) == 0
    out = capsys.readouterr().out
    assert "make_shards | shard 000003.tar | samples 359 |" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{s:06d}.tar" for s in range(4)]
    shards = WebDatasetShards(f"{tmp_path}/{{000000..000003}}.tar", MODEL)
    held = digits[1]
    idx = torch.tensor([0, 358, 100, 17])
    images, captions = shards.get(idx)
    assert captions == held.get(idx, iteration=0)[1]
    # shard pixels in [-1, 1] are an affine image of the digits' normalised pixels
    a, b = np.polyfit(held.images[idx].flatten().numpy(), images.flatten().numpy(), 1)
    assert np.abs(a * held.images[idx].numpy() + b - images.numpy()).max() < 0.05


def test_make_shards_cli_from_csv_round_trip_and_bad_input(tmp_path):
    data = write_images(tmp_path / "imgs", 3)
    (tmp_path / "pairs.csv").write_text("image,caption\nimgs/0.png,zero\nimgs/9.png,gone\n"
                                        "imgs/1.png,one\nimgs/2.png,two\n")
    tool = [sys.executable, str(ROOT / "tools" / "make_shards.py")]
    r = cli.run(tool + ["--from", "csv", "--csv", str(tmp_path / "pairs.csv"), "--output",
                        str(tmp_path / "out"), "--samples-per-shard", "2"],
                capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pairs.csv line 3: cannot read image" in r.stderr
    assert "wrote 3 samples in 2 shards" in r.stdout
    pattern = f"{tmp_path}/out/{{000000..000001}}.tar"
    assert pattern in r.stdout
    images, captions = WebDatasetShards(pattern, MODEL).get(torch.arange(3))
    assert captions == ["zero", "one", "two"]
    assert torch.equal(images, torch.stack([_decode_image(d, MODEL) for d in data]))
    r = cli.run(tool + ["--from", "csv", "--csv", str(tmp_path / "nope.csv"), "--output",
                        str(tmp_path / "out2")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.csv: no such file" in r.stderr
