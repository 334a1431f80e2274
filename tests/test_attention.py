"""Attention per block (issue 18): window attention (ViTDet, Swin-shifted),
local-global, linear (kernel) and full attention, chosen per block.

- The rule: window attention equals softmax attention under the plainly written mask
  (same window, or either token a prefix token), partial windows included; with the window
  as large as the grid it equals full attention, also as a whole model.
- Linear attention equals its O(s^2) form.
- Invariant: models mixing the types per block equal the serial run at TP=2, TP=2+SP (25
  tokens, padded) with selective recomputation, and PP=2 with full recomputation — window /
  linear / full blocks with MAP pooling over a 5x5 grid in 2x2 windows, and window blocks
  with a global one and a class token (classic blocks).
- Positions: rope-2d (on window and full blocks) and learned-2d (with a class token) keep
  the invariant, as does training on mnist-canvas (49 tokens); a model trained at 16x16 px runs at 24x24 (learned-2d tables resized per
  axis, the identity at the same grid; rope-2d has nothing to resize).
- Window, local-global and linear cores keep only q, k, v and run again in backward, with
  the same attention-dropout masks: the same output and gradients as kept cores.
- Flags: impossible combinations are refused naming the flags; exports refuse the model.
(The activation formula's rows per attention type: tests/test_activation_memory.py;
`--recompute-granularity auto` with every type: tests/test_pipeline_memory.py.)
"""

from __future__ import annotations

import dataclasses
import re
import functools

import pytest
import torch
import torch.nn.functional as F

from megavit.config import ConfigError, validate
from megavit.models.attention import TokenLayout, window_attention
from megavit.parallel.state import serial_state
from megavit.tasks.classification import classification_run
from tests.harness import run_distributed
from tests.scenarios import debug_config, merge_stages, train_steps
from tests.test_tensor_parallel import assert_tensors_close, assert_two_steps_match

RTOL = 1e-5
SP_SELECTIVE = {"sequence_parallel": True, "recompute_granularity": "selective"}
PP2_FULL = {"pipeline_model_parallel_size": 2, "recompute_granularity": "full",
            "recompute_method": "uniform", "recompute_num_layers": 1}
LAYOUTS = {"tp2": (2, 2, 1, [{}, SP_SELECTIVE]), "pp2": (2, 1, 2, [PP2_FULL])}
# model: (debug_config variant, window side, attention flags for `layers` blocks);
# map: vit22b blocks, 5x5 grid + 2 registers (27 tokens: odd, padded under SP), MAP pooling,
# blocks local-global / linear / window / full;
# cls: classic blocks with a class token and 2 registers (4x4 grid + 3), shifted windows
MODELS = {
    # (two registers: dropped before the MAP pooling, global in the window blocks)
    "map": ("vit22b", 2, lambda layers: dict(
        attention_type_per_layer="local-global,linear,window,full", num_registers=2)),
    # Swin-shifted windows (every second block) over a padded grid with a class token and
    # two registers after it
    "cls": ("classic", 3, lambda layers: dict(attention_type="window", window_shift=True,
                                              num_registers=2)),
    # rope-2d on window blocks and a global one (25 tokens, MAP); learned-2d with a class token
    "rope": ("vit22b", 3, lambda layers: dict(attention_type="window",
                                               global_attention_layers="1",
                                               position_embedding_type="rope-2d")),
    "l2d": ("classic", None, lambda layers: dict(position_embedding_type="learned-2d")),
    # the mnist-canvas data at 28x28 px (7x7 patches, 49 tokens): windows + a global block
    "canvas": ("vit22b", 3, lambda layers: dict(attention_type="window", img_h=28, img_w=28,
                                                 global_attention_layers=str(layers - 1))),
}


def window_config(model: str, tp: int = 1, parallel: dict | None = None,
                  layers: int | None = None):
    variant, w, flags = MODELS[model]
    if layers is None:
        layers = 4 if parallel and parallel.get("pipeline_model_parallel_size") else 2
    cfg = debug_config(variant, tp=tp, parallel=parallel, layers=layers,
                       model=dict(window_size=w, **flags(layers)))
    if model == "canvas":
        cfg.data = dataclasses.replace(cfg.data, dataset="mnist-canvas", augment="none")
    return cfg


