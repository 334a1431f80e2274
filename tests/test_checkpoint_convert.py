"""tools/checkpoint_convert.py: resharding for another TP size and consolidation into one
safetensors file, tensor by tensor.

- A TP=1 checkpoint resharded to TP=2 stores each sharded piece as TP=2 ranks hold it, drops
  the RNG streams, resumes at TP=2 (the training loop in two gloo processes) exactly as the
  original does, and converted back to TP=1 holds bit-identical tensors.
- The consolidated file holds the serial model's parameters, bit-identical to the weights
  `load_model` reads (and rounded like `.to(bf16)` with --dtype bf16).
- Bounded memory: converting a 260 MB checkpoint with an 8 MiB buffer grows the process's
  peak RSS by far less than the checkpoint; with a buffer larger than the checkpoint, by more
  (so the measurement can tell).
- Mistakes exit 2 with the flag or path named, and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavit.checkpointing.offline import read_tensors
from megavit.checkpointing.safe_reader import check_checkpoint
from tests import cli
from tests.harness import run_distributed
from tests.test_checkpoint_cli import COMMON, ROOT, pretrain, records

CONVERT = str(ROOT / "tools" / "checkpoint_convert.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def convert(*args: str) -> subprocess.CompletedProcess:
    return cli.run([sys.executable, CONVERT, *args], capture_output=True, text=True,
                   timeout=300, env=ENV)


def stored(checkpoint: Path) -> dict[str, torch.Tensor]:
    metadata = check_checkpoint(checkpoint)
    return read_tensors(checkpoint, metadata, list(metadata.state_dict_metadata))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A serial run's checkpoint at iteration 3 (vit-debug, dropout on: it has RNG streams)."""
    save = tmp_path_factory.mktemp("convert") / "ckpt"
    proc = pretrain("--train-iters", "3", "--save", str(save), "--hidden-dropout", "0.1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return save


def _resumed_at_tp2(pstate, loads: dict[str, Path], tmp: Path) -> dict[str, str]:
    """Each of `loads` resumed for 3 more iterations at TP=2 (this group), as
    `python -m megavit.pretrain --load ...` would: {name: what it printed}; metrics in
    tmp/NAME.jsonl."""
    from tests.harness import training_loop

    return {name: training_loop(pstate, [
        *COMMON, "--hidden-dropout", "0.1", "--train-iters", "6",
        "--tensor-model-parallel-size", "2", "--load", str(load),
        "--metrics-file", str(tmp / f"{name}.jsonl")]) for name, load in loads.items()}


def test_reshard_to_tp2_stores_tp2_blocks_resumes_identically_and_round_trips(saved, tmp_path):
    out = tmp_path / "tp2"
    proc = convert(str(saved), "--target-tensor-parallel-size", "2", "--output", str(out),
                   "--buffer-mb", "0.05")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sum(line.startswith("convert | tensors ") for line in proc.stdout.splitlines()) > 3
    converted = out / "iter_0000003"
    assert f"resharded checkpoint | iteration 3 | tp 1 -> 2 | path {converted}" in proc.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    layout = json.loads((converted / "megavit_config.json").read_text())["layout"]
    assert layout["tp"] == 2 and layout["resharded_from"]["tp"] == 1

    metadata = check_checkpoint(converted).state_dict_metadata
    assert not any(k.startswith("rng/") for k in metadata)
    assert any(k.startswith("rng/") for k in check_checkpoint(saved / "iter_0000003")
               .state_dict_metadata)

    def blocks(name):
        return [(list(c.offsets), list(c.sizes)) for c in metadata[name].chunks]

    # h = 32, f = 128: q (segment 0) and fc1 (segment 3) of the fused input projection are cut
    # by rows, the fused output projection by columns, a norm is whole
    assert blocks("model/blocks.0.in_proj.weight/0") == [([0, 0], [16, 32]), ([16, 0], [16, 32])]
    assert blocks("optimizer/exp_avg/blocks.1.in_proj.weight/3") == [([0, 0], [64, 32]),
                                                                     ([64, 0], [64, 32])]
    assert blocks("model/blocks.0.out_proj.weight/1") == [([0, 0], [32, 64]), ([0, 64], [32, 64])]
    assert blocks("model/blocks.0.norm.weight") == [([0], [32])]

    # resumed at TP=2 (two gloo processes, the training loop of megavit.pretrain): the
    # converted checkpoint and the original give the same losses and evaluation
    printed = run_distributed(2, 2, {"r": (_resumed_at_tp2, (
        {"a": saved, "b": out}, tmp_path))})["r"][0]
    assert f"loaded checkpoint | iteration 3 | path {converted}" in printed["b"]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    losses = [{r["iteration"]: r["loss"] for r in records(m, "train")} for m in (a, b)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [4, 5, 6]
    assert records(a, "eval")[-1] == records(b, "eval")[-1]

    # and back to TP=1: every stored tensor bit-identical to the original (RNG aside)
    back = tmp_path / "tp1"
    assert convert(str(out), "--target-tensor-parallel-size", "1", "--output",
                   str(back)).returncode == 0
    original = {k: v for k, v in stored(saved / "iter_0000003").items()
                if not k.startswith("rng/")}
    again = stored(back / "iter_0000003")
    assert again.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name


def test_consolidated_safetensors_holds_the_serial_weights(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megavit.checkpointing.offline import read_config
    from megavit.checkpointing.model_state import load_state, model_state_dict
    from megavit.models.vit import build_vit
    from megavit.parallel.state import serial_state

    # the weights as a resumed run loads them
    checkpoint = saved / "iter_0000003"
    _, cfg = read_config(checkpoint)
    model = build_vit(cfg, serial_state().tp, seed=123)
    state = {f"model/{k}": v for k, v in model_state_dict(model, serial_state()).items()}
    load_state(state, checkpoint, serial_state(), "model")
    expected = {n: p.detach() for n, p in model.named_parameters()}

    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        file = tmp_path / f"{dtype}.safetensors"
        proc = convert(str(saved), "--to-safetensors", str(file), "--dtype", dtype,
                       "--buffer-mb", "0.02")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"consolidated checkpoint | iteration 3 | path {file}" in proc.stdout
        weights = load_file(str(file))
        assert set(weights) == set(expected)
        for name, tensor in expected.items():
            assert weights[name].dtype == torch_dtype
            assert torch.equal(weights[name], tensor.to(torch_dtype)), name
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        assert meta["iteration"] == "3" and json.loads(meta["megavit_config"])["hidden_size"] == 32
    fresh = build_vit(cfg, serial_state().tp, seed=0)
    fresh.load_state_dict(load_file(str(tmp_path / "fp32.safetensors")), strict=True)
    assert all(torch.equal(p, expected[n]) for n, p in fresh.named_parameters())
    assert not list(tmp_path.glob("*.partial"))


def rss_growths(tool: str, *runs: list[str]) -> list[int]:
    """Peak RSS growth (bytes) of processes that each run tools/`tool`.py with one of `runs`
    (its arguments) after importing everything: VmHWM after minus before. (Not ru_maxrss:
    Linux carries that over exec from the forked parent, so under a large pytest process it
    would read flat.) The processes run side by side; each measures only itself."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        f"from tools.{tool} import main\n"
        "import megavit.models.vit, torch.distributed.checkpoint\n"
        "import megavit.interop.import_hf, megavit.interop.hf_vit\n"
        "def peak():\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(status.split('VmHWM:')[1].split()[0])\n"
        "before = peak()\n"
        "assert main(sys.argv[2:]) == 0\n"
        "print('growth_kib', peak() - before)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), *args], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
             for args in runs]
    growths = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
        growths.append(int(out.split("growth_kib")[-1]) * 1024)
    return growths


def _rss_growths(source: Path, output: Path, *buffers_mb: float) -> list[int]:
    return rss_growths("checkpoint_convert", *[
        [str(source), "--target-tensor-parallel-size", "2", "--output", f"{output}_{mb}",
         "--buffer-mb", str(mb)] for mb in buffers_mb])


def test_conversion_memory_is_bounded_by_the_buffer_not_the_checkpoint(tmp_path):
    save = tmp_path / "vit_s"
    proc = pretrain("--train-iters", "1", "--save", str(save), "--preset", "vit-s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    size = sum(f.stat().st_size for f in (save / "iter_0000001").glob("*.distcp"))
    assert size > 200 * 2**20         # 22M parameters x (weights + two Adam moments), fp32
    bounded, unbounded = _rss_growths(save, tmp_path / "converted", 8, 4096)
    assert bounded < size / 4, (bounded, size)
    assert unbounded > size / 2, (unbounded, size)


def test_conversion_mistakes_exit_2_and_write_nothing(saved, tmp_path):
    proc = convert(str(saved), "--target-tensor-parallel-size", "3", "--output",
                   str(tmp_path / "x"))
    assert proc.returncode == 2 and "--target-tensor-parallel-size 3: tensor-parallel size 3 " \
        "must divide the 4 heads" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    proc = convert(str(tmp_path / "missing"), "--to-safetensors", str(tmp_path / "w.st"))
    assert proc.returncode == 2 and "neither a checkpoint nor a --save directory" in proc.stderr
    proc = convert(str(saved), "--target-tensor-parallel-size", "2")
    assert proc.returncode == 2 and "needs --output DIR" in proc.stderr
    proc = convert(str(saved), "--to-safetensors", str(tmp_path / "no" / "w.st"))
    assert proc.returncode == 2 and "must name a file in an existing directory" in proc.stderr
    assert convert(str(saved), "--target-tensor-parallel-size", "1", "--output",
                   str(tmp_path / "y")).returncode == 0
    proc = convert(str(saved), "--target-tensor-parallel-size", "1", "--output",
                   str(tmp_path / "y"))
    assert proc.returncode == 2 and "iter_0000003: exists" in proc.stderr
    assert "Traceback" not in proc.stderr
