"""User-facing tools."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return cli.run([sys.executable, str(ROOT / "tools" / "model_summary.py"), *args],
                   capture_output=True, text=True, timeout=120)


def test_model_summary_vit22b_tp8():
    proc = _run("--preset", "vit-22b", "--tensor-model-parallel-size", "8")
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.splitlines()[-1]
    total, per_rank = [float(x.replace(",", "")) for x in re.findall(r"([\d,]+\.\d) M", row)]
    assert 22_000 < total < 22_400               # 21.74 B in the blocks + MAP head, embeddings
    assert total / 8 < per_rank < total / 8 * 1.01   # replicated norms/embeddings are small


def test_model_summary_lists_every_preset_and_refuses_bad_tp():
    proc = _run()
    assert proc.returncode == 0 and proc.stdout.count("| vit-") == 10
    bad = _run("--preset", "vit-b", "--tensor-model-parallel-size", "5")
    assert bad.returncode == 2 and "does not divide --num-attention-heads 12" in bad.stderr


def test_model_summary_follows_patch_merging():
    """Each stage's input tokens after the merges before it; fewer FLOPs than unmerged."""
    flags = ["--preset", "vit-b", "--img-h", "256", "--img-w", "256",
             "--pipeline-model-parallel-size", "4"]
    merged, plain = _run(*flags, "--patch-merge-layers", "2,5"), _run(*flags)
    assert merged.returncode == 0 and plain.returncode == 0, merged.stderr + plain.stderr
    rows = [r.split("|") for r in merged.stdout.splitlines()[2:]]
    assert [r[2].strip() for r in rows] == ["256", "64", "16", "16"]
    # --feature-layers: the maps of blocks 2 (256 tokens) and 5 (64) travel with them
    carried = _run(*flags, "--patch-merge-layers", "2,5", "--feature-layers", "2,5,11")
    assert carried.returncode == 0, carried.stderr
    rows = [r.split("|") for r in carried.stdout.splitlines()[2:]]
    assert [r[2].strip() for r in rows] == ["256", "64+256", "16+320", "16+320"]
    gflops = [float(r.split("|")[6]) for r in (merged.stdout.splitlines()[2],
                                               plain.stdout.splitlines()[2])]
    assert gflops[0] < 0.5 * gflops[1]


