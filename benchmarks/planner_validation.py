"""How far the planner's step-time model is from published runs.

    python -m benchmarks.planner_validation

For each published table (megavit/planner/published.py: Narayanan et al. 2021 Table 1 on
A100, Megatron-LM's 2024 H100 table) the model's three efficiency constants are fitted by a
grid search minimising the mean absolute percentage error (MAPE) of the predicted step time
on that table's rows. Reported per table:

    in-sample           MAPE with the constants fitted on all its rows
    leave-one-out       each row predicted with constants fitted on the table's other rows,
                        then the MAPE of those predictions: data not used for fitting
    other GPU's fit     each row predicted with the other table's constants

vTrain reports 8.4 % / 14.7 % mean error (one node / up to 512 A100); the issue's target is
at most 10 % MAPE on data not used for fitting (the leave-one-out column).
"""

from __future__ import annotations

import argparse
import itertools

from megavit.planner.hardware import Efficiency, load_gpu
from megavit.planner.published import TABLES, PublishedRun
from megavit.planner.step_time import predict_step

GRID = list(itertools.product(
    [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95],      # gemm_max
    [0, 16, 32, 64, 96, 128, 192, 256, 384, 512],                 # gemm_half
    [0, 4, 8, 16, 24, 32, 48, 64]))                               # elementwise


def errors(rows: list[PublishedRun], eff: Efficiency, gpus_per_node: int = 8) -> list[float]:
    """(predicted - measured) / measured step time of each row."""
    out = []
    for r in rows:
        predicted = predict_step(r.shape, r.layout, load_gpu(r.gpu), gpus_per_node, eff).step_s
        out.append((predicted - r.measured_step_s) / r.measured_step_s)
    return out


def mape(values: list[float]) -> float:
    return sum(abs(v) for v in values) / len(values)


def fit(table: dict, rows: list[int]) -> tuple[float, float, float]:
    """The grid point with the smallest MAPE over `rows` (indices) of the precomputed
    `table` {grid point: errors}."""
    return min(GRID, key=lambda c: sum(abs(table[c][i]) for i in rows))


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    errs = {name: {c: errors(rows, Efficiency(*c)) for c in GRID}
            for name, rows in TABLES.items()}
    fitted = {name: fit(errs[name], list(range(len(rows)))) for name, rows in TABLES.items()}
    print("command: python -m benchmarks.planner_validation")
    print("| table | rows | fitted (gemm_max, gemm_half, elementwise) | in-sample MAPE | "
          "leave-one-out MAPE | with the other GPU's fit |")
    print("|---|---|---|---|---|---|")
    for name, rows in TABLES.items():
        n = len(rows)
        loo = [errs[name][fit(errs[name], [j for j in range(n) if j != i])][i]
               for i in range(n)]
        other = next(o for o in TABLES if o != name)
        print(f"| {name} | {n} | {fitted[name]} | {mape(errs[name][fitted[name]]):.1%} | "
              f"{mape(loo):.1%} | {mape(errs[name][fitted[other]]):.1%} |")
        print("|   per row (leave-one-out) | | "
              + ", ".join(f"{r.name} {e:+.0%}" for r, e in zip(rows, loo)) + " | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
