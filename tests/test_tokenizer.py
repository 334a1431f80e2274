"""The caption tokenizer: SentencePiece training, the encoded row layout, errors, the CLI."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavit.data.captions import (DIGIT_CONTEXT_LENGTH, digit_caption_corpus,
                                   digit_tokenizer)
from megavit.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextCleaner, Tokenizer,
                                    TokenizerError, train_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
WORDS = "zero one two three four five six seven eight nine".split()
CORPUS = ([f"A photo of the number {w}." for w in WORDS] + [f"the digit {i}" for i in range(10)]
          + [f"a handwritten {w}, in black and white" for w in WORDS])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "spm", 64, "bpe",
                           character_coverage=1.0)


def test_cleaner_lowercases_collapses_whitespace_and_optionally_strips_punctuation():
    assert TextCleaner()("  A  Photo\tof\n the\u00a0Number  ") == "a photo of the number"
    assert TextCleaner(lowercase=False)("Mixed  Case ") == "Mixed Case"
    assert TextCleaner(strip_punctuation=True)("Well-known, isn't it?!") == "well known isn t it"
    assert TextCleaner(strip_punctuation=True)("$5 + 3 = 8.") == "$5 + 3 = 8"   # symbols stay


def test_decode_of_encode_is_the_cleaned_text(model_path):
    tok = Tokenizer.load(model_path, context_length=32)
    texts = ["A  photo of the number SEVEN.", "the digit 3", "a handwritten nine, in black and white",
             "the number seven"]
    assert tok.decode(tok.encode(texts)) == [tok.clean(t) for t in texts]
    assert tok.decode(tok.encode(texts)[1]) == "the digit 3"


def test_special_ids_are_fixed_whatever_the_algorithm(model_path, tmp_path):
    unigram = train_tokenizer(CORPUS, tmp_path / "uni", 40, "unigram", character_coverage=1.0)
    for path in (model_path, unigram):
        tok = Tokenizer.load(path, 8)
        assert (tok.pad_id, tok.eos_id, tok.unk_id) == (PAD_ID, EOS_ID, UNK_ID)
        assert tok._sp.bos_id() == BOS_ID


def test_row_is_ids_then_eos_then_padding_and_truncation_keeps_eos_last(model_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    L = 10
    tok = Tokenizer.load(model_path, context_length=L)
    short, long = "the digit 3", "a photo of the number seven seven seven"
    ids = tok.encode([short, long, ""])
    assert ids.shape == (3, L) and ids.dtype == torch.long
    s = sp.encode(short)
    assert len(s) < L - 1 and len(sp.encode(long)) > L
    assert ids[0].tolist() == s + [EOS_ID] + [PAD_ID] * (L - 1 - len(s))
    assert ids[1].tolist() == sp.encode(long)[:L - 1] + [EOS_ID]    # cut to L - 1, EOS last
    assert ids[2].tolist() == [EOS_ID] + [PAD_ID] * (L - 1)
    assert ((ids != PAD_ID).sum(1) - 1).tolist() == [len(s), L - 1, 0]  # EOS positions


def test_lowercase_is_detected_from_the_vocabulary(tmp_path):
    lower = Tokenizer.load(train_tokenizer(CORPUS, tmp_path / "lower", 64, "bpe",
                                           character_coverage=1.0), 32)
    cased = Tokenizer.load(train_tokenizer(CORPUS, tmp_path / "cased", 64, "bpe", lowercase=False,
                                           character_coverage=1.0), 32)
    assert lower.cleaner.lowercase and not cased.cleaner.lowercase
    assert cased.decode(cased.encode(["A photo of the number one."])) == ["A photo of the number one."]


def test_tokenizer_pickles_for_loader_workers(model_path):
    tok = Tokenizer.load(model_path, 12)
    copy = pickle.loads(pickle.dumps(tok))
    assert torch.equal(copy.encode(CORPUS), tok.encode(CORPUS))


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage"])
def test_bad_model_path_is_a_tokenizer_error_naming_it(tmp_path, kind):
    path = {"missing": tmp_path / "nope.model", "directory": tmp_path}.get(kind, tmp_path / "bad.model")
    if kind == "garbage":
        path.write_bytes(b"not a sentencepiece model" * 20)
    with pytest.raises(TokenizerError, match=re.escape(str(path))) as err:
        Tokenizer.load(path, 16)
    assert "tools/train_tokenizer.py" in str(err.value)


def test_context_length_below_two_is_refused(model_path):
    with pytest.raises(TokenizerError, match="context length 1 .* 2 or more"):
        Tokenizer.load(model_path, 1)


def test_vocab_too_large_names_the_flag_and_the_largest_size_that_works(tmp_path):
    with pytest.raises(TokenizerError, match=r"--vocab-size 5000 is too large") as err:
        train_tokenizer(CORPUS, tmp_path / "big", 5000, "bpe", character_coverage=1.0)
    largest = int(re.search(r"at most (\d+) pieces", str(err.value)).group(1))
    assert not list(tmp_path.iterdir())             # nothing written, no temporary left over
    assert Tokenizer.load(train_tokenizer(CORPUS, tmp_path / "ok", largest, "bpe",
                                          character_coverage=1.0), 8).vocab_size == largest
    with pytest.raises(TokenizerError, match=r"--vocab-size 10 is too small.* (\d+) or more"):
        train_tokenizer(CORPUS, tmp_path / "small", 10, "bpe", character_coverage=1.0)


def test_digit_tokenizer_is_cached_by_content_and_never_truncates_a_caption(tmp_path):
    tok = digit_tokenizer(tmp_path)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 and cached[0].startswith("digit-captions-")   # .model and .vocab
    mtime = os.stat(tok.path).st_mtime_ns
    again = digit_tokenizer(tmp_path)
    assert again.path == tok.path and os.stat(tok.path).st_mtime_ns == mtime   # reused
    corpus = list(digit_caption_corpus())
    ids = tok.encode(corpus)
    assert ids.shape == (len(corpus), DIGIT_CONTEXT_LENGTH)
    assert (ids[:, -1] == PAD_ID).all()                  # room to spare after EOS
    assert tok.decode(ids) == corpus


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_train_tokenizer_cli_end_to_end(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CORPUS * 3) + "\n\n")
    prefix = tmp_path / "out" / "spm"
    r = _cli("--input", str(captions), "--output-prefix", str(prefix), "--vocab-size", "64",
             "--model-type", "bpe", "--character-coverage", "1.0")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^train_tokenizer \| lines 91 \| MiB \d+\.\d \| MiB/s \d+\.\d \| \d+\.\d s "
                     r"\| input read, training$", r.stdout, re.M), r.stdout
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["spm.model", "spm.vocab"]
    tok = Tokenizer.load(f"{prefix}.model", 32)
    assert tok.vocab_size == 64
    assert tok.decode(tok.encode(CORPUS)) == [tok.clean(t) for t in CORPUS]
    vocab = (prefix.parent / "spm.vocab").read_text().splitlines()
    assert len(vocab) == 64 and vocab[0].split("\t")[0] == "<pad>"

    r = _cli("--input", str(tmp_path / "missing.txt"), "--output-prefix", str(prefix),
             "--vocab-size", "64")
    assert r.returncode == 2 and "missing.txt: no such file" in r.stderr


def test_train_tokenizer_cli_bad_vocab_size_exits_2_and_help_names_every_flag(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import train_tokenizer as cli
    finally:
        sys.path.remove(str(ROOT / "tools"))
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CORPUS) + "\n")
    for size, says in (("5000", "--vocab-size 5000 is too large"), ("2", "--vocab-size 2 is too small")):
        assert cli.main(["--input", str(captions), "--output-prefix", str(tmp_path / "x"),
                         "--vocab-size", size, "--model-type", "bpe"]) == 2
        assert says in capsys.readouterr().err
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".x*"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--input", "--output-prefix", "--vocab-size", "--model-type", "--lowercase",
                 "--no-lowercase", "--max-sentences", "--character-coverage"):
        assert flag in help_text
