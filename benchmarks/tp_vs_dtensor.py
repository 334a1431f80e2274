"""Tensor parallelism: megavit's layers against PyTorch's DTensor tensor-parallel API.

    .venv/bin/python -m benchmarks.tp_vs_dtensor                     # ViT-S-sized, 4 blocks
    .venv/bin/python -m benchmarks.tp_vs_dtensor --layers 2 --steps 3

The same ViT — parallel (ViT-22B) blocks with LayerNorms without bias, MLP biases, GAP
pooling, fp32, [s, b, h] activations — at TP=2 with sequence parallelism on 2 gloo processes
with one thread each, as megavit's model and as a plain PyTorch model parallelized with
`parallelize_module` in two plans, "simple" (local tensors between modules, the plan one
writes first) and "tuned" (DTensors from the norm to the projections, fewer collectives):

    norm            SequenceParallel(sequence_dim=0)            (DTensor out)
    proj_in         PrepareModuleInput(Shard(0) -> Replicate): one all-gather per block,
                    and one reduce-scatter of the four projections' input gradients
    proj_in.q/k/v/fc1  ColwiseParallel()
    attn_out, mlp_out  RowwiseParallel(output_layouts=Shard(0))
    blocks.0 input  Replicate -> Shard(0);   final norm input  Shard(0) -> Replicate

(QK-LayerNorm is left out of both models: DTensor has no plan for a norm shared by heads
that are split over ranks.) One step is forward + backward + AdamW (the same optimizer
kernel for both; megavit's step also computes the global gradient norm, which it logs),
timed alternately, median of the timed steps. Collectives are counted per
step — megavit's through its own counting layer, DTensor's from the functional collectives
it dispatches — and reported both as collective sizes (megavit's against the theory of
docs/tensor_parallelism.md) and as bytes each rank sends in a ring (all-reduce counts
twice), the comparable figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from megavit.config import preset_model_config
from megavit.models.transformer import Runtime
from megavit.models.vit import build_vit
from benchmarks.step_vs_timm import make_megavit_step
from megavit.config import TrainingConfig


class RefProjIn(nn.Module):
    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(h, h, bias=False) for _ in range(3))
        self.fc1 = nn.Linear(h, f)

    def forward(self, y):
        return self.q(y), self.k(y), self.v(y), self.fc1(y)


class RefBlock(nn.Module):
    """The ViT-22B parallel block written for DTensor plans (separate projections)."""

    def __init__(self, h: int, f: int, heads: int) -> None:
        super().__init__()
        self.head_dim = h // heads
        self.norm = nn.LayerNorm(h, eps=1e-6, bias=False)
        self.proj_in = RefProjIn(h, f)
        self.attn_out = nn.Linear(h, h, bias=False)
        self.mlp_out = nn.Linear(f, h)

    def forward(self, x):                      # x: this rank's [s/t, b, h]
        q, k, v, u = self.proj_in(self.norm(x))  # [s, b, h/t] (this rank's heads), [s, b, f/t]
        s, b, _ = q.shape
        heads = [t.view(s, b, -1, self.head_dim).permute(1, 2, 0, 3) for t in (q, k, v)]
        a = F.scaled_dot_product_attention(*heads).permute(2, 0, 1, 3).reshape(s, b, -1)
        return x + self.attn_out(a) + self.mlp_out(F.gelu(u))


class RefViT(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        h, p = cfg.hidden_size, cfg.patch_dim
        self.patch = p
        self.patch_embed = nn.Linear(cfg.num_channels * p * p, h)
        self.pos_embed = nn.Parameter(torch.randn(cfg.grid[0] * cfg.grid[1], 1, h) * 0.02)
        self.blocks = nn.ModuleList(RefBlock(h, cfg.ffn_hidden_size, cfg.num_attention_heads)
                                    for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(h, eps=1e-6, bias=False)
        self.head = nn.Linear(h, cfg.num_classes)

    def forward(self, images):
        b, c, H, W = images.shape
        p = self.patch
        x = images.reshape(b, c, H // p, p, W // p, p).permute(2, 4, 0, 1, 3, 5)
        x = self.patch_embed(x.reshape((H // p) * (W // p), b, c * p * p)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x).mean(0))


def parallelize_reference(model: RefViT, mesh, tuned: bool = True) -> RefViT:
    """`tuned`: keep DTensors between the norm and the projections, so the four input
    gradients add up as one Partial tensor and are reduce-scattered once. Otherwise (the
    plan one writes first, with local tensors between modules) each ColwiseParallel
    all-reduces its own input gradient."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    plan = {"blocks.0": PrepareModuleInput(input_layouts=(Replicate(),),
                                           desired_input_layouts=(Shard(0),),
                                           use_local_output=True),
            "final_norm": PrepareModuleInput(input_layouts=(Shard(0),),
                                             desired_input_layouts=(Replicate(),),
                                             use_local_output=True)}
    for i in range(len(model.blocks)):
        plan.update({
            # DTensors (not local tensors) between the norm and the four projections: their
            # input gradients then add up as one Partial tensor, reduce-scattered once.
            f"blocks.{i}.norm": SequenceParallel(sequence_dim=0, use_local_output=not tuned),
            f"blocks.{i}.proj_in": PrepareModuleInput(input_layouts=(Shard(0),),
                                                      desired_input_layouts=(Replicate(),),
                                                      use_local_output=not tuned),
            **{f"blocks.{i}.proj_in.{n}": ColwiseParallel() for n in ("q", "k", "v", "fc1")},
            f"blocks.{i}.attn_out": RowwiseParallel(output_layouts=Shard(0)),
            f"blocks.{i}.mlp_out": RowwiseParallel(output_layouts=Shard(0)),
        })
    return parallelize_module(model, mesh, plan)


