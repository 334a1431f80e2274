"""Distillation losses: what a student is trained to match in a teacher.

Response (the teacher's outputs), for logits [b, C] (student s, teacher t):
    soft_distillation        KL(softmax(t/T) || softmax(s/T)) * T^2, mean over the batch
                             (Hinton et al. 2015; the T^2 keeps the gradient's scale as T
                             changes)
    hard_distillation        cross-entropy of s against argmax t (DeiT's hard label)
    response_loss            (1 - alpha) * the task's loss + alpha * one of the two; with a
                             distillation token (DeiT), the class head learns the labels and
                             the token's head the teacher
Feature (intermediate activations), tokens [L, b, h] as the blocks make them:
    align_patch_tokens       a teacher's patch grid resized to the student's (bilinear), or
                             a FeatureAlignmentError naming why it cannot be
    feature_distillation     MSE or cosine distance between the student's tokens (through a
                             learned projection when the widths differ) and the teacher's
Relation (self-attention, MiniLMv2, Wang et al. 2021), queries / keys / values [b, L, h]:
    relation_distillation    per relation Q-Q, K-K, V-V: the h columns (all heads side by
                             side) re-split into R relation heads of h/R, relation =
                             softmax(x x^T / sqrt(h/R)) per relation head, KL(teacher ||
                             student) per row; the student's and teacher's head counts (and
                             widths) may differ, only R is shared
Two towers (open_clip's distillation):
    similarity_distillation  cross-entropy of the student's image-text logits against the
                             softmax of the teacher's, image-to-text and text-to-image
    two_tower_distillation   the same over a data-parallel group: each rank's image (text)
                             rows against the gathered texts (images) of the global batch,
                             the student's gathered with a summing backward (the contrastive
                             losses' DP convention: mean over ranks = the serial loss)

Tensor parallelism: logits are replicated over TP (the classifier is), so response losses
are plain. Attention heads are split over TP in order, so with R a multiple of the TP size a
rank's columns hold exactly R/t whole relation heads: `relation_distillation` on a rank's
columns, with `total_heads` = R, returns its share, and the sum over the TP group is the
whole loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megavit.errors import UserError
from megavit.tasks.image_text.losses import gather_with_grad


class FeatureAlignmentError(UserError):
    """A student's and a teacher's tokens cannot be put in correspondence."""


# ---- response ---------------------------------------------------------------------------

def soft_distillation(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) T^2 over logits [b, C], averaged over the b rows.
    The teacher is a target: no gradient flows into it."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"soft distillation: student logits {tuple(student.shape)} and "
                         f"teacher logits {tuple(teacher.shape)} must both be [b, C]")
    if temperature <= 0:
        raise ValueError(f"--distill-temperature {temperature}: must be positive")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return kl.mean() * temperature ** 2


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [b, C] against the teacher's top class per row (DeiT)."""
    return F.cross_entropy(student.float(), teacher.detach().argmax(dim=-1))


def response_loss(kind: str, task_loss: torch.Tensor, student: torch.Tensor,
                  teacher: torch.Tensor, alpha: float, temperature: float = 1.0,
                  token_student: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - alpha) task_loss + alpha distillation, `kind`:
        soft   soft_distillation(student, teacher, T)
        hard   hard_distillation(student, teacher)
        token  hard_distillation(token_student, teacher): the distillation token's head
               learns the teacher while the class head (whose loss is task_loss) learns
               the labels (DeiT; at inference the two heads' logits are averaged)"""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--distill-alpha {alpha}: must be in [0, 1]")
    if kind == "soft":
        distill = soft_distillation(student, teacher, temperature)
    elif kind == "hard":
        distill = hard_distillation(student, teacher)
    elif kind == "token":
        if token_student is None:
            raise ValueError("--distill-loss token: the student has no distillation token "
                             "head's logits")
        distill = hard_distillation(token_student, teacher)
    else:
        raise ValueError(f"--distill-loss {kind!r}: one of soft, hard, token")
    return (1.0 - alpha) * task_loss + alpha * distill


# ---- features ---------------------------------------------------------------------------

def align_patch_tokens(teacher: torch.Tensor, teacher_grid: tuple[int, int],
                       student_grid: tuple[int, int], teacher_prefix: int = 0) -> torch.Tensor:
    """A teacher's tokens [p + gh*gw, b, h] (p prefix tokens first: class token, registers)
    -> its patch tokens on the student's grid [sh*sw, b, h]: the [gh, gw] map resized
    bilinearly (unchanged when the grids are equal). Grids of different aspect ratio are
    refused (resizing would stretch the image's geometry), as is a token count that does
    not match the grid."""
    gh, gw = teacher_grid
    sh, sw = student_grid
    if teacher.shape[0] != teacher_prefix + gh * gw:
        raise FeatureAlignmentError(f"teacher tokens {teacher.shape[0]} are not {teacher_prefix}"
                                    f" prefix tokens + a {gh}x{gw} grid")
    patches = teacher[teacher_prefix:]
    if (gh, gw) == (sh, sw):
        return patches
    if gh * sw != gw * sh:
        raise FeatureAlignmentError(f"the teacher's {gh}x{gw} patch grid and the student's "
                                    f"{sh}x{sw} have different aspect ratios: their tokens "
                                    "cannot be aligned (use the same image size and patch "
                                    "ratio, or distil only the response)")
    _, b, h = patches.shape
    grid = patches.permute(1, 2, 0).reshape(b, h, gh, gw)
    resized = F.interpolate(grid.float(), size=(sh, sw), mode="bilinear", align_corners=False)
    return resized.to(patches.dtype).reshape(b, h, sh * sw).permute(2, 0, 1)


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
                         projection: torch.nn.Module | None = None) -> torch.Tensor:
    """Distance between student tokens [L, b, h_s] and teacher tokens [L, b, h_t] (already
    aligned), the student's through `projection` (h_s -> h_t) when given:
        mse     mean over all elements of (P s - t)^2
        cosine  mean over the L*b tokens of 1 - cos(P s, t)"""
    if projection is not None:
        student = projection(student)
    if student.shape != teacher.shape:
        raise FeatureAlignmentError(f"student tokens {tuple(student.shape)} (after the "
                                    f"projection) and teacher tokens {tuple(teacher.shape)} "
                                    "differ: widths need a projection, grids an alignment")
    s, t = student.float(), teacher.detach().float()
    if kind == "mse":
        return (s - t).pow(2).mean()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"--distill-feature-loss {kind!r}: one of mse, cosine")


