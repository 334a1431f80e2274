"""A student ViT classifier for feature distillation: the blocks of --distill-feature-pairs
are its --feature-layers (under pipeline parallelism their outputs travel to the last stage
with the hidden states, as for a dense head), and its last part projects each one to its
teacher block's width; with --distill-pooled-weight its pooled features (what the
classifier reads) are projected to the teacher's width too.

    output in training   [b, C (+ C: the distillation token's head) (+ w_p) +
                         sum_i w_i H_i W_i]: the logits, then the pooled features [b, h]
                         through their projection (h -> w_p), then each paired block's
                         patch map [b, H_i, W_i, h] through its projection (h -> w_i, the
                         teacher's width), flattened
    output in eval       the logits [b, C] (what evaluation, predict and exports read)

The projections (`feature_projections.i`, `pooled_projection`, a bias each) are replicated
over TP on the last stage, like the classifier: they read the gathered tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from megavit.config import ModelConfig
from megavit.models.transformer import Runtime
from megavit.models.vit import StageModel, VisionTransformer
from megavit.parallel.sharding import constant, initialize_parameters, lecun_normal, set_init


class DistilledStudent(VisionTransformer):
    """`VisionTransformer` whose last part also returns its feature layers' maps projected
    to `teacher_widths` (one per --feature-layers block, in block order)."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, teacher_widths: Sequence[int],
                 layers: range | None = None, pre_process: bool = True,
                 post_process: bool = True, pooled_width: int = 0) -> None:
        super().__init__(cfg, rt, layers, pre_process, post_process)
        self.feature_blocks = cfg.feature_layer_list()
        if len(teacher_widths) != len(self.feature_blocks):
            raise ValueError(f"{len(teacher_widths)} teacher widths for the feature layers "
                             f"{self.feature_blocks}")
        if post_process:
            self.feature_projections = nn.ModuleList(
                nn.Linear(cfg.hidden_size, w) for w in teacher_widths)
            self.pooled_projection = (nn.Linear(cfg.hidden_size, pooled_width)
                                      if pooled_width else None)
            for proj in [*self.feature_projections, self.pooled_projection]:
                if proj is not None:
                    set_init(proj.weight, lecun_normal())
                    set_init(proj.bias, constant(0.0))

    def output(self, x: torch.Tensor, apply_head: bool = True,
               features: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        pooled = self.pool(x)
        if self.head is None or not apply_head:
            return pooled
        logits = self.classify(x, pooled)
        if not self.training:
            return logits
        out = [logits]
        if self.pooled_projection is not None:
            out.append(self.pooled_projection(pooled))
        out += [proj(self.token_map(f, layer).permute(0, 2, 3, 1)).flatten(1)
                for f, layer, proj in zip(features, self.feature_blocks,
                                          self.feature_projections)]
        return torch.cat(out, dim=1) if len(out) > 1 else logits


def build_distilled_stage(cfg: ModelConfig, rt: Runtime, seed: int, layout, stage: int,
                          teacher_widths: Sequence[int], device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32, pooled_width: int = 0
                          ) -> StageModel:
    """This pipeline stage's chunks of a DistilledStudent, initialised as the serial model
    would be (weights from (seed, parameter name))."""
    chunks = []
    for c in range(layout.chunks):
        with torch.device("meta"):
            chunk = DistilledStudent(cfg, rt, teacher_widths, layout.chunk_layers(stage, c),
                                     layout.is_first(stage, c), layout.is_last(stage, c),
                                     pooled_width)
        initialize_parameters(chunk, seed, device=device)
        chunks.append(chunk if dtype == torch.float32 else chunk.to(dtype))
    return StageModel(chunks)
