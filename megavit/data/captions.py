"""Captions for the embedded digit datasets, so image-text training (CLIP / SigLIP / LiT)
runs on the CPU with no download: each digit image is paired with a caption drawn from
prompt templates, and a small tokenizer for those captions is trained in milliseconds.

    captions = digit_captions(labels, indices, seed=1234, iteration=7)
    tok = digit_tokenizer("runs/cache")            # trained once, then reused by content hash

Which caption sample i gets is a function of (seed, i, iteration) only — a hash, not a
random stream — so every parallel layout, loader worker and restart sees the same text for
the same sample at the same iteration; the same image gets a different caption in other
iterations (more text variety than one fixed caption per image).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from megavit.data.tokenizer import Tokenizer, train_tokenizer
from megavit.parallel.sharding import param_seed

# Class c is named either as a word or as a numeral; captions use both forms (equally often).
DIGIT_CLASS_NAMES: tuple[tuple[str, str], ...] = (
    ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
    ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"),
)

# Training captions: one template per caption, chosen by the (seed, index, iteration) hash.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "a handwritten digit {}.",
    "the digit {}",
    "a black and white image of a {}.",
    "a blurry photo of the number {}.",
    "a scan of a handwritten {}.",
    "a small picture of the digit {}.",
    "the number {}, written by hand.",
)

# Zero-shot classification prompts: a class's text embedding is the mean over these
# templates x both name forms. They are a subset of the training templates, on purpose: on
# these toy datasets zero-shot accuracy is meant to show that the image and text towers
# aligned, not that the text tower generalises to unseen phrasings (it would not, from a
# few templates). It is therefore not a zero-shot result in CLIP's sense.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = CAPTION_TEMPLATES[:4]

# Tokenizer for the digit captions: BPE over digit_caption_corpus() (160 captions; BPE
# allows up to 288 pieces on it). With 128 pieces the longest caption is 11 tokens + EOS,
# so DIGIT_CONTEXT_LENGTH never truncates (tests/test_tokenizer.py checks it).
DIGIT_VOCAB_SIZE = 128
DIGIT_CONTEXT_LENGTH = 16

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(key: int, indices: np.ndarray) -> np.ndarray:
    """splitmix64 of key + index * golden ratio, vectorised: [n] uint64 hashes."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + indices.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _M64


def digit_captions(labels: torch.Tensor, indices: torch.Tensor, seed: int, iteration: int,
                   templates: Sequence[str] = CAPTION_TEMPLATES) -> list[str]:
    """Captions for samples `indices` [n] of classes `labels` [n]: template and name form
    (word or numeral) are picked by a hash of (seed, index, iteration)."""
    h = _mix(param_seed(seed, f"digit-caption-{iteration}"), indices.numpy())
    template = (h % np.uint64(len(templates))).astype(np.int64)
    form = ((h >> np.uint64(32)) & np.uint64(1)).astype(np.int64)
    return [templates[t].format(DIGIT_CLASS_NAMES[c][f])
            for c, t, f in zip(labels.tolist(), template.tolist(), form.tolist())]


def zero_shot_texts(templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> list[list[str]]:
    """Per class (10), its prompts: every template with the word and the numeral."""
    return [[t.format(name) for t in templates for name in names] for names in DIGIT_CLASS_NAMES]


def digit_caption_corpus(templates: Sequence[str] = CAPTION_TEMPLATES + ZERO_SHOT_TEMPLATES
                         ) -> Iterator[str]:
    """Every distinct caption the templates can produce (each template x class x name
    form, in a fixed order): the complete text a digit tokenizer has to cover."""
    seen = set()
    for t in templates:
        if t in seen:
            continue
        seen.add(t)
        for names in DIGIT_CLASS_NAMES:
            for name in names:
                yield t.format(name)


def digit_tokenizer(cache_dir: str | os.PathLike, context_length: int = DIGIT_CONTEXT_LENGTH,
                    vocab_size: int = DIGIT_VOCAB_SIZE, lowercase: bool = True,
                    cleaning: str = "megavit", pad_with_eos: bool = False) -> Tokenizer:
    """A BPE tokenizer for digit_caption_corpus() cleaned by `cleaning` (the text tower's
    --text-cleaning), cached in CACHE_DIR as digit-captions-HASH.model, HASH covering the
    corpus, the training options and the SentencePiece version: trained on first use (a few
    milliseconds), loaded afterwards (`pad_with_eos`: see Tokenizer).
    Safe when several ranks call it at once: each trains under its own temporary name and
    the first to link its file into place wins; every caller loads that one file, so all
    ranks share one vocabulary."""
    import sentencepiece as spm

    corpus = list(digit_caption_corpus())
    recipe = {"corpus": corpus, "vocab_size": vocab_size, "model_type": "bpe",
              "lowercase": lowercase, "character_coverage": 1.0,
              "sentencepiece": spm.__version__, "format": 1}
    if cleaning != "megavit":     # (so megavit's cleaning keeps its cached files' names)
        recipe["cleaning"] = cleaning
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(str(cache_dir)))
    final = cache / f"digit-captions-{digest}.model"
    if not final.is_file():
        tmp_prefix = cache / f".digit-captions-{digest}.{os.getpid()}.{secrets.token_hex(4)}"
        train_tokenizer(corpus, tmp_prefix, vocab_size, "bpe", lowercase=lowercase,
                        character_coverage=1.0, cleaning=cleaning)
        try:
            for suffix in (".model", ".vocab"):
                try:
                    os.link(f"{tmp_prefix}{suffix}", final.with_suffix(suffix))
                except FileExistsError:
                    pass  # another process won the race: its file is the one everyone loads
                except OSError:
                    # no hard links on this file system: the last writer wins, harmless as
                    # training the same recipe gives the same bytes in every process
                    os.replace(f"{tmp_prefix}{suffix}", final.with_suffix(suffix))
        finally:
            for suffix in (".model", ".vocab"):
                Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
    return Tokenizer.load(final, context_length, lowercase=lowercase, cleaning=cleaning,
                          pad_with_eos=pad_with_eos)
