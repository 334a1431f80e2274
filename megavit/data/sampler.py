"""Which samples each rank sees: the global batch of iteration i depends only on
(seed, i), whatever the parallel layout.

The sample stream is epoch 0's permutation of range(N), then epoch 1's, ... (epoch e
shuffled by a generator seeded from (seed, e)). Iteration i's global batch is items
[i * G, (i + 1) * G) of that stream; data-parallel rank r takes the contiguous slice
[r * G / dp, (r + 1) * G / dp) and splits it into micro-batches in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch

from megavit.data.augment import BatchMixer, ImageAugmenter, affine_params, apply_affine
from megavit.data.bad_samples import DataError
from megavit.data.datasets import Dataset
from megavit.data.targets import class_targets
from megavit.parallel.comm import Group
from megavit.parallel.sharding import param_seed


@dataclass
class GlobalBatchSampler:
    num_samples: int
    global_batch_size: int
    seed: int
    _epochs: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(param_seed(self.seed, f"data-epoch-{epoch}"))
            # keep the two most recent epochs: a batch may straddle an epoch boundary
            recent = {e: p for e, p in self._epochs.items() if e == epoch - 1}
            self._epochs = {**recent, epoch: torch.randperm(self.num_samples, generator=g)}
        return self._epochs[epoch]

    def global_indices(self, iteration: int) -> torch.Tensor:
        """Sample indices [G] of iteration `iteration`'s global batch."""
        start = iteration * self.global_batch_size
        stop = start + self.global_batch_size
        pieces = []
        while start < stop:
            epoch, offset = divmod(start, self.num_samples)
            take = min(stop - start, self.num_samples - offset)
            pieces.append(self._permutation(epoch)[offset:offset + take])
            start += take
        return torch.cat(pieces)

    def local_indices(self, iteration: int, dp_rank: int, dp_size: int) -> torch.Tensor:
        """This data-parallel rank's contiguous slice [G / dp] of the global batch."""
        per_rank = self.global_batch_size // dp_size
        return self.global_indices(iteration)[dp_rank * per_rank:(dp_rank + 1) * per_rank]


class MicroBatch(NamedTuple):
    images: torch.Tensor | None   # [m, c, H, W]; None on pipeline stages that need none
    labels: torch.Tensor      # [m]
    sample_ids: torch.Tensor  # [m] global ids: iteration * G + position in the global batch


class _IterationBatches(torch.utils.data.Sampler):
    """Yields this rank's (global id, index) list per iteration (for a DataLoader)."""

    def __init__(self, sampler: GlobalBatchSampler, start: int, stop: int,
                 dp_rank: int, dp_size: int) -> None:
        self.sampler, self.start, self.stop = sampler, start, stop
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = self.sampler.global_batch_size
        per_rank = g // self.dp_size
        for it in range(self.start, self.stop):
            first = it * g + self.dp_rank * per_rank
            yield list(enumerate(self.sampler.local_indices(it, self.dp_rank,
                                                            self.dp_size).tolist(), first))

    def __len__(self) -> int:
        return self.stop - self.start


class _ByIndexList(torch.utils.data.Dataset):
    """Reads one iteration's samples in a loader worker: items are (global id, index)."""

    def __init__(self, dataset: Dataset, augmenter: ImageAugmenter | None = None) -> None:
        self.dataset, self.augmenter = dataset, augmenter

    def __getitems__(self, items: list[tuple[int, int]]
                     ) -> tuple[torch.Tensor, torch.Tensor] | str:
        ids = torch.tensor([i for i, _ in items], dtype=torch.long)
        indices = torch.tensor([j for _, j in items], dtype=torch.long)
        try:
            return read_augmented(self.dataset, indices, ids, self.augmenter)
        except DataError as e:     # its message, raised again in the training process (a
            return str(e)          # DataLoader would wrap it in the worker's traceback)

    def __len__(self) -> int:
        return len(self.dataset)


