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


# --- NCCL: can the message plan deadlock? -------------------------------------------------

from megavit.parallel.pipeline_executor import messages  # noqa: E402
from tests.nccl_model import deadlocks  # noqa: E402

CHANNEL_PEER = {"act_send": +1, "act_recv": -1, "grad_send": -1, "grad_recv": +1}


def executor_plan(actions, layout, stage):
    """What PipelineExecutor posts, in order: each receive on its channel (then waits for
    it) before the action, each send on its channel after. A channel is one communicator
    per (direction, sender, receiver)."""
    P, steps = layout.stages, []
    for a in actions:
        recv, send = messages(a, layout, stage)
        for msg, kind in ((recv, "recv"), (send, "send")):
            if msg is None:
                continue
            peer = (stage + CHANNEL_PEER[msg.channel]) % P
            sender, receiver = (stage, peer) if kind == "send" else (peer, stage)
            comm = (msg.channel.split("_")[0], sender, receiver)
            steps.append(("post", comm, [(kind, peer, msg.key)]))
            if kind == "recv":
                steps.append(("wait", msg.key))
    return steps


CASES = [(P, v, m, fo) for P in (2, 3, 4, 5) for v in (1, 2, 3, 4)
         for m in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16) for fo in (False, True)
         if not (v > 1 and m % P and not fo)]


def test_no_schedule_can_deadlock_under_nccl_rules():
    for P, v, m, forward_only in CASES:
        layout = PipelineLayout(P * v * 2, P, v)
        plans = [executor_plan(build_schedule(m, P, k, v, forward_only), layout, k)
                 for k in range(P)]
        assert deadlocks(plans) is None, (P, v, m, forward_only)
    for P in (2, 3, 4, 5):            # zero bubble H1: W passes send nothing
        for m in (1, 2, 3, 4, 5, 8, 12):
            layout = PipelineLayout(P * 2, P, 1)
            plans = [executor_plan(build_schedule(m, P, k, zero_bubble=True), layout, k)
                     for k in range(P)]
            assert deadlocks(plans) is None, ("zb-h1", P, m)


def test_the_model_catches_sends_grouped_on_one_communicator():
    """The plan megavit used before: each action's sends held back and posted with the next
    action's receive, all on one communicator. The model finds its interleaved deadlock."""
    P, v, m = 2, 2, 4
    layout = PipelineLayout(8, P, v)
    plans = []
    for k in range(P):
        steps, pending = [], []
        for a in build_schedule(m, P, k, v):
            recv, send = messages(a, layout, k)
            ops = pending + ([("recv", (k + CHANNEL_PEER[recv.channel]) % P, recv.key)] if recv else [])
            if ops:
                steps.append(("post", "pp", ops))
                pending = []
            if recv:
                steps.append(("wait", recv.key))
            if send:
                pending.append(("send", (k + CHANNEL_PEER[send.channel]) % P, send.key))
        steps.append(("post", "pp", pending))
        plans.append(steps)
    assert deadlocks(plans) is not None


def test_interleaved_evaluation_with_a_partial_group_matches_serial():
    """PP=2 with 2 virtual stages, micro-batches of 1 and a global batch of 4: the held-out
    split's last batch (359 = 89 x 4 + 3) leaves 3 micro-batches, fewer than a multiple of
    P, which evaluation runs through the interleaved order with a short last group."""
    from megavit.parallel.state import serial_state
    from tests.harness import run_distributed
    from tests.scenarios import debug_config, evaluate_run

    def cfg(pp: int):
        extra = {"pipeline_model_parallel_size": pp}
        if pp > 1:
            extra["num_layers_per_virtual_pipeline_stage"] = 1
        return debug_config("gap", layers=4, parallel=extra, micro_batch_size=1,
                            global_batch_size=4)

    assert build_schedule(3, 2, 0, 2, forward_only=True)[-2:] == [Action("F", 2, 0), Action("F", 2, 1)]
    ref = evaluate_run(serial_state(), cfg(1))
    ranks = run_distributed(2, 1, {"eval": (evaluate_run, (cfg(2),))}, pp=2)["eval"]
    assert ref["eval_images"] == 359
    for got in ranks:   # both stages report the last stage's result
        assert got["eval_images"] == 359 and got["eval_accuracy"] == ref["eval_accuracy"]
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