def resized_run(kind: str, root, img: int):
    """A classic model with `kind` positions at img x img px fine-tuned from the 16x16 px
    checkpoint in `root` (written when missing): the run and its loading log lines."""
    from megavit.checkpointing.checkpointer import resume, save_checkpoint

    def config(size: int):
        return debug_config("classic", layers=2, model=dict(position_embedding_type=kind,
                                                            img_h=size, img_w=size))
    if not (root / kind).exists():
        save_checkpoint(classification_run(config(16), serial_state()), str(root / kind), 2,
                        0, lambda line: None)
    run, lines = classification_run(config(img), serial_state()), []
    resume(run, None, lines.append, pretrained=str(root / kind))
    return run, lines


@functools.lru_cache(maxsize=None)
def serial(model: str, layers: int):
    return train_steps(serial_state(), window_config(model, layers=layers))


def attention_maps(pstate, cfg) -> dict:
    """The recorded attention maps (every head, every block) and the MAP probe's of a
    forward pass over two fixed images, through the pipeline schedule (megavit.interpret)."""
    from megavit.data.sampler import MicroBatch
    from megavit.interpret.recording import record_attention
    from megavit.training.step import run_micro_batches

    run = classification_run(cfg, pstate)
    run.model.eval()
    m = cfg.model
    images = torch.randn(2, m.num_channels, m.img_h, m.img_w,
                         generator=torch.Generator().manual_seed(5))
    batch = [MicroBatch(images if run.is_first_stage else None, torch.zeros(2, dtype=torch.long),
                        torch.arange(2))]
    with torch.no_grad(), record_attention(run.model) as rec:
        run_micro_batches(run.model, run.executor, batch, pstate,
                          lambda mb, logits, labels: logits.new_zeros(()), forward_only=True)
    return {"maps": rec.maps(pstate.tp, pstate.pp), "probe": rec.probe(pstate.tp, pstate.pp)}


@functools.lru_cache(maxsize=None)
def serial_maps(layers: int) -> dict:
    return attention_maps(serial_state(), window_config("map", layers=layers))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    world, tp, pp, variants = LAYOUTS[request.param]
    jobs = {f"{model}{i}": (train_steps, (window_config(model, tp, parallel),))
            for model in MODELS for i, parallel in enumerate(variants)}
    jobs.update({f"maps{i}": (attention_maps, (window_config("map", tp, parallel),))
                 for i, parallel in enumerate(variants)})
    return request.param, run_distributed(world, tp, jobs, pp=pp)