def _as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def read_augmented(dataset: Dataset, indices: torch.Tensor, ids: torch.Tensor,
                   augmenter: ImageAugmenter | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, c, H, W] (normalised) and labels of samples `indices`, each image through
    `augmenter` keyed by its global id (`ids` [n]) when one is given."""
    if augmenter is None:
        return dataset.get(indices)
    return dataset.get_augmented(indices, lambda pixels, k: augmenter(pixels, int(ids[k])))


def train_batches(dataset: Dataset, sampler: GlobalBatchSampler, start: int, stop: int,
                  dp_rank: int, dp_size: int, micro_batch_size: int,
                  num_workers: int = 0, augment: str = "none",
                  with_images: bool = True, with_labels: bool = True,
                  augmenter: ImageAugmenter | None = None, prefetch_factor: int = 2,
                  pin_memory: bool = False) -> Iterator[list[MicroBatch]]:
    """For each iteration in [start, stop): this rank's micro-batches, in order, each with
    the global ids of its images (iteration * G + position in the global batch, which key
    per-image randomness such as drop-path). In-memory datasets are indexed directly;
    others are read by a DataLoader with `num_workers` processes prefetching ahead.
    `augment` 'affine' draws its randomness per global-batch position over the batch (see
    megavit.data.augment); `augmenter` (crop, flip, RandAugment) runs per image as it is
    read, keyed by its global id. `with_images=False` (pipeline stages after the first)
    reads only the labels, or with `with_labels=False` nothing: the labels are zeros to be
    filled by `labels_from_first_stage`. Mixup / CutMix: `mixed_batches`. Loader workers
    prepare `prefetch_factor` iterations each ahead, into pinned memory with `pin_memory`
    (a GPU run: the copy to the device can overlap)."""
    g = sampler.global_batch_size
    per_rank = g // dp_size
    if not with_images:
        for iteration in range(start, stop):
            idx = sampler.local_indices(iteration, dp_rank, dp_size)
            ids = iteration * g + dp_rank * per_rank + torch.arange(per_rank)
            labels = (dataset.labels_of(idx) if with_labels
                      else torch.zeros(per_rank, *label_shape(dataset), dtype=torch.long))
            yield [MicroBatch(None, y, i.clone()) for y, i in
                   zip(labels.split(micro_batch_size), ids.split(micro_batch_size))]
        return
    if dataset.in_memory or num_workers == 0:
        local = (read_augmented(dataset, sampler.local_indices(it, dp_rank, dp_size),
                                it * g + dp_rank * per_rank + torch.arange(per_rank), augmenter)
                 for it in range(start, stop))
    else:
        local = iter(torch.utils.data.DataLoader(
            _ByIndexList(dataset, augmenter),
            batch_sampler=_IterationBatches(sampler, start, stop, dp_rank, dp_size),
            num_workers=num_workers, collate_fn=_as_is, prefetch_factor=prefetch_factor,
            pin_memory=pin_memory,
        ))
    for iteration, batch in enumerate(local, start):
        if isinstance(batch, str):     # a loader worker's DataError
            raise DataError(batch)
        images, labels = batch
        if augment == "affine":
            theta = affine_params(g, sampler.seed, iteration)
            images = apply_affine(images, theta[dp_rank * per_rank:(dp_rank + 1) * per_rank])
        ids = iteration * g + dp_rank * per_rank + torch.arange(per_rank)
        # each micro-batch's ids on their own (a view would keep the whole array alive)
        yield [MicroBatch(x, y, i.clone()) for x, y, i in zip(images.split(micro_batch_size),
                                                              labels.split(micro_batch_size),
                                                              ids.split(micro_batch_size))]


def label_shape(dataset: Dataset) -> tuple[int, ...]:
    """The shape of one sample's label: () for one class, (K,) for up to K classes."""
    k = getattr(dataset, "max_labels", 1)
    return (k,) if getattr(dataset, "multi_label", False) else ()


def mixed_batches(batches: Iterator[list[MicroBatch]], mixer: BatchMixer, num_classes: int,
                  global_batch_size: int, micro_batch_size: int
                  ) -> Iterator[list[MicroBatch]]:
    """`batches` with each micro-batch Mixup / CutMix-ed (its images, where the stage has
    them) and its labels turned into mixed targets [m, C] float, keyed by (iteration, global
    micro-batch index) as its global ids say: the same at every layout."""
    for micro_batches in batches:
        out = []
        for mb in micro_batches:
            first = int(mb.sample_ids[0])
            iteration, position = divmod(first, global_batch_size)
            images, targets = mixer(mb.images, class_targets(mb.labels, num_classes),
                                    iteration, position // micro_batch_size)
            out.append(MicroBatch(images, targets, mb.sample_ids))
        yield out


def eval_batches(dataset: Dataset, global_batch_size: int, dp_rank: int, dp_size: int,
                 micro_batch_size: int, max_batches: int | None = None,
                 with_images: bool = True, with_labels: bool = True
                 ) -> Iterator[list[MicroBatch]]:
    """The held-out split in order, in global batches of `global_batch_size` images (the
    first `max_batches` of them); for each, this rank's contiguous share in micro-batches of
    at most `micro_batch_size` (the last batch may leave a rank fewer or none). Which images
    are evaluated depends only on the split and the global batch size, not on the layout.
    `with_images` / `with_labels` as for `train_batches`."""
    n = len(dataset)
    for b, start in enumerate(range(0, n, global_batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        share = torch.arange(start, min(start + global_batch_size, n)).tensor_split(dp_size)[dp_rank]
        yield [MicroBatch(*dataset.get(idx), idx) if with_images else
               MicroBatch(None, dataset.labels_of(idx) if with_labels else
                          torch.zeros(len(idx), *label_shape(dataset), dtype=torch.long), idx)
               for idx in share.split(micro_batch_size)]


def labels_from_first_stage(batches: Iterator[list[MicroBatch]], pp: Group
                            ) -> Iterator[list[MicroBatch]]:
    """`batches` with every stage's labels those the first pipeline stage read (one
    broadcast of [m_total] int64 per step on the pipeline group `pp`): a file-backed
    dataset may replace an unreadable image (and its label) by the next readable one, which
    only the stage that decodes the images knows. Every stage of `pp` iterates alike."""
    for micro_batches in batches:
        if not micro_batches:
            yield micro_batches
            continue
        sizes = [len(mb.labels) for mb in micro_batches]
        labels = pp.broadcast(torch.cat([mb.labels for mb in micro_batches]), src=0)
        yield [mb._replace(labels=y) for mb, y in zip(micro_batches, labels.split(sizes))]
