"""Contrastive losses over the data-parallel group compute the serial loss and gradients.

The serial run is one process (a DP group of one) on a fixed global batch of N = 16
L2-normalised pairs of width 8; it is checked against direct transcriptions of the CLIP and
SigLIP definitions. At DP = 2 and 4, rank r takes rows r*n .. r*n + n - 1 (n = N / dp) as
leaf tensors, and what each rank gets is compared with the serial run by the DP convention
(mean of the rank losses = the serial loss; parameter gradients are averaged over ranks):

    mean_r loss_r                    == serial loss
    rank r's feature gradient / dp   == serial gradient rows r*n .. r*n + n - 1
    mean_r (t' and b gradients)      == serial t' and b gradients

The feature relation: L = mean_r L_r, and gradients that cross ranks are summed into the
owner, so the owner's gradient of row k is sum_r dL_r/dx_k = dp * dL/dx_k. A parameter
producing row k on that rank gets dp * (its serial share); the DP mean (1/dp, summed over
ranks) then gives exactly the serial gradient.

SigLIP is checked with its default chunking (k = min(n, 8) row chunks per text block at
DP > 1, one block serially), with one chunk a block, and with k = 3 (uneven chunks).

Tolerances (fp32): rtol 1e-6 on losses, rtol 1e-5 / atol 1e-7 on gradients (the ring sums
blocks in another order than the serial matmul).

SigLIP's memory, the ring at DP = 2 and 4 with n = 64 rows of width 16 a rank, default
k = 8 chunks of m = 8 rows, over forward and backward:
  - the largest tensor any operation returns (a dispatch mode records it) is at most
    max(n * m, n * width) elements: the [n, m] logits of one chunk or an [n, width]
    gradient, never [n, n] logits, while a plain all-gather SigLIP (written here, also a
    cross-check of the loss) makes [n, N] logits of dp * n * n elements, so the meter does
    see what the assertion is about;
  - the peak of live storage allocated inside the loss is at most the two [n, width]
    gradients, one [n, m] block and four [m, width] chunks in flight (a text chunk scored
    and one arriving, and their accumulators), plus 1 KiB for scalars (13 KiB; the ring
    takes 11 KiB): a ring that double-buffers whole [n, width] blocks is over it (the
    unchunked ring of one [n, n] block: 28.0 / 32.0 KiB at DP = 2 / 4), and so is the plain
    all-gather SigLIP.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.contrastive_memory import plain_siglip  # the all-gather way, [n, N] logits
from megavit.parallel.comm import CommStats, Group
from megavit.parallel.memory import LiveBytesMeter
from megavit.tasks.image_text.losses import (
    DEFAULT_SIGLIP_CHUNKS, ContrastiveQueue, _chunk_bounds, _SigLIPRing, clip_loss,
    siglip_loss,
)
from tests.harness import run_distributed

N, WIDTH = 16, 8
T_CLIP = math.log(1 / 0.07)            # CLIP's initial temperature
T_SIGLIP, B_SIGLIP = math.log(10.0), -3.0
MEMORY_ROWS, MEMORY_WIDTH = 64, 16     # per rank, for the memory check
MEMORY_CHUNK = MEMORY_ROWS // 8        # rows a chunk with the default 8 chunks


def global_batch(seed: int = 0, rows: int = N, width: int = WIDTH):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(rows, width, generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(rows, width, generator=g), dim=-1)
    return images, texts


# ---- the definitions, written out ------------------------------------------------------

def reference_clip(images, texts, t):
    """-(1/2N) sum_i [log softmax_j(s x_i.y_j)_i + log softmax_j(s y_i.x_j)_i], s = exp t."""
    logits = t.exp().clamp(max=100) * images @ texts.t()
    diagonal = logits.diagonal()
    return ((logits.logsumexp(1) - diagonal).mean() + (logits.logsumexp(0) - diagonal).mean()) / 2


def reference_siglip(images, texts, t, b):
    """-(1/N) sum_ij log sigmoid(z_ij (exp(t) x_i.y_j + b)), z = +1 on the diagonal, else -1."""
    z = 2 * torch.eye(images.shape[0]) - 1
    return -F.logsigmoid(z * (t.exp() * images @ texts.t() + b)).sum() / images.shape[0]


def leaves(*tensors):
    return [x.detach().clone().requires_grad_() for x in tensors]


def loss_and_grads(loss_fn, images, texts, t, b=None):
    """Loss and gradients of images, texts, t (and b) at fresh leaves."""
    args = leaves(images, texts, torch.tensor(t)) + ([] if b is None else leaves(torch.tensor(b)))
    loss = loss_fn(*args)
    loss.backward()
    return {"loss": loss.detach(), "grads": [a.grad for a in args]}


def serial(name: str, images=None, texts=None, chunks=None):
    """The serial run (a DP group of one) on the global batch."""
    group = Group.single("dp", CommStats())
    if images is None:
        images, texts = global_batch()
    if name == "clip":
        return loss_and_grads(lambda i, x, t: clip_loss(i, x, t, group), images, texts, T_CLIP)
    return loss_and_grads(lambda i, x, t, b: siglip_loss(i, x, t, b, group, chunks=chunks),
                          images, texts, T_SIGLIP, B_SIGLIP)


def assert_matches(got, want, what):
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=0, msg=what)
    for g, w, name in zip(got["grads"], want["grads"], ["images", "texts", "t'", "b"]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=f"{what}: {name}")


# ---- one process ----------------------------------------------------------------------

def test_serial_losses_match_their_definitions():
    images, texts = global_batch()
    assert_matches(serial("clip"), loss_and_grads(reference_clip, images, texts, T_CLIP),
                   "CLIP")
    want = loss_and_grads(reference_siglip, images, texts, T_SIGLIP, B_SIGLIP)
    assert_matches(serial("siglip"), want, "SigLIP")
    for chunks in (3, 16, 100):        # uneven chunks; one row each; more chunks than rows
        assert_matches(serial("siglip", chunks=chunks), want, f"SigLIP chunks={chunks}")
    # the clamp: past exp(t') = 100 the logits stop growing and t' gets no gradient
    clamped = loss_and_grads(lambda i, x, t: clip_loss(i, x, t, Group.single("dp", CommStats())),
                             images, texts, math.log(150.0))
    assert clamped["grads"][2] == 0
    torch.testing.assert_close(clamped["loss"],
                               reference_clip(images, texts, torch.tensor(math.log(100.0))))


@pytest.mark.parametrize("chunks", [None, 2])
def test_siglip_ring_backward_passes_gradcheck(chunks):
    group = Group.single("dp", CommStats())
    images, texts = (x.double() for x in global_batch(rows=5, width=4))
    inputs = leaves(images, texts, torch.tensor(2.0, dtype=torch.float64),
                    torch.tensor(-1.5, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda i, x, s, b: _SigLIPRing.apply(i, x, s, b, group, chunks), inputs)


def test_siglip_chunk_bounds():
    assert _chunk_bounds(10, 1, None) == [(0, 10)]            # serial default: one block
    assert _chunk_bounds(64, 4, None) == [(8 * c, 8 * c + 8) for c in range(8)]
    assert DEFAULT_SIGLIP_CHUNKS == 8
    assert _chunk_bounds(8, 2, 3) == [(0, 3), (3, 6), (6, 8)]
    assert _chunk_bounds(3, 4, None) == [(0, 1), (1, 2), (2, 3)]   # at most n chunks
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunks"):
            _chunk_bounds(8, 2, bad)


def test_queue_keeps_the_newest_rows():
    q = ContrastiveQueue(size=3, dim=2)
    assert len(q) == 0
    q.push(torch.ones(2, 2), 10 * torch.ones(2, 2))
    q.push(2 * torch.ones(2, 2), 20 * torch.ones(2, 2))
    assert q.images[:, 0].tolist() == [2, 2, 1] and q.texts[:, 0].tolist() == [20, 20, 10]
    with pytest.raises(ValueError, match="--contrastive-queue-size 0"):
        ContrastiveQueue(size=0, dim=2)


# ---- DP ranks -------------------------------------------------------------------------

class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


# The ring's bound on live storage (fp32 elements -> bytes; see the module docstring).
RING_BYTES = 4 * (2 * MEMORY_ROWS * MEMORY_WIDTH + MEMORY_ROWS * MEMORY_CHUNK
                  + 4 * MEMORY_CHUNK * MEMORY_WIDTH) + 1024

QUEUE_STEPS, QUEUE_SIZE = 3, 24


def dp_worker(pstate) -> dict:
    """This rank's slice of the global batch through both losses, the CLIP queue over
    three steps, and the largest tensor SigLIP makes, ring against plain all-gather."""
    group = pstate.dp
    n, r = N // group.size, group.rank
    mine = slice(r * n, (r + 1) * n)
    images, texts = global_batch()
    out = {
        "clip": loss_and_grads(lambda i, x, t: clip_loss(i, x, t, group),
                               images[mine], texts[mine], T_CLIP),
        "siglip": loss_and_grads(lambda i, x, t, b: siglip_loss(i, x, t, b, group),
                                 images[mine], texts[mine], T_SIGLIP, B_SIGLIP),
    }
    for chunks in (1, 3):
        out[f"siglip_k{chunks}"] = loss_and_grads(
            lambda i, x, t, b: siglip_loss(i, x, t, b, group, chunks=chunks),
            images[mine], texts[mine], T_SIGLIP, B_SIGLIP)
    queue = ContrastiveQueue(QUEUE_SIZE, WIDTH)
    out["queue"] = [loss_and_grads(lambda i, x, t: clip_loss(i, x, t, group, queue=queue),
                                   images[mine], texts[mine], T_CLIP)
                    for images, texts in map(global_batch, range(1, QUEUE_STEPS + 1))]

    images, texts = global_batch(seed=7, rows=MEMORY_ROWS * group.size, width=MEMORY_WIDTH)
    mine = slice(r * MEMORY_ROWS, (r + 1) * MEMORY_ROWS)
    for name, fn in [("ring", siglip_loss), ("plain", plain_siglip)]:
        args = leaves(images[mine], texts[mine], torch.tensor(T_SIGLIP), torch.tensor(B_SIGLIP))
        with LargestOutput() as meter:
            loss = fn(*args, group)
            loss.backward()
        out[f"{name}_numel"] = meter.numel
        out[f"{name}_loss"] = loss.detach()
        args = leaves(images[mine], texts[mine], torch.tensor(T_SIGLIP), torch.tensor(B_SIGLIP))
        torch.distributed.barrier()
        with LiveBytesMeter() as meter:
            fn(*args, group).backward()
        out[f"{name}_bytes"] = meter.peak
    return out


def check_against_serial(results: list[dict], dp: int) -> None:
    def combine(per_rank):
        """Per-rank results mapped onto serial ones by the DP convention."""
        grads = list(zip(*(p["grads"] for p in per_rank)))
        return {"loss": torch.stack([p["loss"] for p in per_rank]).mean(),
                "grads": [torch.cat(grads[0]) / dp, torch.cat(grads[1]) / dp]
                + [torch.stack(g).mean() for g in grads[2:]]}

    for name in ("clip", "siglip"):
        assert_matches(combine([res[name] for res in results]), serial(name), f"{name} DP={dp}")
    for chunks in (1, 3):
        assert_matches(combine([res[f"siglip_k{chunks}"] for res in results]), serial("siglip"),
                       f"siglip chunks={chunks} DP={dp}")
    group, queue = Group.single("dp", CommStats()), ContrastiveQueue(QUEUE_SIZE, WIDTH)
    for step, (images, texts) in enumerate(map(global_batch, range(1, QUEUE_STEPS + 1))):
        want = loss_and_grads(lambda i, x, t: clip_loss(i, x, t, group, queue=queue),
                              images, texts, T_CLIP)
        assert_matches(combine([res["queue"][step] for res in results]), want,
                       f"CLIP with queue DP={dp} step {step}")
    largest = max(MEMORY_ROWS * MEMORY_CHUNK, MEMORY_ROWS * MEMORY_WIDTH)
    for res in results:
        assert res["ring_numel"] <= largest, res["ring_numel"]
        assert res["plain_numel"] >= dp * MEMORY_ROWS ** 2 > largest, res["plain_numel"]
        assert res["ring_bytes"] <= RING_BYTES, (res["ring_bytes"], RING_BYTES)
        assert res["plain_bytes"] > RING_BYTES, (res["plain_bytes"], RING_BYTES)
        torch.testing.assert_close(res["ring_loss"], res["plain_loss"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_contrastive_losses_match_serial_and_siglip_ring_streams_chunks(dp):
    results = run_distributed(world_size=dp, tp=1, jobs={"dp": (dp_worker, ())})["dp"]
    check_against_serial(results, dp)
