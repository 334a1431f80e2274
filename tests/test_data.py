"""Datasets and the layout-independent sample order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megavit.config import DataConfig, preset_model_config
from megavit.data.augment import affine_params, apply_affine
from megavit.data.datasets import DataError, build_datasets
from megavit.data.sampler import GlobalBatchSampler, eval_batches, train_batches

MODEL = preset_model_config("vit-debug", num_channels=1)


def test_global_batch_depends_only_on_seed_and_iteration():
    a = GlobalBatchSampler(100, 16, seed=3)
    b = GlobalBatchSampler(100, 16, seed=3)
    for it in [0, 5, 6, 7, 13, 40]:   # 100 / 16: iterations 6 and 12 straddle epochs
        assert torch.equal(a.global_indices(it), b.global_indices(it))
    assert not torch.equal(a.global_indices(0), GlobalBatchSampler(100, 16, seed=4).global_indices(0))


def test_epochs_are_permutations_and_batches_tile_the_stream():
    s = GlobalBatchSampler(10, 4, seed=0)
    stream = torch.cat([s.global_indices(i) for i in range(5)])       # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_dp_slices_concatenate_to_the_global_batch(dp):
    s = GlobalBatchSampler(50, 8, seed=1)
    for it in range(8):
        parts = [s.local_indices(it, r, dp) for r in range(dp)]
        assert torch.equal(torch.cat(parts), s.global_indices(it))


def test_micro_batches_of_every_dp_rank_rebuild_the_global_batch():
    train, _ = build_datasets(DataConfig(dataset="digits", augment="affine"), MODEL, seed=0)
    sampler = GlobalBatchSampler(len(train), 8, seed=5)
    full = next(train_batches(train, sampler, 3, 4, 0, 1, 8, augment="affine"))[0]
    pieces = [mb for r in range(2)
              for mb in next(train_batches(train, sampler, 3, 4, r, 2, 2, augment="affine"))]
    assert len(pieces) == 4
    for field in range(3):  # images, labels, global sample ids
        assert torch.equal(torch.cat([p[field] for p in pieces]), full[field])
    assert torch.equal(full.sample_ids, torch.arange(24, 32))   # iteration 3 x 8 + position


def test_affine_augmentation_moves_pixels_but_keeps_shape():
    x = torch.zeros(3, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1
    theta = affine_params(3, seed=0, iteration=0)
    y = apply_affine(x, theta)
    assert y.shape == x.shape and not torch.equal(x, y)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3)
    assert torch.allclose(apply_affine(x, identity), x, atol=1e-6)


def test_digits_split_is_fixed_disjoint_and_sized():
    train, held = build_datasets(DataConfig(dataset="digits"), MODEL, seed=0)
    train2, held2 = build_datasets(DataConfig(dataset="digits"), MODEL, seed=99)
    assert (len(train), len(held)) == (1438, 359)
    assert torch.equal(held.images, held2.images)           # the split ignores --seed
    assert train.images.shape[1:] == (1, 16, 16)            # honours img size and channels
    assert train.num_classes == 10 and set(held.labels.tolist()) == set(range(10))
    assert abs(train.images.mean().item()) < 1e-4            # normalised
    flat_train = {tuple(r) for r in train.images.flatten(1).numpy().round(4)}
    assert not any(tuple(r) in flat_train for r in held.images.flatten(1).numpy().round(4))


def test_mnist5k_loads_and_honours_three_channels():
    model = preset_model_config("vit-debug", num_channels=3, img_h=28, img_w=28, patch_dim=7)
    train, held = build_datasets(DataConfig(dataset="mnist5k"), model, seed=0)
    assert (len(train), len(held)) == (4000, 1000)
    assert train.images.shape[1:] == (3, 28, 28)
    assert torch.equal(train.images[:, 0], train.images[:, 2])


def test_synthetic_honours_model_dims():
    model = preset_model_config("vit-debug", num_channels=2, img_h=24, img_w=8, patch_dim=4,
                                num_classes=5)
    train, held = build_datasets(DataConfig(dataset="synthetic", synthetic_size=100), model, 0)
    x, y = train.get(torch.arange(10))
    assert x.shape == (10, 2, 24, 8) and int(y.max()) < 5 and len(train) == 100


def _write_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 12)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_image_folder_reads_resizes_and_labels(tmp_path):
    _write_folder(tmp_path)
    model = preset_model_config("vit-debug", num_channels=3)
    train, val = build_datasets(DataConfig(dataset="image-folder", data_path=str(tmp_path)), model, 0)
    assert (len(train), len(val), train.num_classes) == (6, 6, 2)
    x, y = train.get(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    sampler = GlobalBatchSampler(len(train), 4, seed=0)
    loaded = list(train_batches(train, sampler, 0, 2, 0, 1, 2, num_workers=2))
    direct = list(train_batches(train, sampler, 0, 2, 0, 1, 2, num_workers=0))
    for a, b in zip(loaded, direct):
        assert all(torch.equal(p.images, q.images) and torch.equal(p.labels, q.labels)
                   for p, q in zip(a, b))


def test_image_folder_errors_name_the_problem(tmp_path):
    model = preset_model_config("vit-debug", num_channels=3)
    with pytest.raises(DataError, match="no such directory"):
        build_datasets(DataConfig(dataset="image-folder", data_path=str(tmp_path / "nope")), model, 0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="missing val/"):
        build_datasets(DataConfig(dataset="image-folder", data_path=str(tmp_path)), model, 0)
    _write_folder(tmp_path / "ok", classes=("a",), per_class=1)
    (tmp_path / "ok" / "val").rename(tmp_path / "val")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    train, _ = build_datasets(DataConfig(dataset="image-folder", data_path=str(tmp_path),
                                         fatal_data_errors=True), model, 0)
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        train.get(torch.tensor([0]))
    train, _ = build_datasets(DataConfig(dataset="image-folder", data_path=str(tmp_path)), model, 0)
    with pytest.warns(UserWarning, match="broken.png: cannot read image"), \
            pytest.raises(DataError, match="none of its 1 samples is readable"):
        train.get(torch.tensor([0]))


def test_eval_batches_are_the_same_images_in_every_layout():
    from megavit.data.datasets import TensorDataset

    n = 150
    indexed = TensorDataset("idx", torch.zeros(n, 1, 2, 2), torch.arange(n), n)  # label = index
    def seen(dp, micro, max_batches):
        return [torch.cat([mb.labels for batch in eval_batches(indexed, 64, r, dp, micro, max_batches)
                           for mb in batch])
                for r in range(dp)]
    serial = seen(1, 64, 2)[0]
    assert torch.equal(serial, torch.arange(128))             # two global batches of 64
    for dp, micro in [(3, 5), (2, 32), (4, 1)]:
        shares = seen(dp, micro, 2)
        assert torch.equal(torch.sort(torch.cat(shares)).values, serial), (dp, micro)
    everything = seen(3, 8, None)
    assert torch.equal(torch.sort(torch.cat(everything)).values, torch.arange(n))
    assert all(len(mb.labels) <= 8 for r in range(3)
               for batch in eval_batches(indexed, 64, r, 3, 8) for mb in batch)