def test_print_schedule_tool():
    proc = cli.run([sys.executable, str(ROOT / "tools" / "print_schedule.py"),
                    "--pipeline-model-parallel-size", "4", "--micro-batches", "8",
                    "--virtual-stages", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and all("bubble 0.158" in line for line in lines[:4])
    assert lines[-1] == "theory (P-1)/(v*m+P-1) = 0.158 (P=4, v=2, m=8)"
    bad = cli.run([sys.executable, str(ROOT / "tools" / "print_schedule.py"),
                   "--pipeline-model-parallel-size", "4", "--micro-batches", "6",
                   "--virtual-stages", "2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "multiple of --pipeline-model-parallel-size 4" in bad.stderr
    zb = cli.run([sys.executable, str(ROOT / "tools" / "print_schedule.py"),
                  "--pipeline-model-parallel-size", "4", "--micro-batches", "8",
                  "--schedule", "zb-h1"], capture_output=True, text=True, timeout=60)
    assert zb.returncode == 0, zb.stderr
    assert all("bubble 0.111" in line for line in zb.stdout.splitlines()[:4]), zb.stdout
    assert "theory zero bubble H1" in zb.stdout and "1F1B: 0.273" in zb.stdout


def test_vit22b_ranks_own_exactly_the_serial_parameters():
    """ViT-22B on paper at TP=8 x PP=4 (32 ranks) and TP=8 x PP=6 with 2 virtual stages
    (48 ranks): what the ranks own sums to the serial count (~22.2 B, 21.74 B in blocks)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from model_summary import rank_counts, serial_count

    from megavit.config import preset_model_config
    from megavit.parallel.pipeline_layout import PipelineLayout

    import torch

    from megavit.models.transformer import Runtime
    from megavit.models.vit import VisionTransformer
    from megavit.parallel.comm import CommStats, Group

    cfg = preset_model_config("vit-22b", num_classes=1000)
    total = serial_count(cfg)
    assert 22.1e9 < total < 22.3e9
    with torch.device("meta"):
        serial_names = {n for n, _ in VisionTransformer(
            cfg, Runtime(Group.single("tp", CommStats()))).named_parameters()}
    for layout in (PipelineLayout.from_flags(48, 4, None, None, None),
                   PipelineLayout.from_flags(48, 6, 4, None, None)):
        rows = rank_counts(cfg, layout, tp=8)
        assert len(rows) == 8 * layout.stages
        assert sum(r["owned"] for r in rows) == total
        stages = [[r["names"] for r in rows if r["stage"] == k] for k in range(layout.stages)]
        assert all(names == ranks[0] for ranks in stages for names in ranks)   # same per TP rank
        per_stage = [ranks[0] for ranks in stages]
        assert sum(len(n) for n in per_stage) == len(serial_names)            # no block twice
        assert set().union(*per_stage) == serial_names                        # none missing
        held = {r["stage"]: r["held"] for r in rows}
        assert max(held.values()) < 1.2 * total / (8 * layout.stages)


# One new interpreter, for the two checks below: it starts each entry point (as
# `python -m MODULE --help` / `python SCRIPT --help` do: runpy, as __main__) and then imports
# each benchmark, printing one JSON line [kind, name, "ok" or the traceback] per item.
FRESH = """
import contextlib, importlib.util, io, json, pathlib, runpy, sys, traceback
root = sys.argv[1]


def check(kind, name, fn):
    try:
        fn()
        result = "ok"
    except BaseException:
        result = traceback.format_exc()
    print(json.dumps([kind, name, result]), flush=True)


def start(kind, target):
    sys.argv = [target, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code
    assert status in (0, None), (target, status)
    assert "usage:" in out.getvalue(), (target, out.getvalue())


def load(path):
    spec = importlib.util.spec_from_file_location("benchmarks." + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert callable(module.main), path


for module in ("megavit.pretrain", "megavit.pretrain_contrastive", "megavit.segment",
               "megavit.predict", "megavit.distill"):
    check("entry", module, lambda: start("module", module))
for path in sorted(pathlib.Path(root, "tools").glob("*.py")):
    check("entry", path.name, lambda: start("script", str(path)))
sys.path.insert(0, root)
for path in sorted(pathlib.Path(root, "benchmarks").glob("*.py")):
    check("benchmark", path.name, lambda: load(path))
"""


@pytest.fixture(scope="module")
def fresh_interpreter() -> dict[str, dict[str, str]]:
    """{"entry" / "benchmark": {name: "ok" or the traceback}} from one new interpreter."""
    proc = subprocess.run([sys.executable, "-c", FRESH, str(ROOT)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, dict[str, str]] = {"entry": {}, "benchmark": {}}
    for line in proc.stdout.splitlines():
        kind, name, result = json.loads(line)
        out[kind][name] = result
    return out


def test_every_benchmark_imports_against_the_current_code(fresh_interpreter):
    """Benchmarks run by hand; importing each (in one fresh process) catches the names they
    use from megavit going stale."""
    got = fresh_interpreter["benchmark"]
    assert sorted(got) == sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
    for name, result in got.items():
        assert result == "ok", f"{name}:\n{result}"


def test_every_entry_point_starts_in_a_fresh_interpreter(fresh_interpreter):
    """The other tests run entry points through tests/cli.py, forked from the test process
    with its modules loaded. Here a new interpreter imports and starts each tool and
    `python -m megavit.pretrain(_contrastive)` in turn, as `python SCRIPT --help` /
    `python -m MODULE --help` do (runpy, as __main__): each prints its usage and exits 0."""
    got = fresh_interpreter["entry"]
    assert sorted(got) == sorted(["megavit.pretrain", "megavit.pretrain_contrastive",
                                  "megavit.segment", "megavit.predict",
                                  "megavit.distill"] + [
        p.name for p in (ROOT / "tools").glob("*.py")])
    assert len(got) > 10                      # the glob found the tools
    for name, result in got.items():
        assert result == "ok", f"{name}:\n{result}"
