"""Print a pipeline schedule: each stage's forward/backward slots on a common time grid,
its idle fraction (the bubble), and the theory (P-1)/(v*m+P-1).

    python tools/print_schedule.py --pipeline-model-parallel-size 4 --micro-batches 8
    python tools/print_schedule.py --pipeline-model-parallel-size 4 --micro-batches 8 --virtual-stages 2
    python tools/print_schedule.py --pipeline-model-parallel-size 4 --micro-batches 8 --schedule zb-h1

A cell is one chunk's forward time; a backward takes two cells ("-" continues it), or with
zero bubble H1 one for B (input gradient) and one for W (weight gradient); "." is idle. `python -m megavit.pretrain ... --print-schedule` prints the schedule of a run.
"""

from __future__ import annotations

import argparse
import sys

from megavit.parallel.schedules import (ScheduleError, build_schedule, format_schedule,
                                       schedule_zb_h1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--pipeline-model-parallel-size", type=int, required=True, metavar="P",
                   help="pipeline stages")
    p.add_argument("--micro-batches", type=int, required=True, metavar="M",
                   help="micro-batches per step (global batch / (micro-batch x DP))")
    p.add_argument("--virtual-stages", type=int, default=1, metavar="V",
                   help="model chunks per stage (interleaved schedule when > 1; default 1)")
    p.add_argument("--schedule", choices=("1f1b", "zb-h1"), default="1f1b",
                   help="'1f1b' (interleaved with --virtual-stages) or 'zb-h1': zero bubble "
                        "H1, each backward split into B and W (training: --pipeline-schedule "
                        "zb-h1)")
    args = p.parse_args(argv)
    P, m, v = args.pipeline_model_parallel_size, args.micro_batches, args.virtual_stages
    for flag, value in (("--pipeline-model-parallel-size", P), ("--micro-batches", m),
                        ("--virtual-stages", v)):
        if value < 1:
            print(f"print_schedule: error: {flag} {value}: must be at least 1", file=sys.stderr)
            return 2
    if args.schedule == "zb-h1" and v > 1:
        print("print_schedule: error: --schedule zb-h1 has no virtual stages (--virtual-stages "
              "1)", file=sys.stderr)
        return 2
    try:
        if args.schedule == "zb-h1":
            print(format_schedule([schedule_zb_h1(m, P, k) for k in range(P)]))
        else:
            print(format_schedule([build_schedule(m, P, k, v) for k in range(P)], v))
    except ScheduleError as e:
        print(f"print_schedule: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