def test_forward_only_with_fewer_micro_batches_than_stages():
    assert build_schedule(1, 4, 2, 2, forward_only=True) == [Action("F", 0, 0), Action("F", 0, 1)]
    assert [(a.micro_batch, a.chunk) for a in build_schedule(5, 2, 1, 2, forward_only=True)] == \
        [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1), (4, 0), (4, 1)]


@pytest.mark.parametrize("P,m", [(2, 4), (3, 3), (4, 8), (4, 12), (8, 8), (8, 16)])
def test_zero_bubble_h1_idles_as_the_paper_says_at_1f1bs_peak(P, m):
    """schedule_zb_h1: every F, B and W once, each W after its B; the simulated idle time of
    every stage is (P - 1)(T_F + T_B - T_W) (Qi et al. 2023) for unequal pass times too
    (with T_W <= T_F, as the paper assumes), a third of 1F1B's when the three are equal; no
    stage holds more activations than
    1F1B's stage 0 (an activation held until its W)."""
    from megavit.parallel.schedules import schedule_zb_h1

    zb = [schedule_zb_h1(m, P, k) for k in range(P)]
    for actions in zb:
        assert sorted(actions) == sorted(Action(kind, i, 0) for kind in "FBW"
                                         for i in range(m))
        for i in range(m):
            assert actions.index(Action("W", i, 0)) > actions.index(Action("B", i, 0))
    for t_f, t_b, t_w in ((1.0, 1.0, 1.0), (1.0, 1.5, 0.8), (1.2, 1.0, 0.9)):
        timeline = simulate(zb, 1, t_f, t_b + t_w, t_w)       # B + W = the whole backward
        for busy in timeline.busy:
            assert timeline.makespan - busy == pytest.approx((P - 1) * (t_f + t_b - t_w))
    one_f_one_b = simulate([schedule_1f1b(m, P, k) for k in range(P)], 1, 1.0, 2.0)
    equal = simulate(zb, 1, 1.0, 2.0, 1.0)
    assert equal.makespan - equal.busy[0] == pytest.approx(
        (one_f_one_b.makespan - one_f_one_b.busy[0]) / 3)
    assert max(in_flight(a) for a in zb) == max(in_flight(schedule_1f1b(m, P, k))
                                                 for k in range(P)) == min(P, m)


def test_split_backward_gives_the_whole_backwards_gradients_once_per_weight():
    """B then W (`weight_grad.WeightGradStore`) equals one plain backward: the input's
    gradient after B, every weight's after W (none after B). A weight used twice in one
    chunk (the same column-parallel layer applied twice, and a row-parallel one) gets the
    sum of both uses in one accumulation: its gradient hook fires once per micro-batch,
    as gradient-accumulation counting (`DataParallelBuffers`) needs."""
    import torch
    from torch import nn

    from megavit.parallel.comm import CommStats, Group
    from megavit.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megavit.parallel.weight_grad import WeightGradStore, defer_weight_gradients

    group = Group.single("tp", CommStats())

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = ColumnParallelLinear(6, [4, 4], group, bias=[True, False])
            self.down = RowParallelLinear([4, 4], 6, group)

        def forward(self, x):
            a, b = self.up.forward_groups(x, [1, 1])
            y = self.down.forward_groups([torch.tanh(a), b])
            a2, b2 = self.up.forward_groups(y, [1, 1])          # `up` used a second time
            return self.down.forward_groups([a2, b2 * a2])

    torch.manual_seed(0)
    model = Twice()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 2, 6)
    x1 = x.clone().requires_grad_()
    model(x1).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    hooks = {n: 0 for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, n=n: hooks.__setitem__(n, hooks[n] + (p.grad is not None)))
    store = WeightGradStore()
    assert defer_weight_gradients(model, store) == 2
    x2 = x.clone().requires_grad_()
    with store.input_gradients_only((0, 0)):
        model(x2).square().sum().backward()
    assert torch.allclose(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    assert model.up.weight.grad is None and model.down.weight.grad is None
    assert model.up.bias.grad is not None                     # biases stay in B
    assert store.pending == 1
    assert store.run((0, 0)) == 2 and store.pending == 0      # two weights, one call each
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], rtol=1e-5, atol=1e-6), n
        assert hooks[n] == 1, (n, hooks[n])