def test_attention_maps_at_every_layout_equal_the_serial_maps(layout):
    """Local-global, linear, window and full blocks with MAP pooling: each rank ends with
    every block's map of every head (gathered over TP, shared over PP) and the probe's,
    equal to the serial maps."""
    name, results = layout
    world, tp, pp, variants = LAYOUTS[name]
    for i, parallel in enumerate(variants):
        ref = serial_maps(window_config("map", tp, parallel).model.num_layers)
        for rank, got in enumerate(results[f"maps{i}"]):
            assert sorted(got["maps"]) == sorted(ref["maps"]), (name, rank)
            for layer, want in ref["maps"].items():
                torch.testing.assert_close(got["maps"][layer], want, rtol=RTOL, atol=1e-6)
            torch.testing.assert_close(got["probe"], ref["probe"], rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("model", list(MODELS))
def test_window_model_trains_as_the_serial_run(layout, model):
    name, results = layout
    world, tp, pp, variants = LAYOUTS[name]
    for i, parallel in enumerate(variants):
        cfg = window_config(model, tp, parallel)
        ref = serial(model, cfg.model.num_layers)
        column = world // pp
        for c in range(column):
            got = merge_stages(results[f"{model}{i}"], [k * column + c for k in range(pp)])
            assert_two_steps_match(got, ref, window_config(model), f"{name}[{i}] {model}",
                                   RTOL)


@pytest.mark.parametrize("prefix,grid,w", [(0, (5, 5), 2), (1, (4, 6), 4), (1, (5, 3), 2),
                                           (0, (3, 7), 3)])
def test_window_attention_is_the_masked_softmax_it_describes(prefix, grid, w):
    g = torch.Generator().manual_seed(0)
    b, n, d = 2, 3, 4
    length = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(b, n, length + 3, d, generator=g) for _ in range(3))  # + padding
    got = window_attention(q, k, v, TokenLayout(prefix, grid), w)
    gh, gw = grid
    cell = torch.arange(gh * gw)
    window = torch.full((length,), -1)
    window[prefix:] = (cell // gw // w) * 1000 + (cell % gw) // w
    allowed = window[:, None] == window[None, :]
    allowed[:prefix, :] = True      # a prefix token sees everything ...
    allowed[:, :prefix] = True      # ... and is seen by everything
    ref = F.scaled_dot_product_attention(q[:, :, :length], k[:, :, :length],
                                         v[:, :, :length], attn_mask=allowed)
    torch.testing.assert_close(got[:, :, :length], ref)
    assert torch.equal(got[:, :, length:], torch.zeros_like(got[:, :, length:]))
    whole = window_attention(q, k, v, TokenLayout(prefix, grid), max(grid))
    full = F.scaled_dot_product_attention(q[:, :, :length], k[:, :, :length], v[:, :, :length])
    torch.testing.assert_close(whole[:, :, :length], full)


@pytest.mark.parametrize("prefix,grid,w", [(0, (6, 6), 3), (1, (5, 7), 3), (0, (4, 4), 2)])
def test_shifted_windows_are_the_masked_softmax_written_plainly(prefix, grid, w):
    """Roll the padded grid by s = w // 2 up and left, cut windows, keep pairs of the same
    band on each axis: written here per token pair, without rolling anything."""
    g = torch.Generator().manual_seed(3)
    b, n, d = 2, 2, 4
    length = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(b, n, length + 1, d, generator=g) for _ in range(3))
    s = w // 2
    got = window_attention(q, k, v, TokenLayout(prefix, grid), w, shift=s)
    gh, gw = grid
    Gh, Gw = -(-gh // w) * w, -(-gw // w) * w
    rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
    r, c = (rows - s) % Gh, (cols - s) % Gw                 # where the roll puts each token
    band = lambda x, size: (x >= size - w).long() + (x >= size - s).long()  # noqa: E731
    key = torch.full((length, 4), -1)
    key[prefix:] = torch.stack([r // w, c // w, band(r, Gh), band(c, Gw)], 1)
    allowed = (key[:, None, :] == key[None, :, :]).all(-1)
    allowed[:prefix, :] = True
    allowed[:, :prefix] = True
    ref = F.scaled_dot_product_attention(q[:, :, :length], k[:, :, :length],
                                         v[:, :, :length], attn_mask=allowed)
    torch.testing.assert_close(got[:, :, :length], ref)
    cfg = debug_config(layers=4, model=dict(attention_type="window", window_size=2,
                                            window_shift=True, global_attention_layers="2"))
    assert [cfg.model.window_shift_of(i) for i in range(4)] == [0, 1, 0, 0]


@pytest.mark.parametrize("prefix,grid,w", [(0, (5, 5), 2), (1, (4, 6), 3), (1, (3, 3), 1)])
def test_local_global_is_windows_plus_global_top_left_tokens(prefix, grid, w):
    """Each window's top-left patch is global both ways, as is the class token; with w = 1
    every token is global: full attention."""
    g = torch.Generator().manual_seed(4)
    b, n, d = 2, 2, 4
    length = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(b, n, length + 1, d, generator=g) for _ in range(3))
    got = window_attention(q, k, v, TokenLayout(prefix, grid), w, carriers=True)
    gh, gw = grid
    rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
    window = torch.full((length,), -1)
    window[prefix:] = (rows // w) * 1000 + cols // w
    is_global = torch.ones(length, dtype=torch.bool)
    is_global[prefix:] = (rows % w == 0) & (cols % w == 0)
    allowed = (window[:, None] == window[None, :]) | is_global[None, :] | is_global[:, None]
    ref = F.scaled_dot_product_attention(q[:, :, :length], k[:, :, :length],
                                         v[:, :, :length], attn_mask=allowed)
    torch.testing.assert_close(got[:, :, :length], ref)
    if w == 1:
        full = F.scaled_dot_product_attention(q[:, :, :length], k[:, :, :length],
                                              v[:, :, :length])
        torch.testing.assert_close(got[:, :, :length], full)


def test_linear_attention_is_its_quadratic_form():
    from megavit.models.attention import elu_feature, linear_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    got = linear_attention(q, k, v, length=7)             # the last 2 tokens: padding
    scores = elu_feature(q[:, :, :7]) @ elu_feature(k[:, :, :7]).transpose(-2, -1)
    ref = (scores / scores.sum(-1, keepdim=True)) @ v[:, :, :7]
    torch.testing.assert_close(got[:, :, :7], ref)
    assert torch.equal(got[:, :, 7:], torch.zeros(2, 3, 2, 4))
    cfg = debug_config(layers=4, model=dict(attention_type_per_layer="window,linear,full",
                                            window_size=2))
    assert [cfg.model.attention_kind(i) for i in range(4)] == ["window", "linear", "full",
                                                                "window"]


def test_positions_travel_to_another_resolution(tmp_path):
    """Trained at 16x16 px (4x4 patches), run at 24x24 (6x6): learned-2d tables resized
    along their axis (the identity at the same grid), rope-2d loads every weight as it is;
    both evaluate."""
    from megavit.models.vit import resize_axis_table
    from megavit.parallel.sharding import full_state

    table = torch.randn(5, 8)
    assert torch.equal(resize_axis_table(table, 5), table)
    source = classification_run(debug_config("classic", layers=2, model=dict(
        position_embedding_type="learned-2d", img_h=16, img_w=16)), serial_state())
    saved = full_state(source.model, serial_state().tp)
    for kind in ("learned-2d", "rope-2d"):
        run, lines = resized_run(kind, tmp_path, 24)
        loaded = full_state(run.model, serial_state().tp)
        if kind == "learned-2d":
            assert any("position table resized from 4x4 to 6x6" in line for line in lines)
            for name in ("pos_embed.row_weight", "pos_embed.col_weight"):
                assert torch.equal(loaded[name], resize_axis_table(saved[name], 6)), name
        else:
            assert not any("resized" in line for line in lines)
            assert any("grid 4x4 -> 6x6 patches: no position table to resize (rope-2d "
                       "positions are computed for the new grid)" in line for line in lines)
            assert not any(name.startswith("pos_embed") for name in loaded)
        result = run.evaluate()
        assert result["eval_images"] == 359 and 0.0 <= result["eval_accuracy"] <= 1.0


def test_rope_2d_rotates_by_row_and_column():
    from megavit.models.attention import apply_rope_2d, rope_2d_angles

    cos, sin = rope_2d_angles(TokenLayout(1, (2, 3)), 8)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))
    q = torch.randn(1, 1, 7, 8)
    k = torch.randn(1, 1, 7, 8)
    rq, rk = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))      # a rotation
    # scores depend on the offset only: shifting both tokens by one column keeps q.k
    same = (rq[0, 0, 1] * rk[0, 0, 2]).sum()
    q2, k2 = q.clone(), k.clone()
    q2[0, 0, 2], k2[0, 0, 3] = q[0, 0, 1], k[0, 0, 2]
    shifted = (apply_rope_2d(q2, cos, sin)[0, 0, 2] * apply_rope_2d(k2, cos, sin)[0, 0, 3]).sum()
    torch.testing.assert_close(same, shifted)