# ---- relations --------------------------------------------------------------------------

def relation_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, L, h] (attention heads side by side) -> [b, heads, L, h/heads]."""
    b, L, h = x.shape
    if h % heads:
        raise ValueError(f"{h} columns do not split into {heads} relation heads")
    return x.reshape(b, L, heads, h // heads).transpose(1, 2)


def self_relation(x: torch.Tensor, heads: int) -> torch.Tensor:
    """log softmax(x_r x_r^T / sqrt(d_r)) per relation head: [b, L, h] -> [b, R, L, L]."""
    xr = relation_heads(x.float(), heads)
    return F.log_softmax(xr @ xr.transpose(-2, -1) / math.sqrt(xr.shape[-1]), dim=-1)


def relation_distillation(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                          heads: int, total_heads: int | None = None) -> torch.Tensor:
    """MiniLMv2's relation loss: for each matching pair of (queries, keys, values) [b, L, h]
    (student and teacher widths may differ; their token counts L may not), the KL of the
    teacher's self-relation from the student's, summed over each row, averaged over the b
    rows, L queries and relation heads, then over the relations. `heads`: the relation
    heads in these columns; `total_heads`: all of them when the columns are one TP rank's
    share (default `heads`): the result is then this rank's part of the sum."""
    if len(student) != len(teacher) or not student:
        raise ValueError("relation distillation: the same relations (Q, K, V) from both")
    total = total_heads or heads
    out = 0.0
    for s, t in zip(student, teacher):
        if s.shape[:2] != t.shape[:2]:
            raise FeatureAlignmentError(f"relation distillation: student {tuple(s.shape)} and "
                                        f"teacher {tuple(t.shape)} need the same [b, L]")
        log_s, log_t = self_relation(s, heads), self_relation(t.detach(), heads)
        kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)        # [b, R, L]
        out = out + kl.sum() / (kl.shape[0] * kl.shape[2] * total)
    return out / len(student)


# ---- two towers -------------------------------------------------------------------------

def similarity_distillation(student_i2t: torch.Tensor, teacher_i2t: torch.Tensor,
                            student_t2i: torch.Tensor, teacher_t2i: torch.Tensor
                            ) -> torch.Tensor:
    """open_clip's rule: the mean of the image-to-text and text-to-image cross-entropies of
    the student's scaled similarity logits against the softmax of the teacher's (each
    [n, N]: a rank's n rows against the N gathered columns), averaged over the rows."""
    def soft_ce(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if s.shape != t.shape:
            raise ValueError(f"similarity distillation: student {tuple(s.shape)} and teacher "
                             f"{tuple(t.shape)} logits differ")
        return -(t.detach().float().softmax(-1) * s.float().log_softmax(-1)).sum(-1).mean()

    return 0.5 * (soft_ce(student_i2t, teacher_i2t) + soft_ce(student_t2i, teacher_t2i))


def two_tower_distillation(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                           teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                           teacher_scale: torch.Tensor, group) -> torch.Tensor:
    """This DP rank's share of `similarity_distillation` over the global batch.

    image, text: the student's unit-norm embeddings [n, d] of this rank's pairs (rank k
    holds global rows k*n ..); scale: its logit scale (0-dim, exp of the log-temperature,
    clamped as its own loss clamps it). teacher_image, teacher_text [n, d_t] and
    teacher_scale: the frozen teacher's, no gradient. The student's embeddings are
    all-gathered over `group` with a summing backward, the teacher's plainly; logits are
    [n, N] each way, so the mean of the shares over the group is the serial loss."""
    all_images, all_texts = gather_with_grad(image, group), gather_with_grad(text, group)
    with torch.no_grad():
        t_images = group.all_gather(teacher_image.contiguous()) if group.size > 1 \
            else teacher_image
        t_texts = group.all_gather(teacher_text.contiguous()) if group.size > 1 \
            else teacher_text
        teacher_i2t = teacher_scale * teacher_image.float() @ t_texts.float().t()
        teacher_t2i = teacher_scale * teacher_text.float() @ t_images.float().t()
    return similarity_distillation(scale * image.float() @ all_texts.float().t(), teacher_i2t,
                                   scale * text.float() @ all_images.float().t(), teacher_t2i)
