"""The activation formula of docs/activation_memory.md against what autograd keeps, on a
few rows (benchmarks/activation_memory.py runs all of them), in real gloo processes; the
last rows use the attention types of issue 18 on an odd 7 x 7 grid (partial windows) and
patch merging (issue 19)."""

from __future__ import annotations

import pytest

from megavit.config import preset_model_config
from megavit.models.activation_memory import (ActivationSetup, block_activation_bytes,
                                              measure_setup)
from megavit.parallel.state import ParallelState, serial_state
from tests.harness import run_distributed

FULL_UNIFORM = dict(recompute="full", recompute_method="uniform", recompute_num_layers=2)
FULL_BLOCK = dict(recompute="full", recompute_method="block", recompute_num_layers=1)
WINDOW = dict(img_h=28, img_w=28, patch_dim=4, attention_type="window", window_size=3)
MERGE = dict(img_h=32, img_w=32, patch_dim=4, patch_merge_layers="0")
ROWS = [  # (block type, pooling, SP mode, recompute[, model flags])
    ("parallel", "map", None, {}),
    ("parallel", "map", "keep", {}),
    ("parallel", "map", "keep", {"recompute": "selective"}),
    ("parallel", "cls", "regather", {"recompute": "selective"}),   # 17 tokens, padded
    ("parallel", "map", "keep", FULL_BLOCK),
    ("sequential", "cls", "keep", FULL_UNIFORM),
    ("sequential", "map", None, {"recompute": "selective"}),
    ("parallel", "map", "keep", {}, dict(WINDOW, window_shift=True, qk_layernorm=True)),
    ("sequential", "cls", "regather", {}, dict(WINDOW, attention_type="local-global",
                                               global_attention_layers="1")),
    ("sequential", "map", "keep", {}, dict(WINDOW, attention_type="linear", window_size=None,
                                           position_embedding_type="rope-2d")),
    ("parallel", "cls", None, {}, dict(img_h=28, img_w=28, patch_dim=4,
                                       position_embedding_type="rope-2d")),
    # --patch-merge-layers on an 8 x 8 grid: 65 -> 17 (-> 5) tokens, each padded under SP
    ("parallel", "cls", "keep", {}, dict(MERGE, attention_type="window", window_size=3)),
    ("sequential", "cls", "regather", FULL_UNIFORM, dict(MERGE, patch_merge_layers="0,1")),
    ("parallel", "map", None, {"recompute": "selective"}, dict(MERGE, patch_merge_layers="1")),
]


def cfg_for(block: str, pooling: str, flags: dict | None = None, layers: int = 3):
    return preset_model_config("vit-debug", hidden_size=64, num_attention_heads=4,
                               ffn_hidden_size=256, num_layers=layers, block_type=block,
                               pooling=pooling, num_classes=10, drop_path_rate=0.1,
                               **(flags or {}))


def measure(pstate: ParallelState, rows) -> list[float]:
    t = pstate.tp.size
    return [measure_setup(cfg_for(bt, pool, *flags), ActivationSetup(t, 2, sp, **rc),
                          pstate.tp)
            for bt, pool, sp, rc, *flags in rows]


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(2, 2, {"rows": (measure, (ROWS,))})["rows"]


@pytest.fixture(scope="module")
def tp1():
    rows = [(bt, pool, None, {}) for bt, pool, _, _, *_ in ROWS[:7]]
    return measure(serial_state(), rows)


def test_formula_matches_measurement_at_tp2(tp2):
    for rank_rows in tp2:
        for (bt, pool, sp, rc, *flags), got in zip(ROWS, rank_rows):
            want = block_activation_bytes(cfg_for(bt, pool, *flags),
                                          ActivationSetup(2, 2, sp, **rc))
            assert got == pytest.approx(want, rel=0.02), (bt, pool, sp, rc, flags)
            assert got == pytest.approx(want, rel=1e-9)   # in fact exact


def test_recomputation_cuts_what_is_kept_as_predicted(tp2):
    """SP(keep) at TP=2: selective removes the QK-norm outputs and statistics; full
    recomputation of block 0 keeps only its input there."""
    none, selective, full_block = tp2[0][1], tp2[0][2], tp2[0][4]
    s, b, h, a = 16, 2, 64, 4
    assert none - selective == pytest.approx(4 * 2 * s * b * h / 2 + (16 + 4) * s * b * a / 2)
    # Block 0 of 3 keeps only its input shard and the shared image ids; blocks 1 and 2 keep
    # everything. `none` averages over the 3 blocks a base plus drop-path masks (4 b bytes)
    # in blocks 1 and 2 only, so each of blocks 1, 2 keeps none - 2/3 * 4b + 4b.
    mask = 4 * b
    block1_and_2 = 2 * (none - 2 / 3 * mask + mask)
    assert full_block * 3 == pytest.approx(4 * (s // 2) * b * h + 8 * b + block1_and_2, rel=1e-12)


def test_selective_sp_is_within_one_tp_share_plus_the_gathered_input(tp1, tp2):
    """docs/activation_memory.md: selective + SP at TP=t <= [TP=1, none]/t + p*s*b*h in
    "keep" mode, and <= [TP=1, none]/t in "regather" mode."""
    keep, regather = tp2[0][2], tp2[0][3]
    s, b, h = 16, 2, 64
    assert keep <= tp1[2] / 2 + 4 * s * b * h
    padded = 18   # 17 tokens (class token) padded to a multiple of 2
    assert regather <= tp1[3] / 2 * padded / 17
