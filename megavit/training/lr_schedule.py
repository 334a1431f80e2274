"""Learning-rate schedule: linear warm-up, then cosine / linear / constant decay.

Iteration i (0-based) trains with lr_at(i):
    warm-up (i < W):      lr * (i + 1) / W
    decay   (W <= i < D): min_lr + (lr - min_lr) * c(p),  p = (i - W) / (D - W)
                          c = (1 + cos(pi p)) / 2 (cosine), 1 - p (linear), 1 (constant)
    after   (i >= D):     min_lr (constant: lr)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str  # "cosine", "linear" or "constant"

    def lr_at(self, iteration: int) -> float:
        if iteration < self.warmup_iters:
            return self.lr * (iteration + 1) / self.warmup_iters
        if self.style == "constant":
            return self.lr
        span = max(self.decay_iters - self.warmup_iters, 1)
        p = min((iteration - self.warmup_iters) / span, 1.0)
        c = 0.5 * (1.0 + math.cos(math.pi * p)) if self.style == "cosine" else 1.0 - p
        return self.min_lr + (self.lr - self.min_lr) * c
