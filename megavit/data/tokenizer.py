"""Text tokenizer for image-text training: a SentencePiece model plus a small text cleaner.

    tok = Tokenizer.load("runs/tok/spm.model", context_length=16)
    ids = tok.encode(["A photo of the number 7.", "the digit 3"])   # [2, 16] int64
    tok.decode(ids)            # ['a photo of the number 7.', 'the digit 3']

Layout of one row of `encode` (context length L): the SentencePiece ids of the cleaned text,
cut to L - 1 ids, then EOS, then PAD up to L. There is no BOS. EOS is always present, so a
text tower that pools at EOS finds it as the row's first EOS id. PAD is the model's pad
piece, or with `pad_with_eos` the EOS id itself (real SigLIP tokenizers: pad_token `</s>`;
then padding and EOS are one id, told apart only by position: everything after the first
EOS is padding).

Special ids: models trained by `train_tokenizer` (and tools/train_tokenizer.py) fix them
to the T5 convention, whatever the corpus:

    PAD_ID = 0   '<pad>'     EOS_ID = 1   '</s>'     UNK_ID = 2   '<unk>'     BOS_ID = 3   '<s>'

`Tokenizer.load` reads the ids from the model file (a T5-style model from elsewhere works
too) and refuses one without an EOS id, or without a pad id unless it pads with EOS.

Cleaning happens before SentencePiece, both when training and encoding, in one of two ways
(`CLEANINGS`, the text tower's --text-cleaning):

- 'megavit' (`TextCleaner`): optional lower-casing, optional punctuation removal, whitespace
  runs collapsed to one space and the ends stripped;
- 'siglip' (`SiglipCleaner`): exactly transformers' `SiglipTokenizer` (its `tokenize` and
  `canonicalize_text`): '▁' becomes a space, lower-casing, every character of Python's
  `string.punctuation` deleted, `re`'s whitespace runs collapsed, ends stripped.

SentencePiece's own normaliser (its default `nmt_nfkc`: Unicode NFKC) runs after that,
inside the model, so `decode(encode(x)) == clean(x)` holds for text whose characters are in
the vocabulary and unchanged by NFKC (plain ASCII is).
"""

from __future__ import annotations

import io
import os
import re
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, Union

import regex
import torch

from megavit.errors import UserError

if TYPE_CHECKING:
    from megavit.config import TextConfig

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
# The file name a two-tower checkpoint (and its export) keeps the sentencepiece model under.
TOKENIZER_FILE = "tokenizer.model"
_TRAIN_HINT = ("train one with `python tools/train_tokenizer.py --input captions.txt "
               "--output-prefix PREFIX --vocab-size N` and pass PREFIX.model")


class TokenizerError(UserError, ValueError):
    """A tokenizer model cannot be loaded or trained; the message names the file or flag
    and the fix."""


_WHITESPACE = regex.compile(r"\s+")
_PUNCTUATION = regex.compile(r"\p{P}+")
_UPPER = regex.compile(r"\p{Lu}")


@dataclass(frozen=True)
class TextCleaner:
    """Text -> the text the tokenizer sees. In order:

    - `lowercase`: str.lower() (Unicode-aware);
    - `strip_punctuation`: every run of Unicode punctuation (category P: . , ! ? - ' " ( ) …)
      becomes one space ("well-known." -> "well known"); symbols such as $ + = are kept;
    - whitespace runs (any Unicode space, tab or newline) become one space; ends stripped.
    """

    lowercase: bool = True
    strip_punctuation: bool = False

    def __call__(self, text: str) -> str:
        if self.lowercase:
            text = text.lower()
        if self.strip_punctuation:
            text = _PUNCTUATION.sub(" ", text)
        return _WHITESPACE.sub(" ", text).strip()


_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)
_RE_WHITESPACE = re.compile(r"\s+")   # `re`'s, not `regex`'s: they differ on U+001C..U+001F


