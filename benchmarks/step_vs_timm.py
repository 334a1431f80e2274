"""Training-step time of megavit (TP=1) against timm's parallel-block ViT of the same size.

    make bench-timm                                   # creates .venv-timm, runs the default
    .venv-timm/bin/python benchmarks/step_vs_timm.py --preset vit-s --batch-size 8

Both models: the same width / depth / heads / MLP / patch / image, parallel blocks with
QK-LayerNorm and no QKV bias, LayerNorms without bias, MAP pooling, no class token, 1000
classes; fp32 on the CPU; one step = forward + backward + AdamW (torch.optim.AdamW with the
same hyper-parameters for both; megavit uses its default fused kernel, timm is shown with
torch's default AdamW and with fused=True, to separate the optimizer's share). Steps
alternate between the runs so that machine noise hits all alike; the table reports the
median step.

The third row times the plain matmuls of one training step of that architecture (every
projection forward, input-gradient and weight-gradient, and the attention batched matmuls)
as a ceiling on what the model could achieve; FLOP/s use megavit's `estimate_flops`.

Known differences: timm's block has separate biases on the attention-out and MLP-out
projections (megavit: one fused output bias) and runs its two output projections as two
matmuls unless `fuse_out_proj` is set (megavit fuses them).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from megavit.training.peak_flops import cpu_name
from megavit.config import TrainingConfig, preset_model_config
from megavit.models.transformer import Runtime
from megavit.models.vit import build_vit
from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.state import serial_state
from megavit.training.optimizer import MixedPrecisionOptimizer




def build_timm(cfg):
    from timm.layers import LayerNorm
    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

    return VisionTransformer(
        img_size=(cfg.img_h, cfg.img_w), patch_size=cfg.patch_dim, in_chans=cfg.num_channels,
        num_classes=cfg.num_classes, embed_dim=cfg.hidden_size, depth=cfg.num_layers,
        num_heads=cfg.num_attention_heads, mlp_ratio=cfg.ffn_hidden_size / cfg.hidden_size,
        qkv_bias=False, qk_norm=True, block_fn=ParallelScalingBlock, global_pool="map",
        class_token=False, norm_layer=partial(LayerNorm, eps=1e-6, bias=False),
    )


def make_megavit_step(model, hp, images, labels, pstate=None):
    """megavit's own step (one process unless `pstate` says otherwise): gradients into its
    flat buffer, AdamW (--adam-impl of `hp`) through MixedPrecisionOptimizer, which also
    computes the global gradient norm it logs."""
    pstate = pstate or serial_state()
    buffers = DataParallelBuffers(list(model.named_parameters()), pstate.dp, pstate.tp,
                                  torch.float32, 40_000_000)
    optimizer = MixedPrecisionOptimizer(buffers, hp, pstate, master_weights=False)

    def step():
        buffers.start_step(1)
        F.cross_entropy(model(images), labels).backward()
        buffers.finish()
        optimizer.step(hp.lr, 0.0, None)
    return step


def make_step(model, optimizer, images, labels):
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return step


def matmul_shapes(cfg, b: int) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n) of every matmul in one forward pass."""
    h, f, s, nh = cfg.hidden_size, cfg.ffn_hidden_size, cfg.seq_length, cfg.num_attention_heads
    d = h // nh
    patches = cfg.grid[0] * cfg.grid[1]
    shapes = [(1, b * patches, cfg.num_channels * cfg.patch_dim ** 2, h)]
    for _ in range(cfg.num_layers):
        shapes += [(1, b * s, h, 3 * h + f), (b * nh, s, d, s), (b * nh, s, s, d),
                   (1, b * s, h + f, h)]
    # MAP head: probe query, keys/values, 1 x s attention, out, MLP; then the classifier
    shapes += [(1, 1, h, h), (1, b * s, h, 2 * h), (b * nh, 1, d, s), (b * nh, 1, s, d),
               (1, b, h, h), (1, b, h, f), (1, b, f, h), (1, b, h, cfg.num_classes)]
    return shapes


def make_matmul_step(cfg, b: int):
    """Every matmul of a training step as plain (b)mm: forward, and for each the two
    backward products of the same size."""
    ops = []
    for bt, m, k, n in matmul_shapes(cfg, b):
        x, w, dy = torch.randn(bt, m, k), torch.randn(bt, k, n), torch.randn(bt, m, n)
        ops.append((x, w, dy))

    def step():
        for x, w, dy in ops:
            torch.bmm(x, w)
            torch.bmm(dy, w.transpose(1, 2))   # input gradient
            torch.bmm(x.transpose(1, 2), dy)   # weight gradient
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vit-s", help="megavit preset (default vit-s)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--img-size", type=int, default=224, help="square image size (default 224)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model (default 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads for both (default: torch's)")
    args = p.parse_args(argv)
    try:
        import timm
    except ImportError:
        print("timm is not installed here: run `make bench-timm` (it builds .venv-timm)",
              file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset_model_config(args.preset, num_classes=1000, img_h=args.img_size,
                              img_w=args.img_size)
    b = args.batch_size
    images = torch.randn(b, cfg.num_channels, cfg.img_h, cfg.img_w)
    labels = torch.randint(0, cfg.num_classes, (b,))
    hp = TrainingConfig(lr=1e-4, weight_decay=0.05)

    ours = build_vit(cfg, Runtime(serial_state().tp), seed=0)
    theirs = build_timm(cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    def timm_adamw(**impl):
        return torch.optim.AdamW(theirs.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                                 betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps, **impl)

    steps = {
        "megavit": make_megavit_step(ours, hp, images, labels),
        "timm": make_step(theirs, timm_adamw(), images, labels),
        "timm+fusedAdamW": make_step(theirs, timm_adamw(fused=True), images, labels),
        "plain matmuls": make_matmul_step(cfg, b),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    for _ in range(args.steps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    flops = ours.estimate_flops(b, training=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# step_vs_timm: {args.preset} ({cfg.hidden_size}/{cfg.num_layers}/"
          f"{cfg.num_attention_heads}/{cfg.ffn_hidden_size}, patch {cfg.patch_dim}, "
          f"{cfg.img_h}px, {cfg.seq_length} tokens), batch {b}, fp32, fwd+bwd+AdamW")
    print(f"# machine: {cpu_name()}, {args.threads} threads; torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print(f"# command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}")
    print(f"# parameters: megavit {n_ours / 1e6:.2f} M, timm {timm.__version__} "
          f"{n_theirs / 1e6:.2f} M; training FLOPs per step {flops / 1e9:.1f} G")
    print("# optimizers: megavit AdamW --adam-impl fused (its default); timm with "
          "torch.optim.AdamW defaults, and again with fused=True")
    print(f"| {'run':<16} | {'median ms':>9} | {'min ms':>8} | {'images/s':>8} | "
          f"{'GFLOP/s':>8} | {'vs matmuls':>10} |")
    print(f"|{'-' * 18}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for name, t in med.items():
        print(f"| {name:<16} | {t * 1e3:9.1f} | {min(times[name]) * 1e3:8.1f} | {b / t:8.2f} | "
              f"{flops / t / 1e9:8.1f} | {med['plain matmuls'] / t:9.2f}x |")
    ratio = med["megavit"] / med["timm"]
    print(f"\nmegavit / timm step time: {ratio:.3f} (target <= 0.95): "
          f"{'met' if ratio <= 0.95 else 'NOT met'}")
    print(f"megavit / (timm with fused AdamW) step time: "
          f"{med['megavit'] / med['timm+fusedAdamW']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
