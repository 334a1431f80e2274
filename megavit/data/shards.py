"""One reader of webdataset .tar shards by sample index, for image-text data
(`image_text.WebDatasetShards`) and classification data (`ShardClassification` here).

From webdataset (imported): the shard pattern's expansion (`expand_urls`: brace ranges such
as `shards/{000000..000009}.tar`, and `::` between patterns) and the split of a member name
into key and extension (`base_plus_ext`: `DIR/KEY.EXT1.EXT2` belongs to sample `DIR/KEY`
with extension `ext1.ext2`). Shards are written with `webdataset.TarWriter`
(tools/make_shards.py).

Our own, following webdataset's grouping conventions (its readers only stream, so they are
re-implemented here): consecutive members with the same key form one sample, extensions
are lower-cased, names `__...__` are metadata and skipped (a repeated extension within a
sample keeps the first member, where webdataset raises). An index of every sample (shard,
key, offset and size of the member each *role* uses: e.g. 'image' = the first of .jpg,
.jpeg, .png, .webp) is built once at construction from the tar headers read with Python's
`tarfile` and kept in memory (numpy arrays and the key strings, roughly 100 bytes a sample);
`member` seeks to exactly the requested member, so any order costs the same.

Only local files (no URLs or `pipe:`); compressed shards (.tar.gz) are refused since they
cannot be read by offset. A shard that is not a readable tar file counts as bad: a warning
and its samples are left out; one whose headers end early keeps the samples indexed so far
(strict: DataError); the same on every rank.

Classification samples: the image, and the label as KEY.cls (a class index, or several
separated by spaces or commas: a multi-label image) or KEY.json ({"label": 7} or
{"labels": [3, 17]}). Labels are read with the index (small members; no image is read).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from megavit.config import ModelConfig
from megavit.data.bad_samples import BadSample, DataError, DataWarning, read_or_replace
from megavit.data.preprocessing import Preprocessing, read_native, read_pixels

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")   # the first present is the sample's image
LABEL_EXTS = ("cls", "json")
_META = re.compile(r"__[^/]*__($|/)")


def not_a_shard_file(url: str) -> str:
    """Why `url` (no file) is not a shard, and the pattern that names the shards it may mean."""
    if os.path.isdir(url):
        tars = sorted(p.name[:-len(".tar")] for p in Path(url).glob("*.tar"))
        if not tars:
            return "is a directory without .tar shards"
        example = f"{url.rstrip('/')}/{{{tars[0]}..{tars[-1]}}}.tar"
        return f"is a directory; name its shards with a brace pattern such as '{example}'"
    if any(c in url for c in "*?["):
        return ("does not exist (wildcards are not expanded: name the shards with a brace "
                "pattern such as 'shards/{000000..000009}.tar')")
    return "does not exist"


def expand_shards(pattern: str, flag: str) -> list[str]:
    """The local shard files a brace pattern names; DataError naming `flag` otherwise."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise DataError("webdataset shards need the webdataset package: "
                        "pip install 'megavit[data]'") from None
    if pattern.lower().endswith((".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".tar.bz2")):
        raise DataError(f"{flag} {pattern}: compressed shards cannot be read by index; "
                        "write plain .tar shards (tools/make_shards.py)")
    try:
        urls = expand_urls(os.path.expanduser(pattern))
    except ValueError as e:       # braceexpand's UnbalancedBracesError
        raise DataError(f"{flag} {pattern}: not a shard pattern ({e}); write "
                        "e.g. shards/{000000..000009}.tar") from None
    shards = []
    for url in urls:
        if re.match(r"^[a-z0-9+]+:", url) and not os.path.exists(url):
            raise DataError(f"{flag} {pattern}: {url} is not a local file; random access by "
                            "index needs the shards on a local or mounted file system")
        if not os.path.isfile(url):
            raise DataError(f"{flag} {pattern}: shard {url} " + not_a_shard_file(url))
        shards.append(url)
    if not shards:
        raise DataError(f"{flag} {pattern}: matches no shard")
    return shards


class ShardIndex:
    """Where each sample's members lie in the shards of `pattern`. `roles` maps a role to
    the extensions that fill it, in order of preference (the first present wins); `eager`
    roles have their member's bytes read during the scan (`eager_data[role][i]`, None when
    absent): labels, which every pipeline stage needs and which are small."""

    def __init__(self, pattern: str, roles: dict[str, tuple[str, ...]], flag: str,
                 strict: bool = False, eager: tuple[str, ...] = ()) -> None:
        try:
            from webdataset.tariterators import base_plus_ext
        except ImportError:
            raise DataError("webdataset shards need the webdataset package: "
                            "pip install 'megavit[data]'") from None
        self.pattern, self.strict, self.roles = pattern, strict, roles
        self.shards = expand_shards(pattern, flag)
        self.eager = eager
        shard_of, keys, parts = [], [], []
        self.eager_data: dict[str, list[bytes | None]] = {role: [] for role in eager}
        for s, shard in enumerate(self.shards):
            for key, members, data in self._scan(shard, base_plus_ext):
                shard_of.append(s)
                keys.append(key)
                parts.append(members)
                for role in eager:
                    self.eager_data[role].append(data.get(role))
        if not keys:
            raise DataError(f"{flag} {pattern}: the shards hold no sample")
        self.keys = keys
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        # per role: [n, 2] (offset, size) of each sample's member (-1: none) and which of
        # the role's extensions it is
        self.at = {role: np.full((len(keys), 2), -1, dtype=np.int64) for role in roles}
        self.ext = {role: np.zeros(len(keys), dtype=np.int8) for role in roles}
        for i, members in enumerate(parts):
            for role, exts in roles.items():
                for code, ext in enumerate(exts):
                    if ext in members:
                        self.at[role][i], self.ext[role][i] = members[ext], code
                        break
        self._files: dict[int, BinaryIO] = {}

    def _scan(self, shard: str, base_plus_ext):
        """(key, {ext: (offset, size)}, {eager role: bytes}) of each sample of one shard."""
        samples: list = []
        try:
            with tarfile.open(shard, "r:") as tf:
                while (m := tf.next()) is not None:
                    tf.members = []  # keep no header list: shards may hold 10^5 members
                    if not m.isreg() or _META.match(m.name):   # webdataset's skip rules
                        continue
                    key, ext = base_plus_ext(m.name)
                    if key is None:
                        continue
                    if not samples or samples[-1][0] != key:
                        samples.append((key, {}, {}))
                    ext = ext.lower()
                    if ext in samples[-1][1]:
                        continue
                    samples[-1][1][ext] = (m.offset_data, m.size)
                    for role in self.eager:
                        if ext in self.roles[role] and role not in samples[-1][2]:
                            samples[-1][2][role] = tf.extractfile(m).read()
        except tarfile.TarError as e:
            if samples:   # the headers end early: keep what was indexed (a cut member fails later)
                message = f"{shard}: the tar file ends early after key {samples[-1][0]} ({e})"
                outcome = f"its first {len(samples)} samples are used"
            else:
                message = (f"{shard}: not an uncompressed tar file ({e}); shards must be plain "
                           ".tar (written by tools/make_shards.py or webdataset.TarWriter)")
                outcome = "its samples are left out"
            if self.strict:
                raise DataError(message) from None
            warnings.warn(f"{message}: {outcome}", DataWarning, stacklevel=4)
        return samples

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}   # open files stay with their process

    def sample_name(self, i: int) -> str:
        return f"{self.shards[self.shard_of[i]]} key {self.keys[i]}"

    def has(self, i: int, role: str) -> bool:
        return self.at[role][i, 0] >= 0

    def member(self, i: int, role: str) -> bytes:
        """The bytes of sample i's member for `role` (BadSample if the shard ends early)."""
        s = int(self.shard_of[i])
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.shards[s], "rb")
        offset, size = (int(v) for v in self.at[role][i])
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise BadSample(f"{self.sample_name(i)}: member truncated ({len(data)} of {size} "
                            "bytes; the shard ends early)")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def parse_labels(data: bytes | None, ext_code: int) -> list[int] | str:
    """A .cls (ext_code 0) or .json (1) label member -> its class indices, or why not."""
    if data is None:
        return "no .cls or .json label member"
    try:
        text = data.decode("utf-8")
        if ext_code == 0:
            labels = [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
        else:
            meta = json.loads(text)
            value = meta.get("labels", meta.get("label")) if isinstance(meta, dict) else None
            labels = [value] if isinstance(value, int) else value
            if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
                return f"the .json member holds no 'label' or 'labels' integer(s): {text[:80]!r}"
    except (UnicodeDecodeError, ValueError) as e:
        return f"unreadable label ({e})"
    if not labels:
        return "empty label"
    if any(v < 0 for v in labels):
        return f"negative class index in {labels}"
    return labels


class ShardClassification:
    """Classification samples (image + .cls / .json label) of webdataset shards, for
    `--dataset shards`. Labels [n] int64, or [n, K] padded with -1 where some image has
    several (`multi_label`, K = `max_labels`). A sample without a readable image or label
    is replaced by the next readable one, as every file-backed set does (strict: DataError);
    `preprocessing` prepares evaluation images, an augmenter training ones."""

    in_memory = False

    def __init__(self, pattern: str, model: ModelConfig, preprocessing: Preprocessing,
                 flag: str = "--data-path", strict: bool = False,
                 num_classes: int | None = None, name: str | None = None) -> None:
        self.index = ShardIndex(pattern, {"image": IMAGE_EXTS, "label": LABEL_EXTS}, flag,
                                strict, eager=("label",))
        self.model, self.preprocessing, self.strict = model, preprocessing, strict
        self.name = name or Path(pattern.split("::")[0]).parent.name or "shards"
        self.bad: dict[int, str] = {}
        self.readable: set[int] = set()
        parsed = [parse_labels(data, int(code)) for data, code in
                  zip(self.index.eager_data.pop("label"), self.index.ext["label"])]
        self.label_problem = {i: p for i, p in enumerate(parsed) if isinstance(p, str)}
        lists = [p if isinstance(p, list) else [] for p in parsed]
        self.max_labels = max((len(v) for v in lists), default=1)
        self.multi_label = self.max_labels > 1
        self.labels = np.full((len(lists), self.max_labels), -1, dtype=np.int64)
        for i, v in enumerate(lists):
            self.labels[i, :len(v)] = v
        largest = int(self.labels.max()) if self.labels.size else -1
        self.num_classes = num_classes if num_classes is not None else largest + 1
        if largest >= self.num_classes:
            raise DataError(f"{flag} {pattern}: class index {largest} in the labels, but "
                            f"{self.num_classes} classes (--num-classes)")

    def __len__(self) -> int:
        return len(self.index)

    def _label(self, i: int) -> torch.Tensor:
        row = torch.from_numpy(self.labels[i])
        return row if self.multi_label else row[0]

    def read(self, i: int, native: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        where = self.index.sample_name(i)
        if i in self.label_problem:
            raise BadSample(f"{where}: {self.label_problem[i]}")
        if not self.index.has(i, "image"):
            raise BadSample(f"{where}: missing image (no "
                            f"{'/'.join('.' + e for e in IMAGE_EXTS)} member)")
        data = io.BytesIO(self.index.member(i, "image"))
        try:
            pixels = (read_native(data, self.preprocessing.channels) if native else
                      read_pixels(data, self.preprocessing))
        except Exception as e:  # noqa: BLE001 — PIL raises many types; the sample names itself
            raise BadSample(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None
        self.readable.add(i)
        return pixels, self._label(i)

    def sample(self, i: int, native: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return read_or_replace(i, len(self), lambda j: self.read(j, native), self.bad,
                               self.strict, self.name)

    def _stack(self, samples, pixels) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.preprocessing.normalise(torch.stack(pixels)),
                torch.stack([label for _, label in samples]))

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(indices):
            return self._empty()
        try:
            samples = [self.sample(int(i)) for i in indices]
        finally:
            self.index.close()
        return self._stack(samples, [p for p, _ in samples])

    def get_augmented(self, indices: torch.Tensor, augment) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(indices):
            return self._empty()
        try:
            samples = [self.sample(int(i), native=True) for i in indices]
        finally:
            self.index.close()
        images = torch.stack([augment(p, k) for k, (p, _) in enumerate(samples)])
        return (self.preprocessing.normalise_levels(images),
                torch.stack([label for _, label in samples]))

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        """As `ImageFolderDataset.labels_of`: an index not yet decoded here is decoded once
        (it may be replaced)."""
        out = []
        try:
            for i in indices.tolist():
                out.append(self._label(i) if i in self.readable else self.sample(i)[1])
        finally:
            self.index.close()
        if not out:
            return torch.empty(0, *((self.max_labels,) if self.multi_label else ()),
                               dtype=torch.long)
        return torch.stack(out)

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        return (torch.empty(0, m.num_channels, m.img_h, m.img_w),
                torch.empty(0, *((self.max_labels,) if self.multi_label else ()),
                            dtype=torch.long))