def test_a_window_as_large_as_the_grid_is_the_full_model():
    full = debug_config("classic", layers=2)
    windowed = dataclasses.replace(full, model=dataclasses.replace(
        full.model, attention_type="window", window_size=max(full.model.grid)))
    a, b = train_steps(serial_state(), full), train_steps(serial_state(), windowed)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert_tensors_close(a["grads"][1], b["grads"][1], "window = grid")
    smaller = dataclasses.replace(windowed, model=dataclasses.replace(windowed.model,
                                                                      window_size=2))
    c = train_steps(serial_state(), smaller)          # 2x2 windows: another function
    change = max(((c["grads"][0][k] - g).abs().max() / g.abs().max()).item()
                 for k, g in a["grads"][0].items() if k.startswith("blocks."))
    assert change > 1e-3, change   # measured 3.4e-3 (near-uniform attention at init); noise ~1e-7


@pytest.mark.parametrize("model,message", [
    (dict(attention_type="window"), "--attention-type window needs --window-size"),
    (dict(attention_type="window", window_size=9), "--window-size 9 must be in 1..5"),
    (dict(window_size=2), "--window-size applies to window attention (no block uses it)"),
    (dict(global_attention_layers="1"), "--global-attention-layers applies to --attention-type "
                                        "window or linear"),
    (dict(attention_type_per_layer="window,conv"),
     "conv is not one of full, window, local-global, linear"),
    (dict(attention_type_per_layer="full", attention_type="window", window_size=2),
     "--attention-type-per-layer replaces --attention-type"),
    (dict(attention_type="linear", attention_dropout=0.1), "linear attention has no "
                                                           "attention probabilities"),
    (dict(window_shift=True), "--window-shift shifts windows by --window-size // 2"),
    (dict(attention_type="window", window_size=2, global_attention_layers="1,7"),
     "block(s) 7 outside 0..1"),
    (dict(attention_type="window", window_size=2, global_attention_layers="a"),
     "expected block indices separated by commas"),
])
def test_impossible_attention_flags_are_refused(model, message):
    cfg = debug_config(layers=2, model=model)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, world_size=1)


