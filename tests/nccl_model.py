"""A model of NCCL point-to-point semantics, to check that a pipeline's message plan cannot
deadlock on GPUs (this machine has none).

What the model assumes, per NCCL and PyTorch's ProcessGroupNCCL:
- Each communicator has, per rank, one stream: groups posted on it run one after another.
- A group (one `batch_isend_irecv`) runs as a whole; it finishes once every one of its
  sends and receives is matched by the peer's counterpart in a group that is running.
- The host posts groups without waiting, and blocks only when it needs a received tensor,
  until the group holding that receive has finished.

A plan is, per rank, a list of steps: ("post", communicator, [ops]) or ("wait", key), with
ops ("send" | "recv", peer, key). `deadlocks(plans)` replays them and returns None when
every rank finishes, or a description of the ranks that are stuck.
"""

from __future__ import annotations

from collections import deque

Op = tuple[str, int, tuple]          # ("send" | "recv", peer rank, message key)
Step = tuple                          # ("post", comm, [Op, ...]) or ("wait", key)


class _Group:
    def __init__(self, ops: list[Op]) -> None:
        self.remaining = list(ops)
        self.recv_keys = [key for kind, _, key in ops if kind == "recv"]


def deadlocks(plans: list[list[Step]]) -> str | None:
    ranks = len(plans)
    pc = [0] * ranks                                     # next host step per rank
    streams: dict[tuple[int, str], deque] = {}           # (rank, comm) -> posted groups
    received: list[set] = [set() for _ in range(ranks)]  # keys whose group has finished

    def finish_heads() -> bool:
        done = False
        for (r, _), q in streams.items():
            while q and not q[0].remaining:
                received[r].update(q.popleft().recv_keys)
                done = True
        return done

    progress = True
    while progress:
        progress = False
        for r in range(ranks):   # hosts post until they need a message not yet received
            while pc[r] < len(plans[r]):
                step = plans[r][pc[r]]
                if step[0] == "post":
                    streams.setdefault((r, step[1]), deque()).append(_Group(step[2]))
                elif step[1] not in received[r]:
                    break
                pc[r] += 1
                progress = True
        for (r, comm), q in list(streams.items()):   # match ops of running groups pairwise
            if not q:
                continue
            for op in list(q[0].remaining):
                kind, peer, key = op
                peer_q = streams.get((peer, comm))
                want = ("recv" if kind == "send" else "send", r, key)
                if peer_q and want in peer_q[0].remaining:
                    q[0].remaining.remove(op)
                    peer_q[0].remaining.remove(want)
                    progress = True
        progress |= finish_heads()
    stuck = [r for r in range(ranks) if pc[r] < len(plans[r])]
    pending = {k: len(q) for k, q in streams.items() if q}
    if stuck or pending:
        return f"stuck ranks {stuck} at steps {[pc[r] for r in stuck]}, pending groups {pending}"
    return None