@dataclass(frozen=True)
class SiglipCleaner:
    """Text -> the text transformers' `SiglipTokenizer` hands SentencePiece, character for
    character (its `tokenize` then `canonicalize_text`), in order:

    - '▁' (SentencePiece's space mark) becomes a space;
    - `lowercase` (SiglipTokenizer's do_lower_case, True in SigLIP's checkpoints): str.lower();
    - every character of Python's `string.punctuation` (the 32 ASCII ones: !"#$%&'()*+,-./:;
      <=>?@[\\]^_`{|}~) is deleted, not replaced ("well-known" -> "wellknown"); non-ASCII
      punctuation stays;
    - runs of `re`'s whitespace become one space; ends stripped.
    """

    lowercase: bool = True

    def __call__(self, text: str) -> str:
        text = text.replace("\u2581", " ")
        if self.lowercase:
            text = text.lower()
        text = text.translate(_ASCII_PUNCTUATION)
        return _RE_WHITESPACE.sub(" ", text).strip()


Cleaner = Union[TextCleaner, SiglipCleaner]
CLEANINGS = ("megavit", "siglip")


def make_cleaner(cleaning: str, lowercase: bool = True, strip_punctuation: bool = False
                 ) -> Cleaner:
    """The cleaner of `cleaning` ('megavit' or 'siglip', see CLEANINGS); `strip_punctuation`
    is megavit's only (SigLIP's cleaning has its own punctuation rule)."""
    if cleaning not in CLEANINGS:
        raise TokenizerError(f"--text-cleaning {cleaning!r}: expected one of {CLEANINGS}")
    if cleaning == "megavit":
        return TextCleaner(lowercase, strip_punctuation)
    if strip_punctuation:
        raise TokenizerError("strip_punctuation belongs to --text-cleaning megavit; 'siglip' "
                             "deletes ASCII punctuation itself")
    return SiglipCleaner(lowercase)