def test_exports_refuse_window_attention():
    from megavit.interop import hf_vit, timm_vit

    assert any("per layer: local-global,linear,window,full); timm's ViT attends" in d
               for d in timm_vit.differences(window_config("map").model))
    assert any("--attention-type is 'window'" in d
               for d in hf_vit.differences(window_config("cls").model))


def test_text_tower_refuses_window_types():
    """The text tower takes only full attention: its flags refuse the image-tower attention
    flags by name, and a text config built in Python with windows fails validation."""
    from megavit.config.contrastive import parse_contrastive_args, validate_contrastive

    base = ["--preset", "vit-debug", "--text-preset", "text-debug", "--micro-batch-size", "8",
            "--global-batch-size", "8"]
    for flag in (["--text-attention-type", "window"], ["--text-window-size=4"],
                 ["--no-text-window-shift"], ["--text-position-embedding-type", "rope-2d"]):
        with pytest.raises(ConfigError, match=f"^{flag[0].split('=')[0]}: the text tower "
                                              "takes only full attention"):
            parse_contrastive_args(base + flag)
    cfg = parse_contrastive_args(base + ["--attention-type", "window", "--window-size", "2"])
    validate_contrastive(cfg)                      # windows in the image tower are fine
    cfg.text.blocks.attention_type, cfg.text.blocks.window_size = "window", 2
    with pytest.raises(ConfigError, match="text tower takes only full attention"):
        validate_contrastive(cfg)


@pytest.mark.parametrize("kind", ["window", "local-global", "linear"])
def test_a_core_that_keeps_only_its_inputs_has_the_kept_cores_gradients(kind):
    """Window / local-global / linear cores run again in backward (`_inputs_only`), with
    attention dropout's masks drawn again the same (not for linear, which has none): the
    output and the q|k|v gradient equal those of the same core run once and kept."""
    from megavit.models.transformer import AttentionCore, Runtime
    from megavit.parallel.random import RNGTracker

    dropout = 0.0 if kind == "linear" else 0.3
    cfg = debug_config("classic", layers=1, model=dict(
        attention_type=kind, window_size=None if kind == "linear" else 2,
        attention_dropout=dropout, img_h=20, img_w=20)).model
    qkv = torch.randn(cfg.seq_length, 2, 3 * cfg.hidden_size, dtype=torch.float64)
    outs = []
    for kept in (False, True):
        rt = Runtime(serial_state().tp, rng=RNGTracker(3, 0, torch.device("cpu")))
        core = AttentionCore(cfg, rt).train()
        assert core.attend.func.__name__ == "_inputs_only"
        if kept:
            core.attend = core.attend.keywords["inner"]
        torch.manual_seed(0)
        x = qkv.clone().requires_grad_()
        y = core(x, None)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        outs.append((y.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_mnist_canvas_holds_the_whole_digit_among_strokes():
    """--dataset mnist-canvas: the same canvas for the same index (any layout, any call),
    the label of the whole digit, which lies somewhere on the canvas whole (no stroke drawn
    over it lowers a pixel), MNIST-5k's split; canvases under 28 px are refused."""
    from megavit.config import preset_model_config
    from megavit.data.bad_samples import DataError
    from megavit.data.datasets import load_mnist5k, mnist_canvas

    model = preset_model_config("vit-debug", img_h=44, img_w=52, num_channels=1)
    train, held = mnist_canvas(model)
    assert (len(train), len(held)) == (4000, 1000)
    small = preset_model_config("vit-debug", img_h=28, img_w=28, num_channels=1)
    assert torch.equal(held.labels, load_mnist5k(small)[1].labels)
    a, b = train.pixels(torch.tensor([5, 9])), train.pixels(torch.tensor([9]))
    assert torch.equal(a[1], b[0]) and a.shape == (2, 1, 44, 52)
    canvas, digit = a[0, 0], train.digits[5]
    windows = canvas.unfold(0, 28, 1).unfold(1, 28, 1)             # [17, 25, 28, 28]
    assert ((windows >= digit).flatten(2).all(-1)).any()
    assert (canvas > 0).sum() > (digit > 0).sum()                 # the strokes are there
    with pytest.raises(DataError, match="at least 28"):
        mnist_canvas(preset_model_config("vit-debug", img_h=24, img_w=32, num_channels=1))
