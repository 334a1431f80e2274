"""Contrastive image-text losses over the data-parallel group.

Each DP rank holds the L2-normalised features of its slice of the global batch,
`image_features` and `text_features`: [n, d] (matching rows are pairs; every rank has the
same n, so the global batch is N = n * dp). The losses see the whole global batch:

    gather_with_grad  forward: all-gather over the group     backward: reduce-scatter (sum)
    clip_loss         CLIP's softmax InfoNCE (Radford et al. 2021): this rank's rows
                      against the gathered columns, [n, N] logits each way
    siglip_loss       SigLIP's pairwise sigmoid loss (Zhai et al. 2023): text blocks travel
                      around the DP ring by send/recv in row chunks (~n/8 rows), [n, n/k]
                      logits at a time, one autograd Function that recomputes them in
                      backward; memory per rank does not grow with the DP size

The DP convention: each rank's loss L_r is defined so that mean_r L_r is the serial loss on
the global batch, and gradients that cross ranks (through a gather or around the ring) are
*summed* into the rank that owns the features. So a rank's feature gradient is dp times
the serial gradient of its rows, and after the data-parallel mean of parameter gradients
(scale 1/dp, sum) every parameter gradient equals the serial one. `logit_scale` and
`logit_bias` are replicated parameters (the same value on every rank); their gradient on a
rank is that rank's own, and the DP mean makes it the serial one.

`ContrastiveQueue` keeps the features of the last K global batches as extra negatives
for `clip_loss` (the `--contrastive-queue-size K` meaning; 0, the default, is off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megavit.parallel.comm import Group


# ---- gather with a summing backward ---------------------------------------------------

class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return group.all_gather(x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group.reduce_scatter(grad.contiguous()), None


def gather_with_grad(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather over `group` along dim 0: [n, ...] -> [size * n, ...] (rank k's rows at
    k * n). Backward: reduce-scatter over `group`: every rank's gradient of the gathered
    tensor is summed and each rank keeps its own [n, ...] chunk — each rank's loss depends
    on every rank's rows, and the owner needs the sum of those dependencies."""
    return x if group.size == 1 else _GatherWithGrad.apply(x, group)


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"contrastive loss: image features {tuple(image_features.shape)} and "
                         f"text features {tuple(text_features.shape)} must both be [n, d], "
                         "one row per pair, the same n on every DP rank")


# ---- CLIP -----------------------------------------------------------------------------

def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor, group: Group, max_scale: float | None = 100.0,
              queue: "ContrastiveQueue | None" = None) -> torch.Tensor:
    """CLIP's symmetric softmax cross-entropy over the global batch; this rank's share.

    image_features, text_features: [n, d], L2-normalised, this rank's slice of the global
    batch (rank k holds global rows k*n .. k*n + n - 1; the same n on every rank).
    logit_scale: 0-dim, the learned log-temperature t'; the logits are scaled by
    exp(t'), clamped at `max_scale` (CLIP: 100) with zero gradient to t' while clamped
    (CLIP clamps the parameter itself after each step instead; the logits are the same).

    Both feature sets are all-gathered over `group` (`gather_with_grad`: backward
    reduce-scatters). This rank's image rows are scored against all N texts and its text
    rows against all N images ([n, N] logits each way); the label of local row i is
    column group.rank * n + i. Returns the mean over this rank's rows of the two
    cross-entropies averaged: mean over ranks = the serial loss on the global batch.

    With a `queue`, its K stored texts (images) are extra negative columns for the image
    (text) rows, [n, N + K], and after the loss this step's gathered global batch is
    pushed into it (detached), so it is the same queue on every rank and in a serial run.
    """
    _check_pairs(image_features, text_features)
    n = image_features.shape[0]
    scale = logit_scale.exp()
    if max_scale is not None:
        scale = scale.clamp(max=max_scale)
    all_images = gather_with_grad(image_features, group)     # [N, d]
    all_texts = gather_with_grad(text_features, group)       # [N, d]
    image_columns, text_columns = all_texts, all_images
    if queue is not None and len(queue):
        image_columns = torch.cat([all_texts, queue.texts.to(all_texts.dtype)])
        text_columns = torch.cat([all_images, queue.images.to(all_images.dtype)])
    labels = torch.arange(n, device=image_features.device) + group.rank * n
    image_logits = scale * image_features @ image_columns.t()   # [n, N (+ K)]
    text_logits = scale * text_features @ text_columns.t()      # [n, N (+ K)]
    loss = (F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)) / 2
    if queue is not None:
        queue.push(all_images.detach(), all_texts.detach())
    return loss


