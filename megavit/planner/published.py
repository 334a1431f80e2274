"""Published training runs the step-time model is fitted on and checked against.

Each row: a GPT (hidden, layers, heads, sequence, vocabulary), its layout and batch, and the
achieved TFLOP/s per GPU the authors report. The measured step time follows from their own
FLOP count: step = FLOPs / (TFLOP/s x GPUs).

    NARAYANAN_2021_A100   Narayanan et al. 2021 ("Efficient large-scale language model
                          training on GPU clusters using Megatron-LM"), Table 1: A100 80GB,
                          s 2048, V 51,200, full recomputation, weak scaling 1.7 B - 1 T;
                          TFLOP/s counted with their eq. 3 (the recomputation included)
    MEGATRON_2024_H100    Megatron-LM's README table (2024): H100 80GB, s 4096, V 131,072,
                          model FLOPs (no recomputation counted), DP 48 throughout

What the tables do not say is assumed, the same for every row of a table (micro-batch 1, no
virtual stages; for the H100 runs sequence parallelism and the distributed optimizer); the
README states that the H100 runs overlap DP (--overlap-grad-reduce
--overlap-param-gather), TP (--tp-comm-overlap) and PP communication with computation, so
those rows model the overlaps. docs/planner.md lists these assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass

from megavit.planner.step_time import PlanLayout, TransformerShape, gpt_shape, model_flops


@dataclass(frozen=True)
class PublishedRun:
    table: str
    name: str
    gpu: str
    shape: TransformerShape
    layout: PlanLayout
    tflops_per_gpu: float
    recompute_counted: bool       # whether the reported FLOPs include the recomputation

    @property
    def measured_step_s(self) -> float:
        flops = model_flops(self.shape, self.layout.global_batch,
                            "full" if self.recompute_counted else "none")
        return flops / (self.tflops_per_gpu * 1e12 * self.layout.gpus)


def _narayanan() -> list[PublishedRun]:
    rows = [  # name, hidden, layers, heads, tp, pp, gpus, batch, TFLOP/s per GPU
        ("1.7B", 2304, 24, 24, 1, 1, 32, 512, 137),
        ("3.6B", 3072, 30, 32, 2, 1, 64, 512, 138),
        ("7.5B", 4096, 36, 32, 4, 1, 128, 512, 142),
        ("18.4B", 6144, 40, 48, 8, 1, 256, 1024, 135),
        ("39.1B", 8192, 48, 64, 8, 2, 512, 1536, 138),
        ("76.1B", 10240, 60, 80, 8, 4, 1024, 1792, 140),
        ("145.6B", 12288, 80, 96, 8, 8, 1536, 2304, 148),
        ("310.1B", 16384, 96, 128, 8, 16, 1920, 2160, 155),
        ("529.6B", 20480, 105, 128, 8, 35, 2520, 2520, 163),
        ("1008B", 25600, 128, 160, 8, 64, 3072, 3072, 163),
    ]
    out = []
    for name, h, layers, heads, tp, pp, gpus, batch, tflops in rows:
        layout = PlanLayout(tp=tp, pp=pp, dp=gpus // (tp * pp), recompute="full",
                            micro_batch=1, global_batch=batch)
        out.append(PublishedRun("narayanan-2021-a100", name, "a100-80gb",
                                gpt_shape(layers, h, heads, 2048, 51200), layout, tflops, True))
    return out


def _megatron_h100() -> list[PublishedRun]:
    rows = [  # name, heads, hidden, layers, tp, pp, gpus, batch, TFLOP/s per GPU
        ("1.7B", 16, 2048, 24, 1, 1, 48, 192, 408.8),
        ("7.1B", 32, 4096, 30, 2, 1, 96, 192, 465.9),
        ("16B", 48, 6144, 32, 4, 1, 192, 192, 489.1),
        ("32B", 56, 7168, 48, 8, 1, 384, 192, 459.6),
        ("70B", 64, 8192, 84, 8, 2, 768, 384, 419.7),
        ("119B", 80, 10240, 92, 8, 4, 1536, 768, 420.5),
        ("177B", 96, 12288, 96, 8, 6, 2304, 1152, 432.8),
        ("314B", 128, 16384, 96, 8, 8, 3072, 1536, 474.4),
        ("462B", 144, 18432, 112, 8, 16, 6144, 3072, 459.9),
    ]
    out = []
    for name, heads, h, layers, tp, pp, gpus, batch, tflops in rows:
        layout = PlanLayout(tp=tp, pp=pp, dp=gpus // (tp * pp), micro_batch=1,
                            global_batch=batch, sequence_parallel=tp > 1,
                            distributed_optimizer=True, overlap_tp_comm=True,
                            overlap_param_gather=True)
        out.append(PublishedRun("megatron-2024-h100", name, "h100-sxm",
                                gpt_shape(layers, h, heads, 4096, 131072), layout, tflops,
                                False))
    return out


NARAYANAN_2021_A100 = _narayanan()
MEGATRON_2024_H100 = _megatron_h100()
TABLES = {"narayanan-2021-a100": NARAYANAN_2021_A100, "megatron-2024-h100": MEGATRON_2024_H100}