_COLLECTIVES = {"all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_reduce_",
                "all_to_all_single", "broadcast", "broadcast_"}


class FunctionalCollectiveBytes(TorchDispatchMode):
    """Counts the functional collectives DTensor issues, including those it issues while
    dispatching an operator (returning NotImplemented for DTensor arguments lets DTensor
    desugar first, as torch's CommDebugMode does). Sizes follow megavit's counter: the
    gathered size for all-gather, the input for reduce-scatter and all-reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name in _COLLECTIVES:
            t = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
            n = t.numel() * t.element_size() * (args[1] if "all_gather" in name else 1)
            key = name.replace("_into_tensor", "").replace("_tensor", "").rstrip("_")
            self.calls[key] = self.calls.get(key, 0) + 1
            self.bytes[key] = self.bytes.get(key, 0) + n
        return func(*args, **(kwargs or {}))


def ring_bytes_sent(bytes_by_op: dict[str, int], t: int) -> float:
    """Bytes each rank sends for these collectives in a ring: (t-1)/t of the full size for
    all-gather and reduce-scatter, twice that for all-reduce."""
    factor = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}
    return sum(factor[op.split(".")[-1]] * n * (t - 1) / t for op, n in bytes_by_op.items())


def theory_bytes(cfg, b: int) -> int:
    """megavit's bytes per step, GAP pooling, SP at TP=2 (docs/tensor_parallelism.md): per
    block an all-gather and a reduce-scatter of s*b*h each way; the embedding's scatter
    gathers its gradient and the head gathers its input; per step one all-reduce of the
    partial gradients (each block's LayerNorm weight and out_proj bias) and one of the
    squared gradient norm."""
    s, h, layers = cfg.seq_length, cfg.hidden_size, cfg.num_layers
    return (4 * layers + 2) * s * b * h * 4 + 2 * layers * h * 4 + 8


def run(pstate, args) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    cfg = preset_model_config("vit-s", num_layers=args.layers, num_classes=100,
                              qk_layernorm=False, pooling="gap", img_h=args.img, img_w=args.img)
    hp = TrainingConfig(lr=1e-4, adam_impl=args.adam)
    ours = build_vit(cfg, Runtime(pstate.tp, sequence_parallel="keep"), seed=0)
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (pstate.tp.size,))
    kernel = {"fused": True} if args.adam == "fused" else {"foreach": args.adam == "foreach"}

    def reference(tuned: bool):
        ref = parallelize_reference(RefViT(cfg), mesh, tuned)
        # DTensor's foreach/fused kernels take DTensors only: one AdamW for the sharded
        # and replicated DTensor parameters, one for the plain ones (embedding, head).
        opts = [torch.optim.AdamW(group, lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2),
                                  eps=hp.adam_eps, weight_decay=hp.weight_decay, **kernel)
                for group in ([q for q in ref.parameters() if isinstance(q, DTensor)],
                              [q for q in ref.parameters() if not isinstance(q, DTensor)])]
        return ref, opts
    images = torch.randn(args.batch, 3, args.img, args.img, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(args.batch) % 100

    # megavit's step: its gradient buffer and optimizer (with the norm)
    step_ours = make_megavit_step(ours, hp, images, labels, pstate)

    def step_ref(ref, opts):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(images), labels).backward()
        for opt in opts:
            opt.step()

    steps = {"megavit": step_ours}
    for plan in ("dtensor-simple", "dtensor-tuned"):
        ref, opts = reference(tuned=plan.endswith("tuned"))
        steps[plan] = lambda ref=ref, opts=opts: step_ref(ref, opts)
    pstate.stats.reset()
    step_ours()
    counted = {"megavit": ({f"tp.{op}": n for (_, op), n in pstate.stats.bytes.items()},
                           {f"tp.{op}": n for (_, op), n in pstate.stats.calls.items()})}
    for name in ("dtensor-simple", "dtensor-tuned"):
        counter = FunctionalCollectiveBytes()
        with counter:
            steps[name]()
        counted[name] = (counter.bytes, counter.calls)
    times = {name: [] for name in steps}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    for _ in range(args.steps):
        for name, fn in steps.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"times": times, "counted": counted, "theory": theory_bytes(cfg, args.batch),
            "cfg": cfg.__dict__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--img", type=int, default=224, help="image size (default 224: 196 tokens)")
    p.add_argument("--steps", type=int, default=5, help="timed steps each (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps each (default 2)")
    p.add_argument("--adam", default="foreach", choices=("fused", "foreach", "loop"),
                   help="AdamW kernel for both (default foreach)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    from tests.harness import run_distributed

    res = run_distributed(2, 2, {"r": (run, (args,))}, timeout=1800)["r"][0]
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    c = res["cfg"]
    print(f"# tp_vs_dtensor: TP=2 + sequence parallelism, 2 gloo processes x 1 thread, fp32; "
          f"{c['num_layers']} parallel blocks {c['hidden_size']}/{c['num_attention_heads']}/"
          f"{c['ffn_hidden_size']}, {(c['img_h'] // c['patch_dim']) ** 2} tokens, batch "
          f"{args.batch}; step = fwd + bwd + AdamW ({args.adam})")
    print(f"# machine: {platform.processor() or platform.machine()}; torch {torch.__version__}; "
          f"command: python -m benchmarks.tp_vs_dtensor {' '.join(argv or sys.argv[1:])}")
    print(f"| {'run':<14} | median step ms | min ms | MB collective size | MB sent per rank "
          f"(ring) | collectives per step |")
    print(f"|{'-' * 16}|----------------|--------|--------------------|------------------------|"
          f"----------------------|")
    sent = {}
    for name, (by_op, calls) in res["counted"].items():
        sent[name] = ring_bytes_sent(by_op, 2)
        desc = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sorted(calls.items()))
        print(f"| {name:<14} | {med[name] * 1e3:14.1f} | {min(res['times'][name]) * 1e3:6.1f} | "
              f"{sum(by_op.values()) / 1e6:18.2f} | {sent[name] / 1e6:22.2f} | {desc} |")
    ours_total = sum(res["counted"]["megavit"][0].values())
    print()
    for plan in ("dtensor-simple", "dtensor-tuned"):
        ratio = med["megavit"] / med[plan]
        print(f"megavit / {plan} step time: {ratio:.3f} (target <= 0.8): "
              f"{'met' if ratio <= 0.8 else 'NOT met'}; {plan} / megavit bytes sent: "
              f"{sent[plan] / sent['megavit']:.2f}")
    print(f"megavit collective bytes per step: {ours_total} measured, {res['theory']} theory: "
          f"{'equal' if ours_total == res['theory'] else 'DIFFERENT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
