"""Megatron-style parallelism for any transformer: nothing here knows images or text.

    state.py           ParallelState: the (pp, dp, tp) device mesh and this rank's groups
    comm.py            Group: every collective, counted per group; CollectiveError
    launcher.py        torchrun / mpirun / srun environments -> the process group
    tp_linear.py       the fused column / row matmuls with their TP communication
    layers.py          ColumnParallelLinear, RowParallelLinear, make_norm, attention
    mappings.py        the conjugate collectives of TP and SP as autograd functions
    vocab_embedding.py an embedding table split over TP by rows
    random.py          RNG streams (dropout per TP rank) and counter-based draws
    recompute.py       activation recomputation that restores the RNG streams
    sharding.py        init from (seed, name, element) and the TP shard of each parameter
    partial_grad.py    parameters whose gradient is summed over TP after backward
    data_parallel.py   contiguous gradient buckets reduced (or reduce-scattered) over DP
    pipeline_layout.py which blocks each pipeline stage (and virtual chunk) holds
    schedules.py       1F1B, interleaved and forward-only schedules; the bubble
    pipeline_executor.py one stage's schedule: forward, backward and batched p2p
    memory.py          meters of saved and live tensor bytes

The names most code needs are importable from here:

    from megavit.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear
"""

from megavit.parallel.comm import CollectiveError, CommStats, Group
from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.layers import (ColumnParallelLinear, RowParallelLinear, make_norm,
                                     multi_head_attention)
from megavit.parallel.mappings import (copy_to_tp, gather_from_sequence_parallel,
                                       gather_from_tp, reduce_from_tp,
                                       reduce_scatter_to_sequence_parallel,
                                       scatter_to_sequence_parallel, scatter_to_tp)
from megavit.parallel.pipeline_executor import PipelineExecutor, StepStats
from megavit.parallel.pipeline_layout import PipelineLayout, PipelineLayoutError
from megavit.parallel.random import MODEL_PARALLEL, RNGTracker
from megavit.parallel.recompute import recompute
from megavit.parallel.schedules import ScheduleError, build_schedule
from megavit.parallel.sharding import full_state, initialize_parameters
from megavit.parallel.state import ParallelState, build_parallel_state, serial_state
from megavit.parallel.tp_linear import SequenceParallelMode
from megavit.parallel.vocab_embedding import VocabParallelEmbedding

__all__ = [
    "CollectiveError", "ColumnParallelLinear", "CommStats", "DataParallelBuffers", "Group",
    "MODEL_PARALLEL", "ParallelState", "PipelineExecutor", "PipelineLayout",
    "PipelineLayoutError", "RNGTracker", "RowParallelLinear", "ScheduleError",
    "SequenceParallelMode", "StepStats", "VocabParallelEmbedding", "build_parallel_state",
    "build_schedule", "copy_to_tp", "full_state", "gather_from_sequence_parallel",
    "gather_from_tp", "initialize_parameters", "make_norm", "multi_head_attention",
    "recompute", "reduce_from_tp", "reduce_scatter_to_sequence_parallel",
    "scatter_to_sequence_parallel", "scatter_to_tp", "serial_state",
]
