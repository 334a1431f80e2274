"""A token embedding whose vocabulary is split over the tensor-parallel group.

Rank r of t holds rows [r * V_p / t, (r + 1) * V_p / t) of the [V_p, h] table, where V_p is
the tokenizer's vocabulary padded up to a multiple of --make-vocab-size-divisible-by (128 by
default, Megatron's default). The padding does not depend on the TP size, so the table has
the same shape in every layout and checkpoints reshard; t must divide V_p. Padding rows are
never looked up (token ids come from the tokenizer, < V) but exist and are trained by
weight decay only. A rank whose rows are all padding still takes part (its output is zeros).

    ids [...] int64 ── this rank's rows, zeros elsewhere ──► all-reduce over TP ──► [..., h]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megavit.parallel.comm import Group
from megavit.parallel.mappings import reduce_from_tp
from megavit.parallel.sharding import TPShard, set_init, set_tp_shard, trunc_normal


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """The vocabulary rounded up to a multiple of `divisible_by`."""
    if vocab_size < 1 or divisible_by < 1:
        raise ValueError(f"vocabulary size {vocab_size} and --make-vocab-size-divisible-by "
                         f"{divisible_by} must be positive")
    return -(-vocab_size // divisible_by) * divisible_by


class VocabParallelEmbedding(nn.Module):
    """ids [...] (int64, < num_embeddings) -> embeddings [..., h], replicated on every TP
    rank. Weight [num_embeddings / t, h], this rank's rows. Collectives: forward all-reduces
    the partial lookups over `group`; backward: none (each rank's rows get their gradient
    from the replicated output gradient)."""

    def __init__(self, num_embeddings: int, width: int, group: Group, init_std: float) -> None:
        super().__init__()
        t = group.size
        if num_embeddings % t:
            raise ValueError(f"tensor-parallel size {t} does not divide the padded vocabulary "
                             f"of {num_embeddings} rows; choose --make-vocab-size-divisible-by "
                             "as a multiple of it")
        self.group = group
        self.rows = num_embeddings // t
        self.start = group.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, width))
        set_tp_shard(self.weight, TPShard(0, (num_embeddings,), t, group.rank))
        set_init(self.weight, trunc_normal(init_std))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(y, self.group)

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.rows} of {self.rows * self.group.size}"