class ContrastiveQueue:
    """The image and text features of the most recent global batches, newest first, at
    most `size` rows each ([<= size, dim]): detached extra negatives for `clip_loss`
    (momentum-contrast style; He et al. 2020). `size` is `--contrastive-queue-size`;
    0 (the default) means no queue. Every rank pushes the same gathered global batch, so
    the queue does not depend on the DP size; it is not part of the model and starts
    empty after a restart."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if size <= 0:
            raise ValueError(f"--contrastive-queue-size {size}: a queue needs at least one "
                             "row (leave the queue out for none)")
        self.size = size
        self.images = torch.empty(0, dim, device=device, dtype=dtype)
        self.texts = torch.empty(0, dim, device=device, dtype=dtype)

    def __len__(self) -> int:
        return self.images.shape[0]

    @torch.no_grad()
    def push(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """Put a global batch ([N, dim] each) in front; the oldest rows beyond `size`
        drop out."""
        self.images = torch.cat([images.to(self.images.dtype), self.images])[:self.size]
        self.texts = torch.cat([texts.to(self.texts.dtype), self.texts])[:self.size]


# ---- SigLIP ---------------------------------------------------------------------------

# Point-to-point tags of the ring, one per (chunk, hop, kind): no two messages of one loss
# share a tag, so a receive can only match the send it was posted for.
_FORWARD_TEXT, _BACKWARD_TEXT, _BACKWARD_GRAD = 0, 1, 2
_TAG_BASE = 0x516000

DEFAULT_SIGLIP_CHUNKS = 8
"""Chunks per text block when the DP group has two or more ranks and `chunks` is not
given (fewer when n < 8): rows per chunk about n / 8."""


def _tag(chunk: int, hop: int, hops: int, kind: int) -> int:
    return _TAG_BASE + 3 * (chunk * hops + hop) + kind


def _chunk_bounds(n: int, group_size: int, chunks: int | None) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) splitting n rows into k near-equal chunks (sizes differ by at
    most one, the larger first): k = `chunks` (at most n), or by default one chunk for a
    group of one and min(n, DEFAULT_SIGLIP_CHUNKS) otherwise."""
    if chunks is None:
        chunks = 1 if group_size == 1 else DEFAULT_SIGLIP_CHUNKS
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"siglip_loss: chunks={chunks!r} must be a positive integer "
                         "(or None for the default)")
    k = max(1, min(chunks, n))
    size, extra = divmod(n, k)
    bounds, lo = [], 0
    for c in range(k):
        hi = lo + size + (1 if c < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _logits(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor) -> torch.Tensor:
    """scale * images @ texts.T + bias: a fresh [n, m] block in images' dtype."""
    return (images @ texts.t().to(images.dtype)).mul_(scale).add_(bias)


def _wait(pending: list) -> None:
    for p in pending:
        p.wait()


class _SigLIPRing(torch.autograd.Function):
    """L_r = (1/n) sum_{i local} sum_{j global} -log sigmoid(z_ij l_ij), l = s x.y + b.

    Every rank's text block [n, d] is split along the rows into the same k chunks
    (`_chunk_bounds`), and each chunk goes round the ring on its own: for chunk c, at
    hop h rank r holds chunk c of rank r - h (mod d), scores its n image rows against it
    ([n, m] logits, m ~ n / k), and passes it to rank r + 1, which scores it at hop
    h + 1. Chunk c's d hops finish before chunk c + 1 starts, so a rank holds one chunk
    being scored and one arriving, never a whole foreign block. Only the inputs are kept
    for backward. With one rank there is no communication: the chunks are just the
    columns of the [n, n] logits, scored one after the other.

    Backward, with G = (g / n) dL/dl of one chunk ([n, m], recomputed):
        P   = sum G @ Y_chunk                  (image gradient / s)
        A_c = sum over ranks of G^T @ X_r      (the chunk's text gradient / s)
        ds  = sum_i x_i . P_i,  db = sum of all G
    The chunks travel as in forward, each with its accumulator A_c (one exchange per
    chunk per hop, text and accumulator posted together after the chunk is scored);
    after d hops the accumulator is back at its owner, complete, and lands directly in
    the owner's text gradient (the text itself stops one hop earlier, at the rank before
    the owner).
    """

    @staticmethod
    def forward(ctx, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor, group: Group, chunks: int | None = None) -> torch.Tensor:
        ctx.group = group
        ctx.bounds = bounds = _chunk_bounds(images.shape[0], group.size, chunks)
        ctx.save_for_backward(images, texts, scale, bias)
        d, r = group.size, group.rank
        right, left = (r + 1) % d, (r - 1) % d
        work = torch.promote_types(images.dtype, torch.float32)
        x, s, b = images.to(work), scale.to(work), bias.to(work)
        total = torch.zeros((), dtype=work, device=images.device)
        texts = texts.contiguous()
        for c, (lo, hi) in enumerate(bounds):
            current = texts[lo:hi]                       # this rank's own chunk c first
            for h in range(d):
                pending = []
                if h < d - 1:                            # the next hop's chunk arrives
                    incoming = torch.empty_like(current)  # while this one is scored
                    tag = _tag(c, h, d, _FORWARD_TEXT)
                    pending = group.exchange([(current, right, tag)],
                                             [(incoming, left, tag)])
                block = _logits(x, current, s, b)        # [n, hi - lo]
                if h == 0:                               # matching pairs (lo + j, j): z = +1
                    total -= block.diagonal(-lo).sum()   # -log sig(l) = softplus(l) - l
                torch.logaddexp(block, block.new_zeros(()), out=block)   # softplus: z = -1
                total += block.sum()
                del block
                _wait(pending)
                del pending
                if h < d - 1:
                    current = incoming
                    del incoming
            del current
        return (total / images.shape[0]).to(images.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        images, texts, scale, bias = ctx.saved_tensors
        group, bounds = ctx.group, ctx.bounds
        d, r = group.size, group.rank
        right, left = (r + 1) % d, (r - 1) % d
        work = torch.promote_types(images.dtype, torch.float32)
        x, s, b = images.to(work), scale.to(work), bias.to(work)
        coef = grad.to(work) / images.shape[0]
        P = torch.zeros(images.shape, dtype=work, device=images.device)
        grad_texts = torch.empty(texts.shape, dtype=work, device=texts.device)
        grad_bias = torch.zeros((), dtype=work, device=images.device)
        texts = texts.contiguous()
        for c, (lo, hi) in enumerate(bounds):
            current = texts[lo:hi]
            accumulator = grad_texts[lo:hi] if d == 1 else None
            for h in range(d):
                G = _logits(x, current, s, b).sigmoid_()    # dsoftplus(l)/dl, z = -1
                if h == 0:
                    G.diagonal(-lo).sub_(1)                  # z = +1: sigmoid(l) - 1
                G.mul_(coef)
                grad_bias += G.sum()
                P.addmm_(G, current.to(work))
                if accumulator is None:                      # own chunk, first hop
                    accumulator = G.t() @ x
                elif d == 1:
                    torch.mm(G.t(), x, out=accumulator)
                else:
                    accumulator.addmm_(G.t(), x)
                del G
                if d == 1:
                    break
                # The chunk and its accumulator go on together; after the last hop only
                # the accumulator does, straight into its owner's gradient rows.
                acc_tag = _tag(c, h, d, _BACKWARD_GRAD)
                if h < d - 1:
                    text_tag = _tag(c, h, d, _BACKWARD_TEXT)
                    incoming = torch.empty_like(current)
                    arriving = torch.empty_like(accumulator)
                    pending = group.exchange(
                        [(current, right, text_tag), (accumulator, right, acc_tag)],
                        [(incoming, left, text_tag), (arriving, left, acc_tag)])
                else:
                    incoming, arriving = None, grad_texts[lo:hi]
                    pending = group.exchange([(accumulator, right, acc_tag)],
                                             [(arriving, left, acc_tag)])
                _wait(pending)
                del pending
                current, accumulator = incoming, arriving
                del incoming, arriving
            del current, accumulator
        # Every row range of grad_texts now holds this rank's texts' gradient / s.
        grad_scale = torch.dot(P.view(-1), x.reshape(-1)).reshape(scale.shape)
        grad_images = P.mul_(s).to(images.dtype)
        grad_texts = grad_texts.mul_(s).to(texts.dtype)
        return (grad_images, grad_texts, grad_scale.to(scale.dtype),
                grad_bias.reshape(bias.shape).to(bias.dtype), None, None)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                group: Group, *, chunks: int | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over the global batch; this rank's share.

    image_features, text_features: [n, d], L2-normalised, this rank's slice of the global
    batch (the same n on every rank, N = n * group.size). logit_scale: 0-dim, the learned
    log-temperature t' (scale exp(t'), not clamped; SigLIP starts at t' = log 10);
    logit_bias: 0-dim, b (SigLIP starts at -10). Both replicated over `group`.

    The serial loss is L = -(1/N) sum_i sum_j log sigmoid(z_ij (exp(t') x_i . y_j + b)),
    z_ij = +1 for a matching pair (i = j), -1 otherwise. This rank returns
    L_r = -(1/n) sum over its image rows i, over all N texts j, so mean over ranks = L.

    chunks: how many row chunks each text block travels in (k; near-equal sizes, at most
    n). Default (None): with two or more ranks min(n, 8), about n / 8 rows a chunk; with
    one rank 1, i.e. the single [n, n] block of logits, nothing is communicated. An
    explicit k chunks at any group size, one rank included (the [n, n] logits are then
    made k column slices at a time).

    Communication: each chunk of the text features goes around `group` as a ring by
    point-to-point send/recv (each step posts its sends and receives together, tagged by
    chunk, hop and kind), d - 1 hops forward; in backward each chunk goes round again
    together with its gradient accumulator (d - 1 hops for the texts, d for the
    accumulator, which ends at the chunk's owner): k (d - 1) exchanges forward, k d
    backward. Memory does not grow with the DP size. With m ~ n / k rows a chunk, a
    rank holds at any time one [n, m] block of logits (or its gradient), the [n, d]
    image-gradient and text-gradient buffers, and in flight at most two [m, d] text
    chunks (the one scored, the one arriving) and, in backward, their two [m, d]
    accumulators; no whole [n, d] foreign block and no [n, n] logits once k > 1.
    """
    _check_pairs(image_features, text_features)
    return _SigLIPRing.apply(image_features, text_features, logit_scale.exp(), logit_bias,
                             group, chunks)
