"""Training curves of one or several runs, from their --metrics-file JSON lines.

    python tools/plot_metrics.py runs/quickstart/metrics.jsonl --output curves.png
    python tools/plot_metrics.py a.jsonl b.jsonl --labels "lr 1e-3" "lr 3e-3" --output cmp.png

One figure, a panel per quantity the runs logged: training loss (with the held-out loss
when evaluated), learning rate, gradient norm, throughput (images or pairs per second),
MFU, loss scale (fp16), and the held-out metrics (accuracy, zero-shot accuracy, recall...).
Each run is one colour in every panel. Panels nobody logged are left out. The figure is
written to a temporary file and renamed into place. Exit status 2 with a message for a
missing or malformed file, or an --output that cannot be written (a folder, a format
matplotlib does not write, no permission).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from megavit.errors import UserError

# (panel title, the keys drawn in it, y axis in log scale)
TRAIN_PANELS = (
    ("loss", ("loss",), False),
    ("learning rate", ("lr",), False),
    ("gradient norm", ("grad_norm",), True),
    ("throughput per second", ("images_per_second", "pairs_per_second"), False),
    ("MFU", ("mfu",), False),
    ("loss scale", ("loss_scale",), True),
)
EVAL_SKIP = {"iteration", "kind", "eval_images", "eval_pairs"}


class MetricsError(UserError):
    """A metrics file that cannot be plotted; the message names the file and line."""


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a --metrics-file."""
    if not path.is_file():
        raise MetricsError(f"{path}: " + ("a directory, not a --metrics-file" if path.is_dir()
                                          else "no such file"))
    train, evals = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MetricsError(f"{path}:{number}: not a JSON line ({e.msg})") from None
                if not isinstance(record, dict) or "iteration" not in record:
                    raise MetricsError(f"{path}:{number}: not a megavit metrics record")
                if record.get("kind") == "train":
                    train.append(record)
                elif record.get("kind") == "eval":
                    evals.append(record)
    except UnicodeDecodeError:
        raise MetricsError(f"{path}: not UTF-8 text, so not a --metrics-file") from None
    except OSError as e:
        raise MetricsError(f"{path}: cannot read ({e.strerror})") from None
    if not train and not evals:
        raise MetricsError(f"{path}: no training or evaluation records (is it a "
                           "--metrics-file of megavit.pretrain?)")
    return train, evals


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: list[tuple[str, list[dict], list[dict]]], output: Path) -> list[str]:
    """Draw `runs` ((label, training records, evaluation records)) into `output`; returns
    the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_keys = sorted({k for _, _, evals in runs for r in evals for k in r
                        if k not in EVAL_SKIP and k != "eval_loss"
                        and isinstance(r[k], (int, float))})
    panels = [(title, keys, log) for title, keys, log in TRAIN_PANELS
              if any(_series(train, k)[0] for _, train, _ in runs for k in keys)]
    panels += [(key.removeprefix("eval_").replace("_", " ") + " (held-out)", (key,), False)
               for key in eval_keys]
    if not panels:
        raise MetricsError("nothing to plot: the files hold no numeric metrics")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (title, keys, log) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for run_index, (label, train, evals) in enumerate(runs):
            colour = colours[run_index % len(colours)]
            source = evals if keys[0].startswith("eval_") else train
            for key in keys:
                x, y = _series(source, key)
                if x:
                    name = label if len(runs) > 1 else ("train" if title == "loss" else None)
                    ax.plot(x, y, color=colour, marker="o" if source is evals else None,
                            markersize=3, label=name)
            if title == "loss":
                x, y = _series(evals, "eval_loss")
                if x:
                    ax.plot(x, y, color=colour, linestyle="--", marker="o", markersize=3,
                            label=f"{label} held-out" if len(runs) > 1 else "held-out")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if log:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for index in range(len(panels), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    fig.tight_layout()
    partial = output.with_name(f".{output.name}.partial{output.suffix}")
    try:
        fig.savefig(partial, dpi=110)
        os.replace(partial, output)
    except OSError as e:
        raise MetricsError(f"--output {output}: cannot write ({e.strerror})") from None
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)
    return [title for title, _, _ in panels]


def _figure_formats() -> list[str]:
    """The file formats matplotlib writes (png, pdf, svg, ...), by suffix."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def main(argv=None) -> int:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", type=Path, help="--metrics-file JSON-lines files")
    p.add_argument("--output", type=Path, required=True,
                   help="the figure to write (.png, .pdf, .svg: by its suffix)")
    p.add_argument("--labels", nargs="+", help="one legend label per file (default: the "
                                               "file names)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.metrics):
        p.error(f"--labels gives {len(args.labels)} labels for {len(args.metrics)} files")
    if not args.output.parent.is_dir():
        p.error(f"--output {args.output}: {args.output.parent} is not a directory")
    if args.output.is_dir():
        p.error(f"--output {args.output}: a directory; name the figure file (e.g. "
                f"{args.output / 'curves.png'})")
    formats = _figure_formats()
    if args.output.suffix.lower().lstrip(".") not in formats:
        p.error(f"--output {args.output}: the suffix names the figure format, one of "
                + ", ".join(f".{f}" for f in formats))
    labels = args.labels or [m.stem if m.stem != "metrics" else m.parent.name or m.stem
                             for m in args.metrics]
    try:
        runs = [(label, *read_metrics(path)) for label, path in zip(labels, args.metrics)]
        panels = plot(runs, args.output)
    except MetricsError as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plot_metrics: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"plot_metrics | {len(runs)} run{'s' if len(runs) > 1 else ''} | panels "
          f"{', '.join(panels)} | output {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
