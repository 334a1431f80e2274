"""The offline teacher cache: the teacher's top-K logits (and, if asked, its pooled
features) for every image a student run will see, written once (tools/cache_teacher.py) and
read at any layout (`--distill-cache DIR`).

An image is keyed by its global id (iteration x global batch + position), the key of its
augmentation draws, so a student at any TP / PP / DP layout finds its micro-batches' rows.
The directory holds

    cache.json                  the identity (teacher config SHA-256, data, seed, batch
                                sizes, image size, augmentation, classes, K), the teacher's
                                model section and held-out accuracy, and the shards written
    shard_IIIIIIII.safetensors  iterations [I, I + n): "ids" [r] int64, "values" [r, K]
                                float32 (the top-K logits, largest first), "indices" [r, K]
                                int64, with --pooled-features "pooled" [r, w] float32 (what
                                the teacher's classifier reads); written as .tmp and renamed
                                when complete

A run that differs from the cache in any identity field is refused, naming the field; a
shard that is missing or does not read whole is named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megavit.errors import UserError

MANIFEST = "cache.json"


class TeacherCacheError(UserError):
    """A teacher cache that does not fit this run, or a damaged shard."""


# identity fields a reader may differ in: any K serves, pooled features are checked apart
_READER_FREE = ("top_k", "pooled_features")


def cache_identity(cfg, teacher_sha256: str, top_k: int, recipe,
                   pooled_features: bool = False) -> dict[str, Any]:
    """What must match between the run that wrote a cache and the run that reads it (`cfg`:
    the student's Config; `recipe`: its augmentation recipe, every setting that changes the
    images, as `recipe.describe()` says it), and what the cache holds (K, pooled
    features)."""
    m, d, t = cfg.model, cfg.data, cfg.training
    return {"teacher_config_sha256": teacher_sha256, "dataset": d.dataset,
            "data_path": d.data_path, "synthetic_size": d.synthetic_size,
            "augment": d.augment, "recipe": recipe.describe(), "seed": t.seed,
            "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "image": [m.num_channels, m.img_h, m.img_w], "classes": m.num_classes,
            "top_k": top_k, "pooled_features": pooled_features}


def shard_name(first_iteration: int) -> str:
    return f"shard_{first_iteration:08d}.safetensors"


@dataclass
class CacheManifest:
    """cache.json: the identity, the teacher's model section and held-out accuracy, and
    {first iteration: iterations} of the complete shards."""

    identity: dict[str, Any]
    teacher_model: dict[str, Any]
    teacher_accuracy: float
    shards: dict[int, int] = field(default_factory=dict)

    @classmethod
    def read(cls, root: Path) -> "CacheManifest":
        path = root / MANIFEST
        try:
            raw = json.loads(path.read_text())
            return cls(raw["identity"], raw["teacher_model"], float(raw["teacher_accuracy"]),
                       {int(k): int(v) for k, v in raw["shards"].items()})
        except FileNotFoundError:
            raise TeacherCacheError(f"--distill-cache {root}: no {MANIFEST} (not a teacher "
                                    "cache; write one with tools/cache_teacher.py)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise TeacherCacheError(f"{path}: not a teacher cache manifest ({e})") from None

    def write(self, root: Path) -> None:
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"identity": self.identity,
                                   "teacher_model": self.teacher_model,
                                   "teacher_accuracy": self.teacher_accuracy,
                                   "shards": {str(k): v for k, v in
                                              sorted(self.shards.items())}}, indent=1))
        os.replace(tmp, root / MANIFEST)

    def differences(self, identity: dict[str, Any]) -> list[str]:
        """The identity fields that differ from `identity` (top_k and pooled_features may
        be any)."""
        return [f"{k}: {self.identity.get(k)!r} in the cache, {v!r} here"
                for k, v in identity.items()
                if k not in _READER_FREE and self.identity.get(k) != v]

    @property
    def shard_keys(self) -> tuple[str, ...]:
        """The tensors every shard holds, one row per image."""
        return ("ids", "values", "indices") + (
            ("pooled",) if self.identity.get("pooled_features") else ())

    def missing(self, iterations: int) -> list[int]:
        """Iterations in [0, iterations) that no complete shard covers."""
        covered = set()
        for first, n in self.shards.items():
            covered.update(range(first, first + n))
        return [i for i in range(iterations) if i not in covered]


def write_shard(root: Path, first: int, iterations: int, ids: torch.Tensor,
                values: torch.Tensor, indices: torch.Tensor,
                pooled: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file

    name = shard_name(first)
    tensors = {"ids": ids.contiguous(), "values": values.float().contiguous(),
               "indices": indices.long().contiguous()}
    if pooled is not None:
        tensors["pooled"] = pooled.float().contiguous()
    save_file(tensors, str(root / (name + ".tmp")),
              metadata={"first_iteration": str(first), "iterations": str(iterations)})
    os.replace(root / (name + ".tmp"), root / name)


class TeacherCache:
    """Reading rows of a cache by global image id (shards loaded as they are needed; the
    one in use kept)."""

    def __init__(self, root: Path, manifest: CacheManifest, global_batch_size: int) -> None:
        self.root, self.manifest, self.g = root, manifest, global_batch_size
        self.firsts = sorted(manifest.shards)
        self.loaded: tuple[int, dict[str, torch.Tensor]] | None = None

    def _shard(self, iteration: int) -> tuple[int, dict[str, torch.Tensor]]:
        for first in self.firsts:
            if first <= iteration < first + self.manifest.shards[first]:
                break
        else:
            raise TeacherCacheError(f"--distill-cache {self.root}: no shard holds iteration "
                                    f"{iteration}")
        if self.loaded is None or self.loaded[0] != first:
            path = self.root / shard_name(first)
            try:
                from safetensors.torch import load_file

                tensors = load_file(str(path))
                rows = self.manifest.shards[first] * self.g
                if any(tensors[k].shape[0] != rows for k in self.manifest.shard_keys):
                    raise ValueError(f"{rows} rows expected")
            except FileNotFoundError:
                raise TeacherCacheError(f"{path}: missing (the manifest lists it); run "
                                        "tools/cache_teacher.py again to rewrite it") from None
            except Exception as e:      # noqa: BLE001 — safetensors raises its own types
                raise TeacherCacheError(f"{path}: damaged or truncated ({e}); delete it and "
                                        "run tools/cache_teacher.py again") from None
            self.loaded = (first, tensors)
        return self.loaded

    def logits(self, sample_ids: torch.Tensor, classes: int) -> torch.Tensor:
        """The teacher's logits [m, C] of the images `sample_ids` [m]: the top-K values at
        their classes, the other classes 10^4 below the row's smallest kept value (so a
        softmax gives them no mass: the distribution is the top-K renormalised; with K = C
        the exact logits)."""
        shard, rows = self._rows(sample_ids)
        v, i = shard["values"][rows], shard["indices"][rows]
        out = (v.min(dim=1, keepdim=True).values - 1e4).expand(len(rows), classes).clone()
        return out.scatter_(1, i, v)

    def pooled(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's pooled features [m, w] of the images `sample_ids` [m] (a cache
        written with --pooled-features)."""
        shard, rows = self._rows(sample_ids)
        return shard["pooled"][rows]

    def _rows(self, sample_ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The shard holding a micro-batch's images (one iteration) and their rows in it."""
        ids = sample_ids.cpu()
        first, shard = self._shard(int(ids[0]) // self.g)
        rows = ids - first * self.g
        if rows.max() >= len(shard["ids"]) or not torch.equal(shard["ids"][rows], ids):
            raise TeacherCacheError(f"--distill-cache {self.root}: shard rows do not hold "
                                    "the images asked for (a damaged shard)")
        return shard, rows
