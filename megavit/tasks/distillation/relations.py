"""Relation distillation in training: where the teacher's queries, keys and values are taken
and where the student's relation loss enters its backward pass.

    TeacherCapture   set as a teacher block's `AttentionCore.relation`: keeps the block's
                     [q | k | v] of this TP rank's heads, [L, m, 3 h_t / t], on each forward
    RelationLink     set as a student block's `AttentionCore.relation`, on whichever stage
                     holds the block: looks the micro-batch's teacher q, k, v up by its
                     first image's global id (they arrive with the labels, on every stage),
                     computes this rank's share of MiniLMv2's relation loss (losses.py
                     `relation_distillation`, R/t of the R relation heads: the TP split
                     keeps whole relation heads when t divides R) and ties it to the
                     block's q, k, v with `attach_loss`
    attach_loss      identity on a tensor whose backward also sends gradient 1 into a
                     scalar loss: the loss joins the micro-batch's backward wherever the
                     block runs, also when it is recomputed in backward (the link sees
                     gradients only then), with the step's loss scale / M folded in

The relation is over the tokens, not the attention pattern, so any attention type of the
student or teacher works; the token counts of the paired blocks must be equal.
"""

from __future__ import annotations

import torch

from megavit.tasks.distillation.losses import relation_distillation


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape = loss.shape
        ctx.loss_dtype = loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad.device)


def attach_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """x unchanged; when x's gradient is computed, `loss` (a scalar in the graph) is
    back-propagated with gradient 1 too."""
    return _AttachLoss.apply(x, loss)


class TeacherCapture:
    """A teacher block's [q | k | v] of the last forward (this TP rank's heads)."""

    def __init__(self) -> None:
        self.qkv: torch.Tensor | None = None

    def __call__(self, qkv: torch.Tensor, sample_ids: torch.Tensor | None) -> torch.Tensor:
        self.qkv = qkv
        return qkv


class RelationLink:
    """The student block's relation loss against the teacher block's (see the module
    docstring). `heads`: the relation heads R; `tp`: the TP size t (this rank holds R/t);
    `weight`: --distill-relation-weight; `length`: the tokens compared."""

    def __init__(self, heads: int, tp: int, weight: float, length: int) -> None:
        self.heads, self.tp, self.weight, self.length = heads, tp, weight, length
        self.targets: dict[int, tuple[torch.Tensor, ...]] = {}   # first id -> teacher q, k, v
        self.micro_batches = 1            # M of the step: each micro-batch's loss is / M
        self.loss_scale = 1.0             # the step's loss scale (fp16), else 1
        self.values: list[torch.Tensor] = []   # this rank's shares / M, one per micro-batch

    def __call__(self, qkv: torch.Tensor, sample_ids: torch.Tensor | None) -> torch.Tensor:
        if not torch.is_grad_enabled() or sample_ids is None:
            return qkv        # no gradients (evaluation, the first pass of a recomputed
                              # region: its second pass in backward makes the term)
        teacher = self.targets[int(sample_ids[0])]
        student = tuple(x[:self.length].transpose(0, 1)          # [m, L, h_s / t]
                        for x in qkv.chunk(3, dim=-1))
        share = relation_distillation(student, teacher, self.heads // self.tp, self.heads)
        self.values.append(share.detach() / self.micro_batches)
        return attach_loss(qkv, share * (self.weight * self.loss_scale / self.micro_batches))
