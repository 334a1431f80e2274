"""Print a pipeline schedule: each stage's forward/backward slots on a common time grid,
its idle fraction (the bubble), and the theory (P-1)/(v*m+P-1).

    python tools/print_schedule.py --pipeline-model-parallel-size 4 --micro-batches 8
    python tools/print_schedule.py --pipeline-model-parallel-size 4 --micro-batches 8 --virtual-stages 2

A cell is one chunk's forward time; a backward takes two cells ("-" continues it), "." is
idle. `python -m megavit.pretrain ... --print-schedule` prints the schedule of a run.
"""

from __future__ import annotations

import argparse
import sys

from megavit.parallel.schedules import ScheduleError, build_schedule, format_schedule


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--pipeline-model-parallel-size", type=int, required=True, metavar="P",
                   help="pipeline stages")
    p.add_argument("--micro-batches", type=int, required=True, metavar="M",
                   help="micro-batches per step (global batch / (micro-batch x DP))")
    p.add_argument("--virtual-stages", type=int, default=1, metavar="V",
                   help="model chunks per stage (interleaved schedule when > 1; default 1)")
    args = p.parse_args(argv)
    P, m, v = args.pipeline_model_parallel_size, args.micro_batches, args.virtual_stages
    for flag, value in (("--pipeline-model-parallel-size", P), ("--micro-batches", m),
                        ("--virtual-stages", v)):
        if value < 1:
            print(f"print_schedule: error: {flag} {value}: must be at least 1", file=sys.stderr)
            return 2
    try:
        print(format_schedule([build_schedule(m, P, k, v) for k in range(P)], v))
    except ScheduleError as e:
        print(f"print_schedule: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
