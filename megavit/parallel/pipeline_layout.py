"""Which blocks each pipeline stage holds.

The model's blocks are cut into P * v consecutive chunks ("virtual stages"); global chunk g
lives on stage g % P as its local chunk g // P, so with v > 1 each stage holds v
non-adjacent pieces and activations go around the stages v times (the interleaved
schedule). Stage p holds `stage_layers[p]` blocks, split evenly over its v chunks. By
default every stage holds L / P blocks; `first` / `last` give the first and last stage
fewer (they also run the input embedding and the head), the middle stages share the rest
evenly. Block names stay global: the blocks of chunk g are `blocks.{start}` and on.

    layout = PipelineLayout(num_layers=48, stages=4)
    layout.chunk_layers(stage=1, chunk=0)    # range(12, 24)
"""

from __future__ import annotations

from dataclasses import dataclass

from megavit.errors import UserError


class PipelineLayoutError(UserError, ValueError):
    """A split of the blocks over the stages that cannot be made; says which flag to change."""


@dataclass(frozen=True)
class PipelineLayout:
    num_layers: int
    stages: int = 1
    chunks: int = 1                # virtual stages per pipeline stage (v)
    first: int | None = None       # blocks on the first stage (default: even split)
    last: int | None = None        # blocks on the last stage

    @classmethod
    def from_flags(cls, num_layers: int, stages: int, layers_per_virtual_stage: int | None,
                   first: int | None, last: int | None) -> "PipelineLayout":
        """Build and check a layout from Megatron's flags; raises PipelineLayoutError."""
        chunks = 1
        if layers_per_virtual_stage is not None:
            if stages < 2:
                raise PipelineLayoutError(
                    "--num-layers-per-virtual-pipeline-stage needs "
                    "--pipeline-model-parallel-size of 2 or more")
            if first is not None or last is not None:
                raise PipelineLayoutError(
                    "--num-layers-per-virtual-pipeline-stage cannot be combined with "
                    "--num-layers-in-first/last-pipeline-stage (every stage must hold the "
                    "same number of virtual stages)")
            per_stage, rem = divmod(num_layers, stages)
            if rem or per_stage % layers_per_virtual_stage:
                raise PipelineLayoutError(
                    f"--num-layers {num_layers} does not split into "
                    f"--pipeline-model-parallel-size {stages} stages of whole virtual stages of "
                    f"--num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage} "
                    f"blocks; the layers per stage ({num_layers / stages:g}) must be a multiple "
                    "of it")
            chunks = per_stage // layers_per_virtual_stage
        layout = cls(num_layers, stages, chunks, first, last)
        layout.stage_layers()   # raises if impossible
        return layout

    def stage_layers(self) -> list[int]:
        """Blocks held by each stage."""
        L, P = self.num_layers, self.stages
        if P < 1:
            raise PipelineLayoutError("--pipeline-model-parallel-size must be at least 1")
        if P == 1:
            if self.first is not None or self.last is not None:
                raise PipelineLayoutError("--num-layers-in-first/last-pipeline-stage need "
                                          "--pipeline-model-parallel-size of 2 or more")
            return [L]
        fixed = {0: self.first, P - 1: self.last}
        for flag, n in (("first", self.first), ("last", self.last)):
            if n is not None and n < 1:
                raise PipelineLayoutError(f"--num-layers-in-{flag}-pipeline-stage must be at "
                                          f"least 1 (got {n})")
        middle = [p for p in range(P) if fixed.get(p) is None]
        rest = L - sum(n for n in fixed.values() if n is not None)
        if not middle:
            if rest != 0:
                raise PipelineLayoutError(
                    f"--num-layers-in-first-pipeline-stage {self.first} + "
                    f"--num-layers-in-last-pipeline-stage {self.last} must equal --num-layers "
                    f"{L} with 2 stages")
            return [self.first, self.last]
        if rest < len(middle) or rest % len(middle):
            what = "the layers left for the other stages" if len(middle) < P else "--num-layers"
            raise PipelineLayoutError(
                f"{what} ({rest}) do not split evenly over {len(middle)} pipeline stages "
                f"(--num-layers {L}, --pipeline-model-parallel-size {P}); change --num-layers "
                "or set --num-layers-in-first/last-pipeline-stage")
        counts = [fixed.get(p) or rest // len(middle) for p in range(P)]
        for p, n in enumerate(counts):
            if n % self.chunks:
                raise PipelineLayoutError(f"stage {p}'s {n} blocks do not split into "
                                          f"{self.chunks} virtual stages")
        return counts

    @property
    def total_chunks(self) -> int:
        return self.stages * self.chunks

    def global_chunk(self, stage: int, chunk: int) -> int:
        """The position of (stage, local chunk) in the model's order of chunks."""
        return chunk * self.stages + stage

    def chunk_layers(self, stage: int, chunk: int) -> range:
        """The global indices of the blocks of one chunk of one stage."""
        counts = self.stage_layers()
        start, target = 0, self.global_chunk(stage, chunk)
        for g in range(target):
            start += counts[g % self.stages] // self.chunks
        return range(start, start + counts[stage] // self.chunks)

    def is_first(self, stage: int, chunk: int) -> bool:
        """This chunk embeds the inputs (the model's first chunk)."""
        return self.global_chunk(stage, chunk) == 0

    def is_last(self, stage: int, chunk: int) -> bool:
        """This chunk runs the head and the loss (the model's last chunk)."""
        return self.global_chunk(stage, chunk) == self.total_chunks - 1
