"""Pipeline schedules as lists of actions, one list per stage, and their timing on paper.

A schedule says, for one stage, in which order it runs the forward ("F") and backward ("B")
passes of each (micro-batch, local chunk). Running it (p2p, autograd) is the executor's job
(`megavit.parallel.pipeline_executor`); here the lists are plain data, so they can be
printed, simulated and tested.

    schedule_1f1b(m, P, k)              warm-up of P-k-1 forwards, then one forward and one
                                        backward in turn, then the remaining backwards
    schedule_interleaved(m, P, k, v)    Megatron's interleaved 1F1B over v chunks per stage
    schedule_forward_only(m, P, k, v)   every forward, in the interleaved order (evaluation)
    schedule_zb_h1(m, P, k)             zero bubble H1 (Qi et al. 2023): each backward split
                                        into B (input gradient) and W (weight gradient,
                                        `weight_grad.py`); W passes fill 1F1B's bubble at
                                        1F1B's memory (--pipeline-schedule zb-h1)

With P = 1 the 1F1B list is F0 B0 F1 B1 ...: plain gradient accumulation.

`simulate` times the lists with forward = 1/v and backward = 2/v units per chunk (a whole
model's forward = 1), every stage equally fast and p2p free, and returns the makespan and
each stage's idle fraction: the bubble, (P-1)/(m+P-1) for 1F1B and (P-1)/(v*m+P-1)
interleaved (Narayanan et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from megavit.errors import UserError


class Action(NamedTuple):
    kind: str         # "F", "B" or (zero bubble) "W"
    micro_batch: int
    chunk: int        # local chunk on this stage

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}" + (f".{self.chunk}" if self.chunk else "")


class ScheduleError(UserError, ValueError):
    """A schedule that cannot run with these sizes; says which flag to change."""


def schedule_1f1b(num_microbatches: int, stages: int, stage: int) -> list[Action]:
    m = num_microbatches
    warmup = min(stages - stage - 1, m)
    actions = [Action("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [Action("F", warmup + i, 0), Action("B", i, 0)]
    actions += [Action("B", i, 0) for i in range(m - warmup, m)]
    return actions


def _interleaved_order(num_microbatches: int, stages: int, chunks: int,
                       forward: bool) -> list[tuple[int, int]]:
    """(micro-batch, local chunk) of a stage's forwards (or backwards) in order:
    micro-batches go in groups of P through chunk 0, then the same group through chunk 1,
    ...; backward visits the chunks in reverse. A last group smaller than P (only in
    evaluation: training needs m to be a multiple of P) goes through the chunks the same way."""
    order = []
    for start in range(0, num_microbatches, stages):
        group = range(start, min(start + stages, num_microbatches))
        for c in range(chunks):
            order += [(mb, c if forward else chunks - 1 - c) for mb in group]
    return order


def schedule_interleaved(num_microbatches: int, stages: int, stage: int,
                         chunks: int) -> list[Action]:
    m, P, v = num_microbatches, stages, chunks
    if m % P:
        raise ScheduleError(f"the interleaved schedule needs the number of micro-batches ({m} = "
                            f"--global-batch-size / (--micro-batch-size x data-parallel size)) "
                            f"to be a multiple of --pipeline-model-parallel-size {P}")
    total = m * v
    warmup = total if m == P else min((P - stage - 1) * 2 + (v - 1) * P, total)
    fwd = [Action("F", mb, c) for mb, c in _interleaved_order(m, P, v, True)]
    bwd = [Action("B", mb, c) for mb, c in _interleaved_order(m, P, v, False)]
    actions = fwd[:warmup]
    for i in range(total - warmup):
        actions += [fwd[warmup + i], bwd[i]]
    return actions + bwd[total - warmup:]


def schedule_forward_only(num_microbatches: int, stages: int, stage: int,
                          chunks: int = 1) -> list[Action]:
    return [Action("F", mb, c) for mb, c in
            _interleaved_order(num_microbatches, stages, chunks, True)]


def build_schedule(num_microbatches: int, stages: int, stage: int, chunks: int = 1,
                   forward_only: bool = False, zero_bubble: bool = False) -> list[Action]:
    """The schedule megavit runs for this stage (`zero_bubble`: ZB-H1, one chunk only)."""
    if forward_only:
        return schedule_forward_only(num_microbatches, stages, stage, chunks)
    if zero_bubble:
        if chunks > 1:
            raise ScheduleError("--pipeline-schedule zb-h1 runs one chunk per stage: drop "
                                "--num-layers-per-virtual-pipeline-stage")
        return schedule_zb_h1(num_microbatches, stages, stage)
    if chunks > 1:
        return schedule_interleaved(num_microbatches, stages, stage, chunks)
    return schedule_1f1b(num_microbatches, stages, stage)


def in_flight(actions: list[Action]) -> int:
    """The most (micro-batch, chunk) forwards whose backward has not run yet: how many
    chunk-activations this stage holds at its peak (with W passes, until the W: the weight
    gradient reads the layers' inputs)."""
    frees = "W" if any(a.kind == "W" for a in actions) else "B"
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1 if a.kind == frees else 0
        peak = max(peak, live)
    return peak


def schedule_zb_h1(num_microbatches: int, stages: int, stage: int) -> list[Action]:
    """Zero bubble H1 (Qi et al. 2023) for stage k: each backward split into B (the input
    gradient, which the previous stage waits for) and W (the weight gradient, which nobody
    waits for). Warm-up: P - k forwards; then per micro-batch i: B_i, W_{i-k} (stage k
    puts off k weight gradients, so its B passes reach the earlier stages sooner), and the
    next forward while any is left; the k W passes put off run at the end, where 1F1B's
    stage would wait. A micro-batch's activations are held until its W, so every stage
    holds at most P of them: 1F1B's peak (stage 0's). With T_W <= T_F the idle time per
    stage is (P - 1)(T_F + T_B - T_W), a third of 1F1B's (P - 1)(T_F + T_B + T_W) when the
    three are equal (`simulate` shows it; a test checks it)."""
    m = num_microbatches
    warmup = min(stages - stage, m)
    actions = [Action("F", i, 0) for i in range(warmup)]
    forwards = warmup
    for i in range(m):
        actions.append(Action("B", i, 0))
        if i >= stage:
            actions.append(Action("W", i - stage, 0))
        if forwards < m:
            actions.append(Action("F", forwards, 0))
            forwards += 1
    return actions + [Action("W", i, 0) for i in range(max(m - stage, 0), m)]


@dataclass
class Timeline:
    makespan: float
    busy: list[float]                                  # per stage
    slots: list[list[tuple[float, float, Action]]]     # per stage: (start, end, action)

    @property
    def bubble(self) -> list[float]:
        """Idle fraction of each stage."""
        return [1 - b / self.makespan for b in self.busy]


def simulate(schedules: list[list[Action]], chunks: int = 1, forward_time: float = 1.0,
             backward_time: float = 2.0, weight_time: float | None = None) -> Timeline:
    """Time the stages' action lists: an action starts when its stage is free and its input
    exists (the previous chunk's forward of that micro-batch; the next chunk's backward; a
    W its own B). Chunk g of the model is local chunk g // P of stage g % P. With W passes
    in the lists, a B takes backward_time - weight_time and a W weight_time (default: half
    the backward each)."""
    P = len(schedules)
    f, b = forward_time / chunks, backward_time / chunks
    w = 0.0
    if any(a.kind == "W" for stage in schedules for a in stage):
        w = (backward_time / 2 if weight_time is None else weight_time) / chunks
        b -= w
    done: dict[tuple[str, int, int], float] = {}          # (kind, micro-batch, global chunk)
    clock, pos = [0.0] * P, [0] * P
    slots: list[list[tuple[float, float, Action]]] = [[] for _ in range(P)]
    total_chunks = P * chunks
    remaining = sum(len(s) for s in schedules)
    while remaining:
        progressed = False
        for k in range(P):
            if pos[k] == len(schedules[k]):
                continue
            a = schedules[k][pos[k]]
            g = a.chunk * P + k
            if a.kind == "F":
                dep = ("F", a.micro_batch, g - 1) if g > 0 else None
            elif a.kind == "W":
                dep = ("B", a.micro_batch, g)
            else:
                dep = ("B", a.micro_batch, g + 1) if g < total_chunks - 1 else ("F", a.micro_batch, g)
            if dep is not None and dep not in done:
                continue
            start = max(clock[k], done.get(dep, 0.0) if dep else 0.0)
            end = start + {"F": f, "B": b, "W": w}[a.kind]
            done[(a.kind, a.micro_batch, g)] = end
            slots[k].append((start, end, a))
            clock[k], pos[k] = end, pos[k] + 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise ScheduleError("the schedules wait on each other (deadlock)")
    makespan = max(clock)
    busy = [sum(e - s for s, e, _ in stage_slots) for stage_slots in slots]
    return Timeline(makespan, busy, slots)


def theoretical_bubble(num_microbatches: int, stages: int, chunks: int = 1) -> float:
    """(P-1) / (v*m + P-1): the idle fraction of every stage."""
    return (stages - 1) / (chunks * num_microbatches + stages - 1)


def format_schedule(schedules: list[list[Action]], chunks: int = 1) -> str:
    """One line per stage on a common time grid (a cell = one chunk's forward time): each
    action spans its cells (a backward takes two, continued with "-"; split into B and W,
    one each), "." is idle; then the stage's bubble and the theory."""
    t = simulate(schedules, chunks)
    unit = 1.0 / chunks
    width = max(len(str(a)) for stage in schedules for a in stage)
    lines = []
    for k, stage_slots in enumerate(t.slots):
        cells, clock = [], 0.0
        for start, end, a in stage_slots:
            cells += ["."] * round((start - clock) / unit)
            cells += [str(a)] + ["-"] * (round((end - start) / unit) - 1)
            clock = end
        cells += ["."] * round((t.makespan - clock) / unit)
        row = " ".join(c.ljust(width) for c in cells)
        lines.append(f"stage {k}: {row}   bubble {t.bubble[k]:.3f}")
    m = sum(1 for a in schedules[0] if a.kind == "F") // chunks
    P = len(schedules)
    if any(a.kind == "W" for a in schedules[0]):      # F = B = W = one cell
        lines.append(f"theory zero bubble H1: (P-1)(F+B-W) / ((P-1)(F+B-W) + m(F+B+W)) = "
                     f"{(P - 1) / (P - 1 + 3 * m):.3f} (P={P}, m={m}; 1F1B: "
                     f"{theoretical_bubble(m, P):.3f})")
        return "\n".join(lines)
    lines.append(f"theory (P-1)/(v*m+P-1) = {theoretical_bubble(m, P, chunks):.3f}"
                 f" (P={P}, v={chunks}, m={m})")
    return "\n".join(lines)
