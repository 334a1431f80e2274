"""Peak memory of the contrastive losses per DP rank: megavit's against plain all-gather.

    .venv/bin/python -m benchmarks.contrastive_memory                    # n=512, d=256, DP 1 2 4
    .venv/bin/python -m benchmarks.contrastive_memory --rows 1024 --dp 1 2

DP gloo processes (one thread each) each hold a fixed slice of n L2-normalised image and
text features of width d (the global batch grows with DP: N = n * DP) and run one forward
and backward of each loss:

    megavit SigLIP   megavit.tasks.image_text.losses.siglip_loss as the task calls it
                     (default chunks): at DP > 1 each rank's texts travel the DP ring in
                     k = 8 row chunks of n / 8 rows, [n, n / 8] logits at a time,
                     recomputed in backward; at DP = 1 nothing is communicated and the
                     default is one chunk: the whole [n, n] block of logits at once (no
                     extra copies). So its DP > 1 figures can be below its DP = 1 figure:
                     chunking also shrinks the logits, which the DP = 1 default does not do
    SigLIP k=8       the same loss with chunks=8 at every DP size, DP = 1 included (there
                     the [n, n] logits are made 8 column slices at a time, still no
                     communication): its ratios isolate what the ring itself costs (the
                     text chunks and gradient accumulators in flight)
    plain SigLIP     texts all-gathered (summing backward), [n, N] logits, plain autograd
    megavit CLIP     megavit.tasks.image_text.losses.clip_loss: local rows against gathered
                     columns, [n, N] logits each way
    plain CLIP       both sides all-gathered and the full [N, N] loss on every rank (what
                     a CLIP trainer does without local-loss)

Measured: the peak, over the loss's forward and backward, of the bytes of tensor storage
that operations inside it allocated and that is still alive (a TorchDispatchMode sees every
operation's outputs, forward and backward; outputs that are views or in-place results of
existing tensors are not new storage; a storage counts until it is freed). The inputs, made
before, are not counted; the gradients left in .grad are. The largest figure over ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


import torch
import torch.nn.functional as F

from megavit.training.peak_flops import cpu_name
from megavit.parallel.memory import LiveBytesMeter
from megavit.tasks.image_text.losses import clip_loss, gather_with_grad, siglip_loss


def plain_siglip(images, texts, t, b, group):
    """This rank's rows against all N gathered texts: [n, N] logits through autograd."""
    n = images.shape[0]
    logits = t.exp() * images @ gather_with_grad(texts, group).t() + b
    z = -torch.ones_like(logits)
    z[:, group.rank * n:(group.rank + 1) * n] += 2 * torch.eye(n)
    return -F.logsigmoid(z * logits).sum() / n


def plain_clip(images, texts, t, group):
    """Everything gathered, the full [N, N] CLIP loss on every rank."""
    all_images, all_texts = gather_with_grad(images, group), gather_with_grad(texts, group)
    logits = t.exp().clamp(max=100) * all_images @ all_texts.t()
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


LOSSES = {
    "megavit SigLIP": lambda i, x, t, b, g: siglip_loss(i, x, t, b, g),
    "SigLIP k=8": lambda i, x, t, b, g: siglip_loss(i, x, t, b, g, chunks=8),
    "plain SigLIP": plain_siglip,
    "megavit CLIP": lambda i, x, t, b, g: clip_loss(i, x, t, g),
    "plain CLIP": lambda i, x, t, b, g: plain_clip(i, x, t, g),
}


def measure(pstate, rows: int, dim: int) -> dict[str, int]:
    group = pstate.dp
    g = torch.Generator().manual_seed(group.rank)
    features = [F.normalize(torch.randn(rows, dim, generator=g), dim=-1) for _ in range(2)]
    peaks = {}
    for name, fn in LOSSES.items():
        args = [x.clone().requires_grad_() for x in features]
        args += [torch.tensor(2.3, requires_grad=True), torch.tensor(-10.0, requires_grad=True)]
        torch.distributed.barrier()
        with LiveBytesMeter() as meter:
            fn(*args, group).backward()
        peaks[name] = meter.peak
    return peaks




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=512, help="features per rank n (default 512)")
    p.add_argument("--dim", type=int, default=256, help="feature width d (default 256)")
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4], help="DP sizes (default 1 2 4)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    from tests.harness import run_distributed

    peaks = {}
    for dp in args.dp:
        per_rank = run_distributed(world_size=dp, tp=1,
                                   jobs={"m": (measure, (args.rows, args.dim))})["m"]
        peaks[dp] = {name: max(r[name] for r in per_rank) for name in LOSSES}

    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"gloo, 1 thread per rank")
    print(f"# command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"# per rank: n = {args.rows} pairs of width d = {args.dim}, fp32; global batch "
          f"N = n * DP")
    print("# figure: peak live bytes of storage allocated during one loss forward + backward "
          "(inputs not counted, .grad counted), MiB, largest rank; (x) = / its DP="
          f"{args.dp[0]} figure")
    print("# megavit SigLIP: default chunks: DP=1 one [n, n] logits block, no communication; "
          "DP>1 texts round the ring in 8 row chunks ([n, n/8] logits). SigLIP k=8: chunks=8 "
          "at every DP, DP=1 included (no communication there)")
    width = 17
    print(f"{'loss':<16}" + "".join(f"{'DP=' + str(dp):>{width}}" for dp in args.dp))
    for name in LOSSES:
        base = peaks[args.dp[0]][name]
        cells = [f"{peaks[dp][name] / 2**20:.2f} ({peaks[dp][name] / base:.2f}x)"
                 for dp in args.dp]
        print(f"{name:<16}" + "".join(f"{c:>{width}}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
