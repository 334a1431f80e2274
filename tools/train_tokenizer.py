"""Train a SentencePiece tokenizer on captions (one per line) for image-text training.

    python tools/train_tokenizer.py --input captions.txt --output-prefix runs/tok/spm --vocab-size 8000
    python tools/train_tokenizer.py --input digits.txt --output-prefix runs/tok/digits \\
        --vocab-size 128 --model-type bpe --character-coverage 1.0

Writes PREFIX.model and PREFIX.vocab (under temporary names, renamed at the end: a failed
run leaves neither). The ids of the special pieces are fixed: pad 0, EOS 1, unk 2, BOS 3.
Progress while the input is read, one line every half second and one at its end:

    train_tokenizer | lines 120000 | MiB 12.3 | MiB/s 45.6 | 0.3 s
    train_tokenizer | lines 300000 | MiB 11.2 | MiB/s 40.1 | 0.3 s | input read, training

Exit status 2 with a message for a missing or binary input file, an output prefix that
cannot be written, or a vocabulary size the corpus cannot give (the message names the
largest one it allows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megavit.config.fields import finite_float
from megavit.data.tokenizer import CLEANINGS, TokenizerError, train_tokenizer


class _Progress:
    """Prints `train_tokenizer | lines N | MiB x | MiB/s y | t s` at most every `every`
    seconds while the input is read, and once at its end."""

    def __init__(self, every: float = 0.5) -> None:
        self.start = self.last = time.perf_counter()
        self.every = every

    def __call__(self, lines: int, nbytes: int, done: bool) -> None:
        now = time.perf_counter()
        if not done and now - self.last < self.every:
            return
        self.last = now
        elapsed, mib = now - self.start, nbytes / 2**20
        print(f"train_tokenizer | lines {lines} | MiB {mib:.1f} | "
              f"MiB/s {mib / max(elapsed, 1e-9):.1f} | {elapsed:.1f} s"
              f"{' | input read, training' if done else ''}", flush=True)


def _input_problem(path: Path) -> str | None:
    """Why --input cannot be read as captions, or None."""
    if not path.exists():
        return f"--input {path}: no such file"
    if not path.is_file():
        return (f"--input {path}: " + ("a directory" if path.is_dir() else "not a regular file "
                                       "(a pipe?)") + "; give a text file, one caption per line")
    try:
        with open(path, "rb") as f:
            binary = b"\0" in f.read(1 << 16)
    except OSError as e:
        return f"--input {path}: cannot read ({e.strerror})"
    return (f"--input {path}: a binary file, not text with one caption per line" if binary
            else None)


def _prefix_problem(prefix: Path) -> str | None:
    """Why PREFIX.model cannot be written (a file where a folder should be), or None."""
    folder = prefix.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"--output-prefix {prefix}: {folder} is a file, so the folder cannot be made"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True,
                   help="UTF-8 text file, one caption per line (empty lines are skipped)")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.model and PREFIX.vocab (folders are created)")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="number of pieces, the 4 special ones included; too large for the "
                        "corpus is an error naming the largest size it allows")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                   help="SentencePiece algorithm")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True,
                   help="lower-case every caption before training (Tokenizer.load detects it)")
    p.add_argument("--strip-punctuation", action="store_true",
                   help="replace punctuation runs by a space before training (then also pass "
                        "strip_punctuation=True to Tokenizer.load)")
    p.add_argument("--text-cleaning", choices=CLEANINGS, default="megavit",
                   help="clean every caption as the text tower will (pass the same "
                        "--text-cleaning to megavit.pretrain_contrastive): 'megavit' (the "
                        "--lowercase and --strip-punctuation above) or 'siglip' "
                        "(transformers' SiglipTokenizer: lower-cased, ASCII punctuation "
                        "deleted; --lowercase still applies, --strip-punctuation does not)")
    p.add_argument("--character-coverage", type=finite_float, default=0.9995,
                   help="share of the corpus's characters the vocabulary must cover (1.0: "
                        "all; rarer characters become <unk> otherwise)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on the first N non-empty lines only (SentencePiece holds the "
                        "whole corpus in memory: cap it for very large inputs)")
    args = p.parse_args(argv)

    if problem := _input_problem(Path(args.input)) or _prefix_problem(Path(args.output_prefix)):
        print(f"train_tokenizer: error: {problem}", file=sys.stderr)
        return 2
    if args.max_sentences is not None and args.max_sentences < 1:
        print(f"train_tokenizer: error: --max-sentences {args.max_sentences}: must be at least 1",
              file=sys.stderr)
        return 2
    progress = _Progress()
    try:
        model = train_tokenizer(args.input, args.output_prefix, args.vocab_size, args.model_type,
                                lowercase=args.lowercase, strip_punctuation=args.strip_punctuation,
                                character_coverage=args.character_coverage,
                                max_sentences=args.max_sentences, on_progress=progress,
                                cleaning=args.text_cleaning)
    except TokenizerError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train_tokenizer: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"train_tokenizer | wrote {model} and {model.with_suffix('.vocab')} | vocab "
          f"{args.vocab_size} | {args.model_type} | "
          f"{'lowercase' if args.lowercase else 'cased'} | cleaning {args.text_cleaning} | "
          f"pad 0 eos 1 unk 2 bos 3 | "
          f"{time.perf_counter() - progress.start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
