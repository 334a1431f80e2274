"""Pipeline layout and schedules on paper: which blocks each stage holds, the action lists,
and their bubble against (P-1)/(v*m+P-1)."""

from __future__ import annotations

import pytest

from megavit.parallel.pipeline_layout import PipelineLayout, PipelineLayoutError
from megavit.parallel.schedules import (Action, ScheduleError, build_schedule, format_schedule,
                                        in_flight, schedule_1f1b, simulate, theoretical_bubble)


def test_even_split_keeps_global_block_numbers():
    layout = PipelineLayout.from_flags(48, 4, None, None, None)
    assert layout.stage_layers() == [12] * 4
    assert [layout.chunk_layers(k, 0) for k in range(4)] == \
        [range(0, 12), range(12, 24), range(24, 36), range(36, 48)]
    assert layout.is_first(0, 0) and layout.is_last(3, 0) and not layout.is_last(2, 0)


def test_virtual_stages_interleave():
    layout = PipelineLayout.from_flags(8, 2, 2, None, None)   # 2 blocks per virtual stage
    assert layout.chunks == 2
    assert [layout.chunk_layers(0, c) for c in range(2)] == [range(0, 2), range(4, 6)]
    assert [layout.chunk_layers(1, c) for c in range(2)] == [range(2, 4), range(6, 8)]
    assert layout.is_first(0, 0) and layout.is_last(1, 1) and not layout.is_last(1, 0)


def test_uneven_first_and_last_stages():
    layout = PipelineLayout.from_flags(10, 4, None, 1, 3)
    assert layout.stage_layers() == [1, 3, 3, 3]
    assert layout.chunk_layers(3, 0) == range(7, 10)
    assert PipelineLayout.from_flags(4, 2, None, 1, 3).stage_layers() == [1, 3]


@pytest.mark.parametrize("args,message", [
    ((10, 4, None, None, None), "--num-layers (10) do not split evenly over 4 pipeline stages"),
    ((10, 4, None, 2, None), "the layers left for the other stages (8) do not split evenly over 3"),
    ((8, 2, None, 3, 4), "must equal --num-layers 8 with 2 stages"),
    ((8, 2, 3, None, None), "must be a multiple of it"),
    ((8, 1, 2, None, None), "needs --pipeline-model-parallel-size of 2 or more"),
    ((8, 2, 2, 2, None), "cannot be combined"),
    ((4, 1, None, 2, None), "need --pipeline-model-parallel-size of 2 or more"),
    ((8, 2, None, 0, None), "--num-layers-in-first-pipeline-stage must be at least 1"),
])
def test_impossible_splits_say_which_flag(args, message):
    with pytest.raises(PipelineLayoutError) as e:
        PipelineLayout.from_flags(*args)
    assert message in str(e.value)


@pytest.mark.parametrize("P,m,v", [(2, 4, 1), (4, 8, 1), (4, 3, 1), (4, 8, 2), (2, 4, 2),
                                   (4, 4, 2), (3, 6, 3), (4, 16, 4), (1, 5, 1)])
def test_every_stage_runs_each_pass_once_and_bubble_matches_theory(P, m, v):
    schedules = [build_schedule(m, P, k, v) for k in range(P)]
    for actions in schedules:
        fwd = [(a.micro_batch, a.chunk) for a in actions if a.kind == "F"]
        bwd = [(a.micro_batch, a.chunk) for a in actions if a.kind == "B"]
        assert sorted(fwd) == sorted(bwd) == sorted((i, c) for i in range(m) for c in range(v))
        for i, a in enumerate(actions):            # a backward follows its own forward
            if a.kind == "B":
                assert Action("F", a.micro_batch, a.chunk) in actions[:i]
    for forward, backward in ((1.0, 1.0), (1.0, 2.0), (1.0, 3.0)):
        timeline = simulate(schedules, v, forward, backward)
        assert timeline.bubble == pytest.approx([theoretical_bubble(m, P, v)] * P, abs=1e-12)


def test_1f1b_stage_k_holds_p_minus_k_micro_batches():
    P, m = 4, 8
    assert [in_flight(schedule_1f1b(m, P, k)) for k in range(P)] == [4, 3, 2, 1]
    assert schedule_1f1b(4, 1, 0) == [Action(k, i, 0) for i in range(4) for k in "FB"]


def test_interleaved_needs_micro_batches_in_multiples_of_stages():
    with pytest.raises(ScheduleError, match="multiple of --pipeline-model-parallel-size 4"):
        build_schedule(6, 4, 0, 2)


def test_forward_only_runs_every_forward_in_order():
    assert build_schedule(3, 2, 1, forward_only=True) == [Action("F", i, 0) for i in range(3)]
    assert [(a.micro_batch, a.chunk) for a in build_schedule(2, 2, 0, 2, forward_only=True)] == \
        [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_printed_schedule_shows_bubbles_and_theory():
    text = format_schedule([build_schedule(4, 2, k) for k in range(2)])
    lines = text.splitlines()
    # forward = 1 cell, backward = 2; stage 0 waits for stage 1's first backward
    assert lines[0].startswith("stage 0: F0 F1 .  .  B0 -  F2 B1 -  F3 B2 -  .  B3 -")
    assert lines[1].startswith("stage 1: .  F0 B0 -  F1 B1 -  F2 B2 -  F3 B3 -  .  .")
    assert "bubble 0.200" in lines[0] and "bubble 0.200" in lines[1]
    assert lines[-1] == "theory (P-1)/(v*m+P-1) = 0.200 (P=2, v=1, m=4)"
