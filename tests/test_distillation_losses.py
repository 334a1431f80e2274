"""Each distillation loss (megavit/tasks/distillation/losses.py) equals its plain formula,
written out here element by element or through another of torch's functions:

- soft KL with temperature (against torch's kl_div, and by hand), T^2 scaling; hard
  (DeiT) against the teacher's argmax; the response mix and the distillation token;
- relation KL (MiniLMv2) with different head counts and widths in the student and the
  teacher, by loops over relation heads and rows; split over two "TP ranks" (each its
  columns) the shares sum to the whole;
- feature pairs through a projection (MSE and cosine), a teacher grid resized to the
  student's (exact 2x: the mean of each 2x2 block), a different aspect ratio refused;
- open_clip's similarity-matrix rule by hand;
- no gradient reaches the teacher's tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megavit.tasks.distillation.losses import (FeatureAlignmentError, align_patch_tokens,
                                               feature_distillation, hard_distillation,
                                               relation_distillation, response_loss,
                                               similarity_distillation, soft_distillation)


def g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_soft_distillation_is_the_tempered_kl_times_t_squared():
    s, t = g(5, 7, seed=1).requires_grad_(), g(5, 7, seed=2).requires_grad_()
    for T in (1.0, 4.0):
        got = soft_distillation(s, t, T)
        by_hand = 0.0
        for i in range(5):
            p = [math.exp(t[i, c].item() / T) for c in range(7)]
            q = [math.exp(s[i, c].item() / T) for c in range(7)]
            p = [v / sum(p) for v in p]
            q = [v / sum(q) for v in q]
            by_hand += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))
        assert got.item() == pytest.approx(by_hand / 5 * T * T, rel=1e-5)
        torch_kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                            log_target=True, reduction="batchmean") * T * T
        torch.testing.assert_close(got, torch_kl.float(), rtol=1e-5, atol=1e-6)
    soft_distillation(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None
    assert soft_distillation(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hard_distillation_and_the_response_mix():
    s, t = g(6, 4, seed=3), g(6, 4, seed=4)
    top = [max(range(4), key=lambda c: t[i, c].item()) for i in range(6)]
    by_hand = sum(-(s[i, top[i]] - torch.logsumexp(s[i], 0)).item() for i in range(6)) / 6
    assert hard_distillation(s, t).item() == pytest.approx(by_hand, rel=1e-5)
    task = torch.tensor(0.7)
    assert response_loss("soft", task, s, t, 0.25, 2.0).item() == pytest.approx(
        0.75 * 0.7 + 0.25 * soft_distillation(s, t, 2.0).item(), rel=1e-6)
    assert response_loss("hard", task, s, t, 0.5).item() == pytest.approx(
        0.35 + 0.5 * by_hand, rel=1e-6)
    token = g(6, 4, seed=5)           # the distillation token's head learns the teacher
    assert response_loss("token", task, s, t, 0.5, token_student=token).item() == \
        pytest.approx(0.35 + 0.5 * hard_distillation(token, t).item(), rel=1e-6)
    with pytest.raises(ValueError, match="no distillation token"):
        response_loss("token", task, s, t, 0.5)
    with pytest.raises(ValueError, match="--distill-alpha 1.5"):
        response_loss("soft", task, s, t, 1.5)


def relation_by_hand(x, y, R):
    """KL(teacher y's relation || student x's) for one relation, loops over heads / rows."""
    b, L, _ = x.shape

    def rel(z, n, r):
        d = z.shape[-1] // R
        part = z[n, :, r * d:(r + 1) * d]
        return torch.softmax(part @ part.T / math.sqrt(d), -1)
    total = 0.0
    for n in range(b):
        for r in range(R):
            ps, pt = rel(x, n, r), rel(y, n, r)
            for i in range(L):
                total += (pt[i] * (pt[i].log() - ps[i].log())).sum().item()
    return total / (b * L * R)


def test_relation_kl_with_different_head_counts_equals_the_loops():
    # student: 2 heads of 6 (width 12); teacher: 4 heads of 8 (width 32); 4 relation heads
    b, L, R = 2, 5, 4
    student = tuple(g(b, L, 12, seed=10 + i) for i in range(3))
    teacher = tuple(g(b, L, 32, seed=20 + i) for i in range(3))
    got = relation_distillation(student, teacher, R)
    want = sum(relation_by_hand(s, t, R) for s, t in zip(student, teacher)) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)
    # as two TP ranks hold them: each its half of the columns (2 whole relation heads)
    halves = [relation_distillation(tuple(s.chunk(2, -1)[r] for s in student),
                                    tuple(t.chunk(2, -1)[r] for t in teacher), R // 2, R)
              for r in range(2)]
    assert (halves[0] + halves[1]).item() == pytest.approx(got.item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not split into 5 relation heads"):
        relation_distillation(student, teacher, 5)
    with pytest.raises(FeatureAlignmentError, match="the same \\[b, L\\]"):
        relation_distillation(student[:1], (g(b, L + 1, 32),), R)


def test_feature_pairs_through_a_projection_and_aligned_grids():
    L, b, hs, ht = 4, 3, 6, 10
    s = g(L, b, hs, seed=30).float()
    t = g(L, b, ht, seed=31).float()
    proj = torch.nn.Linear(hs, ht)
    ps = proj(s)
    mse = sum(((ps[i, n] - t[i, n]) ** 2).sum().item() for i in range(L) for n in range(b))
    assert feature_distillation(s, t, "mse", proj).item() == pytest.approx(
        mse / (L * b * ht), rel=1e-5)
    cos = sum(1 - (ps[i, n] @ t[i, n] / (ps[i, n].norm() * t[i, n].norm())).item()
              for i in range(L) for n in range(b))
    assert feature_distillation(s, t, "cosine", proj).item() == pytest.approx(
        cos / (L * b), rel=1e-5)
    with pytest.raises(FeatureAlignmentError, match="need a projection"):
        feature_distillation(s, t)
    # a teacher with a class token on a 4x4 grid -> the student's 2x2 grid
    teacher = g(1 + 16, b, ht, seed=32)
    aligned = align_patch_tokens(teacher, (4, 4), (2, 2), teacher_prefix=1)
    grid = teacher[1:].reshape(4, 4, b, ht)
    for i in range(2):
        for j in range(2):
            block = grid[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(0, 1))
            torch.testing.assert_close(aligned[i * 2 + j], block)
    torch.testing.assert_close(align_patch_tokens(teacher, (4, 4), (4, 4), 1), teacher[1:])
    with pytest.raises(FeatureAlignmentError, match="different aspect ratios"):
        align_patch_tokens(teacher, (4, 4), (2, 3), teacher_prefix=1)
    with pytest.raises(FeatureAlignmentError, match="not 0 prefix tokens"):
        align_patch_tokens(teacher, (4, 4), (2, 2))


def test_similarity_distillation_is_open_clips_soft_cross_entropy():
    n, N = 3, 6
    si, ti, st, tt = (g(n, N, seed=40 + k) for k in range(4))

    def ce(s, t):
        return sum(-(torch.softmax(t[i], 0) * torch.log_softmax(s[i], 0)).sum().item()
                   for i in range(n)) / n
    assert similarity_distillation(si, ti, st, tt).item() == pytest.approx(
        0.5 * (ce(si, ti) + ce(st, tt)), rel=1e-5)


def test_two_tower_distillation_scores_embeddings_by_each_models_own_scale():
    """On one rank: the student's [N, N] logits scale * I T^T (and T I^T) against the
    teacher's, built from embeddings of different widths."""
    from megavit.parallel.state import serial_state
    from megavit.tasks.distillation.losses import two_tower_distillation

    N = 5
    image, text = (torch.nn.functional.normalize(g(N, 4, seed=50 + k), dim=-1) for k in (0, 1))
    t_image, t_text = (torch.nn.functional.normalize(g(N, 6, seed=60 + k), dim=-1)
                       for k in (0, 1))
    scale, t_scale = torch.tensor(7.0), torch.tensor(20.0)

    def ce(s, t):
        return sum(-(torch.softmax(t[i], 0) * torch.log_softmax(s[i], 0)).sum().item()
                   for i in range(N)) / N
    expected = 0.5 * (ce(7 * image @ text.T, 20 * t_image @ t_text.T)
                      + ce(7 * text @ image.T, 20 * t_text @ t_image.T))
    got = two_tower_distillation(image, text, scale, t_image, t_text, t_scale,
                                 serial_state().dp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