class Tokenizer:
    """A SentencePiece model, a cleaner and a fixed context length. Picklable (loader
    workers get a copy of the model bytes). `pad_with_eos`: pad with the EOS id instead of
    the model's pad piece (which the model then need not have)."""

    def __init__(self, model_proto: bytes, context_length: int, cleaner: Cleaner,
                 path: str = "<memory>", pad_with_eos: bool = False) -> None:
        import sentencepiece as spm

        if context_length < 2:
            raise TokenizerError(f"context length {context_length} is too small: a row holds at "
                                 "least one token and EOS; use --context-length 2 or more")
        if not model_proto:
            raise TokenizerError(f"{path}: an empty file, not a SentencePiece model; "
                                 f"{_TRAIN_HINT}")
        try:
            sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            raise TokenizerError(f"{path}: not a SentencePiece model (it does not parse); "
                                 f"{_TRAIN_HINT}") from None
        if (sp.pad_id() < 0 and not pad_with_eos) or sp.eos_id() < 0:
            missing = "EOS" if sp.eos_id() < 0 else "pad"
            other = " or pad with EOS (--text-pad-with-eos)" if missing == "pad" else ""
            raise TokenizerError(f"{path}: the model has no {missing} piece (pad id {sp.pad_id()}, "
                                 f"EOS id {sp.eos_id()}); {_TRAIN_HINT}{other}")
        self.path = path
        self.context_length = context_length
        self.cleaner = cleaner
        self.pad_with_eos = pad_with_eos
        self._proto = model_proto
        self._sp = sp

    @classmethod
    def load(cls, path: str | os.PathLike, context_length: int, lowercase: bool | None = None,
             strip_punctuation: bool = False, cleaning: str = "megavit",
             pad_with_eos: bool = False) -> Tokenizer:
        """Load PATH (a SentencePiece `.model`), cleaning text by `cleaning` (CLEANINGS).
        `lowercase=None` (auto): 'siglip' always lower-cases (as SigLIP's tokenizers do);
        'megavit' lower-cases the input when no piece of the vocabulary holds an upper-case
        letter, i.e. when the model was trained on lower-cased text (and lower-casing cannot
        lose a piece it knows). `pad_with_eos`: see the class."""
        p = Path(os.path.expanduser(str(path)))
        try:
            proto = p.read_bytes()
        except FileNotFoundError:
            raise TokenizerError(f"{p}: no such tokenizer model; {_TRAIN_HINT}") from None
        except OSError as e:
            raise TokenizerError(f"{p}: cannot read the tokenizer model ({e.strerror}); "
                                 f"{_TRAIN_HINT}") from None
        tok = cls(proto, context_length, make_cleaner(cleaning, True, strip_punctuation), str(p),
                  pad_with_eos)
        if lowercase is None:
            lowercase = cleaning == "siglip" or not tok._has_upper_case_piece()
        tok.cleaner = make_cleaner(cleaning, lowercase, strip_punctuation)
        return tok

    def _has_upper_case_piece(self) -> bool:
        sp = self._sp
        return any(_UPPER.search(sp.id_to_piece(i)) for i in range(sp.get_piece_size())
                   if not (sp.is_control(i) or sp.is_unknown(i)))

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "context_length": self.context_length,
                "cleaner": self.cleaner, "path": self.path, "pad_with_eos": self.pad_with_eos}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["context_length"], state["cleaner"], state["path"],
                      state.get("pad_with_eos", False))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, "
                f"context_length={self.context_length}, {self.cleaner}"
                f"{', pad_with_eos=True' if self.pad_with_eos else ''})")

    @property
    def model_proto(self) -> bytes:
        """The SentencePiece model file's bytes."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """The id after EOS up to the context length: the pad piece's, or EOS's."""
        return self.eos_id if self.pad_with_eos else self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def clean(self, text: str) -> str:
        return self.cleaner(text)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ids [n, context_length] int64: cleaned text's ids cut to L - 1, EOS, PAD."""
        if isinstance(texts, str):
            texts = [texts]
        n, L = len(texts), self.context_length
        out = torch.full((n, L), self.pad_id, dtype=torch.long)
        if n == 0:
            return out
        pieces = self._sp.encode([self.cleaner(t) for t in texts])
        eos = self.eos_id
        for row, ids in enumerate(pieces):
            ids = ids[:L - 1]
            ids.append(eos)
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]
               ) -> str | list[str]:
        """Ids [L] -> str, or [n, L] -> list[str]; each row is cut at its first EOS (so
        padding with EOS is dropped too) and pad ids are dropped."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        single = not rows or not isinstance(rows[0], (list, tuple))
        if single:
            rows = [rows]
        eos, pad = self.eos_id, self.pad_id
        texts = []
        for row in rows:
            row = list(row)
            if eos in row:
                row = row[:row.index(eos)]
            texts.append(self._sp.decode([i for i in row if i != pad]))
        return texts[0] if single else texts


def load_for_text_tower(path: str | os.PathLike, text: "TextConfig") -> Tokenizer:
    """`Tokenizer.load` as a text tower configured by `text` reads captions: its
    --context-length, --text-cleaning and --text-pad-with-eos."""
    return Tokenizer.load(path, text.context_length, cleaning=text.text_cleaning,
                          pad_with_eos=text.text_pad_with_eos)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def _sentences(source: Iterable[str] | Path, cleaner: Cleaner, max_sentences: int | None,
               on_progress: Callable[[int, int, bool], None] | None,
               used: list[int]) -> Iterator[str]:
    """The cleaned, non-empty texts of `source` (an iterable, or a UTF-8 file read line by
    line with undecodable bytes replaced), the first `max_sentences` of them; counts them in
    used[0] and reports (lines, bytes, done) read so far (characters for an iterable)."""
    lines = nbytes = 0
    f = open(source, "rb") if isinstance(source, Path) else None
    try:
        for raw in f if f is not None else source:
            if max_sentences is not None and used[0] >= max_sentences:
                break
            lines += 1
            nbytes += len(raw)
            text = raw.decode("utf-8", errors="replace") if f is not None else raw
            if on_progress is not None and lines % 4096 == 0:
                on_progress(lines, nbytes, False)
            text = cleaner(text)
            if text:
                used[0] += 1
                yield text
    finally:
        if f is not None:
            f.close()
        if on_progress is not None:
            on_progress(lines, nbytes, True)


def train_tokenizer(texts: Iterable[str] | str | os.PathLike, model_prefix: str | os.PathLike,
                    vocab_size: int, model_type: str = "unigram", lowercase: bool = True,
                    strip_punctuation: bool = False, character_coverage: float = 0.9995,
                    max_sentences: int | None = None,
                    on_progress: Callable[[int, int, bool], None] | None = None,
                    cleaning: str = "megavit") -> Path:
    """Train a SentencePiece model in-process and write PREFIX.model and PREFIX.vocab (each
    written under a temporary name and renamed, so a failure leaves neither half-written).

    texts: an iterable of strings, or the path of a UTF-8 text file with one text per line.
    Every text goes through `make_cleaner(cleaning, lowercase, strip_punctuation)` first
    (train with the cleaning the text tower will use: --text-cleaning); empty results are
    dropped; `max_sentences` keeps the first N non-empty texts. `on_progress(lines,
    bytes, done)` is called while the input is read (every 4096 lines, and once with
    done=True at its end; bytes are characters for an iterable of strings).
    `character_coverage`: the share of characters the vocabulary must cover (SentencePiece's
    option; 1.0 keeps every character, rarer ones become <unk> otherwise). Special ids are
    fixed: pad 0, EOS 1, unk 2, BOS 3. SentencePiece holds all texts in memory while
    training; cap large corpora with `max_sentences`.
    Returns the path of PREFIX.model. Raises TokenizerError for a vocabulary size the corpus
    cannot fill (naming --vocab-size and the largest it allows) or one too small."""
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise TokenizerError(f"--model-type {model_type}: expected 'unigram' or 'bpe'")
    if vocab_size <= 4:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small: the vocabulary holds 4 "
                             "special pieces (pad, EOS, unk, BOS) plus the corpus's characters")
    if not 0.98 <= character_coverage <= 1.0:
        raise TokenizerError(f"--character-coverage {character_coverage}: SentencePiece takes "
                             "0.98 to 1.0")
    if isinstance(texts, (str, os.PathLike)):
        texts = Path(os.path.expanduser(str(texts)))
        if not texts.is_file():
            raise TokenizerError(f"{texts}: no such text file (expected one caption per line)")
    used = [0]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_sentences(texts, make_cleaner(cleaning, lowercase,
                                                             strip_punctuation),
                                         max_sentences, on_progress, used),
            model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, minloglevel=1,  # its warnings only
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", bos_piece="<s>")
    except RuntimeError as e:
        raise _training_error(str(e), vocab_size, model_type, used[0]) from None
    return _write_model(model.getvalue(), Path(os.path.expanduser(str(model_prefix))))


def _training_error(message: str, vocab_size: int, model_type: str,
                    sentences: int) -> TokenizerError:
    """SentencePiece's trainer message -> what to change."""
    if sentences == 0:
        return TokenizerError("no text to train the tokenizer on (the input is empty after "
                              "cleaning)")
    too_high = re.search(r"Vocabulary size too high.*?<= *(\d+)", message)
    if too_high:
        return TokenizerError(
            f"--vocab-size {vocab_size} is too large for this corpus ({sentences} texts): "
            f"{model_type} training on it yields at most {too_high.group(1)} pieces; pass "
            f"--vocab-size {too_high.group(1)} or less, or train on more text")
    too_small = re.search(r"smaller than required_chars\. *(\d+) vs (\d+)", message)
    if too_small:
        return TokenizerError(
            f"--vocab-size {vocab_size} is too small: the corpus needs {too_small.group(2)} pieces "
            f"for its characters and the special pieces; pass --vocab-size "
            f"{too_small.group(2)} or more, or lower --character-coverage")
    return TokenizerError(f"SentencePiece training failed: {message}")


def _write_model(proto: bytes, prefix: Path) -> Path:
    """PREFIX.model (the bytes) and PREFIX.vocab ('piece<TAB>score' per id, SentencePiece's
    format), each written to a temporary file in the same folder, then renamed."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                    for i in range(sp.get_piece_size()))
    final = {".model": proto, ".vocab": vocab.encode("utf-8")}
    staged: dict[str, str] = {}
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for suffix, data in final.items():
            # (not mkstemp: its 0600 mode would survive the rename; "xb" honours the umask)
            tmp = f"{prefix.parent}/.{prefix.name}{suffix}.{os.getpid()}.{secrets.token_hex(4)}"
            staged[suffix] = tmp
            with open(tmp, "xb") as f:
                f.write(data)
        for suffix, tmp in staged.items():
            os.replace(tmp, f"{prefix}{suffix}")
    except OSError as e:      # a file where a folder should be, no permission, disk full
        raise TokenizerError(f"--output-prefix {prefix}: cannot write there "
                             f"({e.strerror})") from None
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return Path(f"{prefix}.model")
