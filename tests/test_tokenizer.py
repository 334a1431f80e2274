"""The caption tokenizer: SentencePiece training, the encoded row layout, errors, the CLI;
--text-cleaning siglip gives transformers' SiglipTokenizer's ids for any text (fuzzed), and
--text-pad-with-eos pads with EOS."""

from __future__ import annotations

import os
import pickle
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavit.data.captions import (DIGIT_CONTEXT_LENGTH, digit_caption_corpus,
                                   digit_tokenizer)
from megavit.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, SiglipCleaner,
                                    TextCleaner, Tokenizer, TokenizerError, make_cleaner,
                                    train_tokenizer)
from tests import cli

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
    return cli.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), *args],
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
                 "--no-lowercase", "--max-sentences", "--character-coverage", "--text-cleaning"):
        assert flag in help_text


# ---------------------------------------------------------------------------------------
# --text-cleaning siglip and --text-pad-with-eos
# ---------------------------------------------------------------------------------------

# ASCII punctuation inside and around words, symbols, digits, case, whitespace of every
# kind (U+001C..U+001F are whitespace to `re`, not to `regex`), SentencePiece's space mark,
# non-ASCII letters and punctuation, NFKC-changed characters, special pieces' text.
HARD = ["well-known", "A Photo of the NUMBER 7.", "  lots   of\tspace \n", "7, written by hand",
        "$5 + 3 = 8^2 | ~x `y` <z> #1 @a 50% & {b} [c] (d) \\e/f_g;h*i:j!k?l'm\"n",
        "", " ", "...", "\u2581hello", "a\u2581b", "x \u2581 y", "\x1chello\x1f world",
        "a\u00a0b\u2003c\u3000d\u0085e", "\u200bzero", "É Ü ẞ straße İstanbul", "ﬁve ①②",
        "one—two «three» … four", "<unk>", "</s> one", "one</s>two", "<pad>", "0123456789" * 3]


def _siglip_files(tmp_path: Path, pad_token: str = "<pad>") -> tuple[Path, Path]:
    """A SentencePiece model trained on SigLIP-canonicalised text (punctuation-free, so its
    vocabulary lacks < > / and these become <unk>) and SigLIP's tokenizer files around it,
    as megavit's export writes them."""
    import json

    words = "zero one two three four five six seven eight nine photo number digit well known"
    corpus = [f"{w} {v} {i} $5 é ü ß" for i, (w, v) in
              enumerate(zip(words.split() * 3, reversed(words.split() * 3)))]
    model = train_tokenizer(corpus, tmp_path / "spm", 48, "unigram", character_coverage=1.0,
                            cleaning="siglip")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "spiece.model").write_bytes(model.read_bytes())
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "SiglipTokenizer", "do_lower_case": True, "pad_token": pad_token,
         "eos_token": "</s>", "unk_token": "<unk>", "model_input_names": ["input_ids"],
         "split_special_tokens": True}))
    return model, hf


def test_siglip_cleaner_is_siglip_tokenizers_canonicalisation(tmp_path):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(_siglip_files(tmp_path)[1]))
    for text in HARD:   # (its `tokenize` turns the space mark into a space first)
        assert SiglipCleaner()(text) == theirs.canonicalize_text(text.replace("\u2581", " "))
    assert SiglipCleaner()("Well-known, isn't it?!") == "wellknown isnt it"
    assert SiglipCleaner()("«Non-ASCII» … stays") == "«nonascii» … stays"
    assert TextCleaner()("a\x1cb") == "a\x1cb" and SiglipCleaner()("a\x1cb") == "a b"


@pytest.mark.parametrize("pad_token", ["<pad>", "</s>"])
def test_siglip_cleaning_gives_siglip_tokenizers_ids_for_any_text(tmp_path, pad_token):
    """Hard cases and 1500 random strings (ASCII printable with the hard characters),
    truncated and padded to 12 tokens, padding with the pad piece or with </s>."""
    import random

    from transformers import AutoTokenizer

    model, hf = _siglip_files(tmp_path, pad_token)
    theirs = AutoTokenizer.from_pretrained(str(hf))
    ours = Tokenizer.load(model, 12, cleaning="siglip", pad_with_eos=pad_token == "</s>")
    rnd = random.Random(0)
    alphabet = string.printable + "\u2581éüßÉ\u00a0\u3000—«»①ﬁİΣ\x1c\u0085\u200b"
    pieces = ["seven", "Seven", "7.", "well-known", "$5", "<unk>", "</s>", "<pad>", "  ", "\u2581"]
    texts = HARD + ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 24)))
                    for _ in range(1000)]
    texts += [" ".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 8))) for _ in range(500)]
    expected = theirs(texts, padding="max_length", truncation=True, max_length=12,
                      return_tensors="pt")["input_ids"]
    assert torch.equal(ours.encode(texts), expected)
    assert ours.pad_id == theirs.pad_token_id and ours.eos_id == theirs.eos_token_id


def test_pad_with_eos_pads_with_eos_and_needs_no_pad_piece(model_path, tmp_path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    tok = Tokenizer.load(model_path, 12, pad_with_eos=True)
    ids = tok.encode(["the digit 3", "a"])
    assert tok.pad_id == tok.eos_id == EOS_ID
    assert (ids[:, -1] == EOS_ID).all() and (ids == PAD_ID).sum() == 0
    assert tok.decode(ids) == ["the digit 3", "a"]
    assert pickle.loads(pickle.dumps(tok)).pad_with_eos
    proto = pb.ModelProto.FromString(model_path.read_bytes())
    proto.pieces[PAD_ID].type = pb.ModelProto.SentencePiece.USER_DEFINED   # no pad piece
    proto.trainer_spec.pad_id = -1
    (tmp_path / "nopad.model").write_bytes(proto.SerializeToString())
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "nopad.model")).pad_id() < 0
    assert Tokenizer.load(tmp_path / "nopad.model", 8, pad_with_eos=True).pad_id == EOS_ID
    with pytest.raises(TokenizerError, match="no pad piece"):
        Tokenizer.load(tmp_path / "nopad.model", 8)


def test_cleaning_choices_and_siglip_training(tmp_path):
    assert make_cleaner("siglip") == SiglipCleaner()
    assert Tokenizer.load(train_tokenizer(CORPUS, tmp_path / "cased", 64, "bpe", lowercase=False,
                                          character_coverage=1.0), 8,
                          cleaning="siglip").cleaner == SiglipCleaner(lowercase=True)
    with pytest.raises(TokenizerError, match="--text-cleaning 't5'"):
        make_cleaner("t5")
    with pytest.raises(TokenizerError, match="strip_punctuation belongs to --text-cleaning megavit"):
        make_cleaner("siglip", strip_punctuation=True)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CORPUS) + "\n")
    r = _cli("--input", str(captions), "--output-prefix", str(tmp_path / "sig"), "--vocab-size",
             "48", "--model-type", "bpe", "--character-coverage", "1.0", "--text-cleaning",
             "siglip")
    assert r.returncode == 0 and "| cleaning siglip |" in r.stdout, r.stderr
    tok = Tokenizer.load(tmp_path / "sig.model", 32, cleaning="siglip")
    pieces = [tok._sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert not any(c in string.punctuation for p in pieces[4:] for c in p)   # none trained
    assert tok.decode(tok.encode(CORPUS)) == [SiglipCleaner()(t) for t in CORPUS]
    r = _cli("--input", str(captions), "--output-prefix", str(tmp_path / "bad"), "--vocab-size",
             "48", "--text-cleaning", "siglip", "--strip-punctuation")
    assert r.returncode == 2 and "strip_punctuation belongs" in r.stderr
