"""Semantic segmentation (megavit/tasks/segmentation.py, models/dense.py,
data/segmentation.py).

- The metric: mean IoU and pixel accuracy from the confusion matrix equal torchmetrics'
  multiclass Jaccard index (macro) and micro accuracy on random maps, ignore index included.
- mnist-seg follows its rule: labels are the digit + 1 exactly where a digit's resized
  stroke is at least 0.5 and was not drawn over; the held-out canvases are fixed, training
  canvases depend on the draw's global id only.
- The pyramid's levels have the shapes ViTDet's simple pyramid gives (odd grids included).
- Training equals the serial run (loss, every gradient, weights after two steps, then the
  held-out metrics) at TP=2 (25 tokens), TP=2 + SP + selective recomputation (25 tokens:
  padded), PP=2 with full recomputation and a class token (26 tokens), DP=2 with the
  distributed optimizer; a run saved and resumed at PP=2 equals the uninterrupted one,
  and its state continues in one process like the serial run (resharding).
  The same for a model with --patch-merge-layers (65 -> 17 -> 5 tokens; at PP=2 one merge
  at the stage boundary, one inside a stage), and the same stack read by --neck fpn at
  every block (TP=2 + SP, PP=2 with full recomputation and interleaved: the maps travel
  between stages; forward_intermediates under TP=2 + SP equals the serial maps).
- Patch merging equals its rule written plainly (token order, class token); an odd grid
  is refused naming the flag; exports refuse a merged model.
- Flags: classification data, MAP pooling and augmentations are refused for segmentation,
  mnist-seg for classification.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torchmetrics
import torch.nn.functional as F

from megavit.config import ConfigError
from megavit.config.segmentation import (SegmentationConfig, SegmentationRunConfig,
                                         parse_segmentation_args, validate_segmentation)
from megavit.models.dense import SimpleFeaturePyramid
from megavit.parallel.sharding import full_state
from megavit.parallel.state import serial_state
from megavit.tasks.segmentation import confusion_matrix, iou_metrics, segmentation_run
from tests.harness import run_distributed
from tests.scenarios import debug_config, merge_stages, train_steps
from tests.test_tensor_parallel import assert_two_steps_match

RTOL = 1e-5
# variant, model overrides: vit22b blocks with GAP (25 tokens, drop-path); classic blocks
# with a class token (26 tokens), dropped before the neck
MODELS = {"gap": ("vit22b", lambda layers: dict(pooling="gap")),
          "cls": ("classic", lambda layers: dict(img_h=20, img_w=20)),
          # --patch-merge-layers: an 8x8 grid (3 px patches of 24 px) and a class token, 65
          # tokens; 2 blocks: merged after block 0 (17 tokens); 4 blocks (PP=2, 2 a stage):
          # after block 1 (the stage boundary: 17 tokens) and block 2 (inside stage 1: 5)
          # windows of 3 tokens a side on every grid (8x8: partial windows; 2x2: narrowed
          # to the grid, one window)
          "merge": ("classic", lambda layers: dict(
              img_h=24, img_w=24, patch_dim=3, attention_type="window", window_size=3,
              patch_merge_layers="0" if layers == 2 else "1,2")),
          # the same stack read by --neck fpn at every block: at PP=2 stage 0's two maps
          # (65 tokens each) travel to stage 1 with the hidden states (17 tokens)
          "fpn": ("classic", lambda layers: dict(
              img_h=24, img_w=24, patch_dim=3, attention_type="window", window_size=3,
              patch_merge_layers="0" if layers == 2 else "1,2",
              feature_layers=",".join(map(str, range(layers)))))}
NECKS = {"fpn": "fpn"}
SP_SELECTIVE = {"sequence_parallel": True, "recompute_granularity": "selective"}
PP2_FULL = {"pipeline_model_parallel_size": 2, "recompute_granularity": "full",
            "recompute_method": "uniform", "recompute_num_layers": 1}
PP2_INTERLEAVED = {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1}
DISTOPT = {"use_distributed_optimizer": True, "ddp_bucket_size": 3000}
# name: (world, tp, pp, [(model, parallel flags)])
LAYOUTS = {"tp2": (2, 2, 1, [("gap", {}), ("gap", SP_SELECTIVE), ("merge", {}),
                             ("merge", SP_SELECTIVE), ("fpn", SP_SELECTIVE)]),
           "pp2": (2, 1, 2, [("cls", PP2_FULL), ("fpn", PP2_FULL), ("fpn", PP2_INTERLEAVED)]),
           "dp2": (2, 1, 1, [("gap", DISTOPT), ("merge", DISTOPT)])}


def seg_config(model: str, tp: int = 1, parallel: dict | None = None, layers: int = 2,
               **training) -> SegmentationRunConfig:
    variant, flags = MODELS[model]
    base = debug_config(variant, tp=tp, parallel=parallel, layers=layers, model=flags(layers),
                        **training)
    base.data = dataclasses.replace(base.data, dataset="mnist-seg", augment="none")
    base.logging = dataclasses.replace(base.logging, eval_iters=1)
    return SegmentationRunConfig(base, SegmentationConfig(
        neck=NECKS.get(model, "simple-pyramid"), neck_channels=8, decoder_channels=8))


def probe_images(cfg: SegmentationRunConfig) -> torch.Tensor:
    m = cfg.model
    return torch.randn(2, m.num_channels, m.img_h, m.img_w,
                       generator=torch.Generator().manual_seed(3))


def steps_and_eval(pstate, cfg: SegmentationRunConfig) -> dict:
    run = segmentation_run(cfg, pstate)
    maps = None
    if cfg.model.feature_layers and pstate.pp.size == 1:     # before training
        maps = run.model.chunks[0].forward_intermediates(probe_images(cfg), [1, 0])
    out = train_steps(pstate, cfg.base, run=run)
    out["maps"] = maps
    out["eval"] = run.evaluate()
    return out


def _steps(run, start: int, stop: int) -> list[float]:
    return [run.step(it, micro).loss.item()
            for it, micro in zip(range(start, stop), run.batches(start, stop))]


def resumed_and_straight(pstate, path: str) -> dict:
    from megavit.checkpointing.training_state import load_training_state, save_training_state

    cfg = seg_config("cls", pstate.tp.size, PP2_FULL, layers=4, train_iters=4)
    straight = segmentation_run(cfg, pstate)
    losses = _steps(straight, 0, 4)
    first = segmentation_run(cfg, pstate)
    resumed = _steps(first, 0, 2)
    save_training_state(first, path, 2)
    second = segmentation_run(cfg, pstate)
    start = load_training_state(second, path, same_layout=True)
    resumed += _steps(second, start, 4)
    return {"start": start, "losses": losses, "resumed_losses": resumed,
            "straight": full_state(straight.model, pstate.tp),
            "resumed": full_state(second.model, pstate.tp), "path": path}


@functools.lru_cache(maxsize=None)
def serial(model: str, layers: int):
    return steps_and_eval(serial_state(), seg_config(model, layers=layers))


def saved_serial_run(path: str) -> dict:
    """A serial 'gap' run trained two steps and saved to `path`; its evaluation."""
    from megavit.checkpointing.checkpointer import save_checkpoint

    run = segmentation_run(seg_config("gap"), serial_state())
    _steps(run, 0, 2)
    save_checkpoint(run, path, 2, 0, lambda line: None)
    return run.evaluate()


def inference_job(pstate, path: str) -> list[torch.Tensor]:
    """The logits of a saved segmentation model loaded for inference at this layout, at
    its own size and at 32x32 px (predict --img-h 32 --img-w 32)."""
    from megavit.checkpointing.inference import at_resolution, load_for_inference

    loaded = load_for_inference(path, pstate=pstate if pstate.world.size > 1 else None)
    bigger = at_resolution(loaded, 32, 32)
    with torch.no_grad():
        return [loaded.model(probe_images(seg_config("gap"))),
                bigger.model(F.interpolate(probe_images(seg_config("gap")), size=(32, 32)))]


def evaluate_only_job(pstate, cfg: SegmentationRunConfig) -> dict:
    """--eval-only at this layout: the summary of `evaluate_only`."""
    from megavit.training.loop import evaluate_only
    from megavit.training.metrics import MetricsLogger

    run = segmentation_run(cfg, pstate)
    return evaluate_only(run, MetricsLogger(cfg.base.logging, False, 0))


@functools.lru_cache(maxsize=None)
def layout_results(name: str, state_dir: str) -> dict:
    """Every job of layout `name` in one gloo process group (run once per module)."""
    world, tp, pp, variants = LAYOUTS[name]
    jobs = {f"{model}{i}": (steps_and_eval, (seg_config(model, tp, parallel,
                                                        layers=4 if pp > 1 else 2),))
            for i, (model, parallel) in enumerate(variants)}
    if pp > 1:
        jobs["resume"] = (resumed_and_straight, (f"{state_dir}/state",))
    expected = None
    if name == "tp2":     # --eval-only of a serial checkpoint at TP=2 + SP
        expected = saved_serial_run(f"{state_dir}/serial")
        cfg = seg_config("gap", tp, SP_SELECTIVE)
        cfg.base.checkpoint = dataclasses.replace(cfg.base.checkpoint,
                                                  load=f"{state_dir}/serial", eval_only=True)
        jobs["eval_only"] = (evaluate_only_job, (cfg,))
        jobs["inference"] = (inference_job, (f"{state_dir}/serial",))   # predict's loader
        expected = {"eval": expected, "logits": inference_job(serial_state(),
                                                              f"{state_dir}/serial")}
    results = run_distributed(world, tp, jobs, pp=pp)
    return {**results, "eval_only_expected": expected}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, state_dir):
    return request.param, layout_results(request.param, state_dir)


def test_segmentation_trains_and_evaluates_as_the_serial_run(layout):
    name, results = layout
    world, tp, pp, variants = LAYOUTS[name]
    column = world // pp
    for i, (model, parallel) in enumerate(variants):
        layers = 4 if pp > 1 else 2
        ref = serial(model, layers)
        for c in range(column):
            ranks = [k * column + c for k in range(pp)]
            got = merge_stages(results[f"{model}{i}"], ranks)
            what = f"{name}[{i}] {model}"
            assert_two_steps_match(got, ref, seg_config(model, layers=layers).base, what, RTOL)
            if ref["maps"] is not None and pp == 1:      # forward_intermediates under TP/SP
                for got_map, want in zip(results[f"{model}{i}"][ranks[0]]["maps"], ref["maps"]):
                    torch.testing.assert_close(got_map, want, rtol=RTOL, atol=1e-6)
            evaluation = results[f"{model}{i}"][ranks[-1]]["eval"]
            assert evaluation["eval_images"] == ref["eval"]["eval_images"] == 8, what
            for key in ("eval_loss", "eval_miou", "eval_pixel_accuracy"):
                assert evaluation[key] == pytest.approx(ref["eval"][key], rel=1e-4, abs=1e-6), \
                    f"{what} {key}"
    for r in results.get("inference", []):       # loaded for inference at TP=2
        for got, want in zip(r, results["eval_only_expected"]["logits"]):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-5)
    for r in results.get("eval_only", []):       # a serial checkpoint at TP=2 + SP
        want = results["eval_only_expected"]["eval"]
        assert r["iteration"] == 2
        for key in ("eval_loss", "eval_miou", "eval_pixel_accuracy"):
            assert r[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for r in results.get("resume", []):
        assert r["start"] == 2 and r["resumed_losses"] == r["losses"]
        for key, w in r["straight"].items():
            assert torch.equal(r["resumed"][key], w), key


def test_a_state_saved_at_pp2_continues_in_one_process_like_the_serial_run(state_dir):
    """Resharding: the PP=2 (full recomputation) state after two steps, loaded by a serial
    run, trains steps 2 and 3 as the serial run does (losses to 1e-5, weights within 1e-4
    of each tensor's largest magnitude, as for classification)."""
    from megavit.checkpointing.training_state import load_training_state

    results = layout_results("pp2", state_dir)
    cfg = seg_config("cls", layers=4, train_iters=4)
    run = segmentation_run(cfg, serial_state())
    assert load_training_state(run, results["resume"][0]["path"]) == 2
    losses = _steps(run, 2, 4)
    straight = segmentation_run(cfg, serial_state())
    expected = _steps(straight, 0, 4)[2:]
    assert losses == pytest.approx(expected, rel=1e-5)
    want, got = full_state(straight.model, straight.pstate.tp), full_state(run.model,
                                                                          run.pstate.tp)
    for key, w in want.items():
        err = (got[key] - w).abs().max().item()
        assert err <= 1e-4 * w.abs().max().item() + 1e-7, f"{key}: {err:.2e}"


def test_the_dense_head_is_trained_and_the_class_token_dropped():
    cfg = seg_config("cls")
    ref = serial("cls", 2)
    grads = ref["grads"][0]
    for key in ("neck.stages.0.0.weight", "decode_head.classifier.weight", "cls_token",
                "patch_embed.proj.weight"):
        assert grads[key].abs().sum() > 0, key
    run = segmentation_run(cfg, serial_state())
    chunk = run.model.chunks[0]
    tokens = torch.randn(cfg.model.seq_length, 3, cfg.model.hidden_size)
    fmap = chunk.feature_map(tokens)
    assert fmap.shape == (3, cfg.model.hidden_size, 5, 5)
    torch.testing.assert_close(fmap[1, :, 2, 3], chunk.norm(tokens[1 + 2 * 5 + 3, 1]))
    assert chunk(torch.randn(3, 1, 20, 20)).shape == (3, 11, 20, 20)


def test_forward_intermediates_are_the_blocks_outputs_as_maps():
    """Blocks 3, 0 and 2 of the merged stack (8x8 grid, merges after 1 and 2, a class
    token): each block's output before its merge, class token dropped, as [b, h, gh, gw]."""
    from megavit.models.transformer import ForwardContext

    cfg = seg_config("fpn", layers=4)
    model = segmentation_run(cfg, serial_state()).model.chunks[0]
    images = probe_images(cfg)
    got = model.forward_intermediates(images, [3, 0, 2])
    with torch.no_grad():
        x, outs = model.embed(images), {}
        for i in range(4):
            x = model.blocks[str(i)](x, ForwardContext(None, None))
            outs[i] = x
            if str(i) in model.merges:
                x = model.merges[str(i)](x)
    for layer, grid, fmap in zip((3, 0, 2), (2, 8, 4), got):
        tokens = outs[layer][1:]                       # the class token dropped
        assert fmap.shape == (2, cfg.model.hidden_size, grid, grid)
        r, c = grid - 1, grid // 2
        torch.testing.assert_close(fmap[1, :, r, c], tokens[r * grid + c, 1])
    with pytest.raises(ValueError, match="outside 0..3"):
        model.forward_intermediates(images, [4])


def test_fpn_levels_and_its_flops_count():
    from megavit.models.dense import FeaturePyramidNetwork, dense_head_flops
    from megavit.parallel.sharding import initialize_parameters

    fpn = FeaturePyramidNetwork(16, 8, 3)
    initialize_parameters(fpn, 0)
    maps = [torch.randn(2, 16, g, g) for g in (8, 4, 4)]
    assert [tuple(x.shape) for x in fpn(maps)] == [(2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 4, 4)]
    # the coarser levels reach the finer ones: the finest output moves with the coarsest input
    moved = fpn([maps[0], maps[1], maps[2] + 1])
    assert not torch.allclose(moved[0], fpn(maps)[0])
    cfg = seg_config("fpn", layers=4).model        # levels of 64, 64, 16 and 4 patches
    h, C, D, K = cfg.hidden_size, 8, 8, 11
    want = sum(2 * g * (h * C + 9 * C * C + 9 * C * D) for g in (64, 64, 16, 4))
    want += 2 * 64 * D * K
    assert dense_head_flops(cfg, "fpn", C, D, K, 3, training=False) == 3 * want


@pytest.mark.parametrize("grid", [(8, 8), (7, 7), (6, 10)])
def test_simple_pyramid_levels(grid):
    from megavit.parallel.sharding import initialize_parameters

    pyramid = SimpleFeaturePyramid(32, 8)
    initialize_parameters(pyramid, 0)
    levels = pyramid(torch.randn(2, 32, *grid))
    gh, gw = grid
    assert [tuple(x.shape) for x in levels] == [
        (2, 8, 4 * gh, 4 * gw), (2, 8, 2 * gh, 2 * gw), (2, 8, gh, gw),
        (2, 8, -(-gh // 2), -(-gw // 2))]


@pytest.mark.parametrize("ignore", [None, 3])
def test_iou_and_pixel_accuracy_equal_torchmetrics(ignore):
    g = torch.Generator().manual_seed(0)
    k = 5
    logits = torch.randn(4, k, 9, 7, generator=g)
    labels = torch.randint(k, (4, 9, 7), generator=g)
    labels[0, :2] = logits[0, :, :2].argmax(0)          # some agreement
    index = 255 if ignore is None else ignore
    if ignore is not None:
        labels[1, 3:] = ignore
    got = iou_metrics(confusion_matrix(logits, labels, k, index))
    pred = logits.argmax(1)
    jaccard = torchmetrics.classification.MulticlassJaccardIndex(
        num_classes=k, average="macro", ignore_index=ignore)
    accuracy = torchmetrics.classification.MulticlassAccuracy(
        num_classes=k, average="micro", ignore_index=ignore)
    if ignore is not None:      # torchmetrics drops the ignored class from its macro mean
        keep = labels != ignore
        ref_iou = torchmetrics.functional.classification.multiclass_jaccard_index(
            pred[keep], labels[keep], num_classes=k, average="none")
        seen = torch.bincount(labels[keep], minlength=k) + torch.bincount(pred[keep],
                                                                           minlength=k) > 0
        assert got["miou"] == pytest.approx(ref_iou[seen].mean().item(), rel=1e-6)
    else:
        assert got["miou"] == pytest.approx(jaccard(pred, labels).item(), rel=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(accuracy(pred, labels).item(), rel=1e-6)


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_mean():
    confusion = torch.tensor([[5, 1, 0], [2, 4, 0], [0, 0, 0]])
    got = iou_metrics(confusion)
    assert got["miou"] == pytest.approx((5 / 8 + 4 / 7) / 2)
    assert got["pixel_accuracy"] == pytest.approx(9 / 12)


def test_mnist_seg_follows_its_rule():
    from megavit.config import DataConfig, preset_model_config
    from megavit.data.segmentation import MnistSeg, build_segmentation_datasets

    model = preset_model_config("vit-debug", img_h=40, img_w=48, num_channels=1)
    train, held = build_segmentation_datasets(DataConfig(dataset="mnist-seg"), model)
    assert (len(train), len(held), train.num_classes) == (4000, 1000, 11)
    image, labels = held.canvas(3, 3)
    assert image.shape == labels.shape == (40, 48)
    assert torch.equal(labels[image == 0], torch.zeros_like(labels[image == 0]))
    assert torch.all(image[labels > 0] >= MnistSeg.STROKE)
    assert int(held.labels[3]) + 1 in labels.unique().tolist() or labels.eq(0).all()
    # held-out canvases are fixed; training canvases follow the draw's global id
    assert torch.equal(held.get(torch.tensor([3]))[1][0], labels)
    a = train.compose(torch.tensor([5, 5]), torch.tensor([10, 11]))[1]
    b = train.compose(torch.tensor([5]), torch.tensor([10]))[1]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])
    # the labels a plain re-composition with the same draws gives
    g = torch.Generator().manual_seed(20261207 + 2 * 3 + 1)
    more = int(torch.randint(MnistSeg.DIGITS_MORE + 1, (1,), generator=g))
    others = torch.randint(len(held), (more,), generator=g).tolist()
    expected = torch.zeros(40, 48, dtype=torch.long)
    for j in [3, *others]:
        side = min(int(torch.randint(20, 41, (1,), generator=g)), 40)
        y = int(torch.randint(40 - side + 1, (1,), generator=g))
        x = int(torch.randint(48 - side + 1, (1,), generator=g))
        digit = F.interpolate(held.digits[j][None, None], size=(side, side), mode="bilinear",
                              align_corners=False)[0, 0]
        region = expected[y:y + side, x:x + side]
        region[digit >= 0.5] = int(held.labels[j]) + 1
    assert torch.equal(labels, expected)


def test_segmentation_flags_refuse_what_cannot_work():
    base = ["--preset", "vit-debug", "--img-h", "32", "--img-w", "32", "--patch-dim", "8"]
    validate_segmentation(parse_segmentation_args(base))
    for flags, message in ((["--dataset", "digits"], "--dataset digits has one class"),
                           (["--pooling", "map"], "--pooling map pools"),
                           (["--augment", "affine"], "--augment affine"),
                           (["--num-classes", "5"], "--num-classes"),
                           (["--neck-channels", "0"], "--neck-channels must be"),
                           (["--feature-layers", "0"], "--neck simple-pyramid reads the last"),
                           (["--neck", "fpn", "--feature-layers", "0"],
                            r"the last block \(1\) must be among them"),
                           (["--neck", "fpn", "--patch-merge-layers", "1"],
                            r"a merge after the last block \(1\)"),
                           (["--feature-layers", "0,x"], "expected block indices")):
        with pytest.raises(ConfigError, match=message):
            validate_segmentation(parse_segmentation_args(base + flags))
    fpn = parse_segmentation_args(base + ["--neck", "fpn", "--patch-merge-layers", "0"])
    assert fpn.model.feature_layers == "0,1"     # the block before the merge, the last
    validate_segmentation(fpn)
    from megavit.pretrain import main

    assert main(["--preset", "vit-debug", "--dataset", "mnist-seg"]) == 2
    assert main(["--preset", "vit-debug", "--feature-layers", "1"]) == 2


def _write_folder(root, count: int = 4, size: int = 24):
    """images/{train,val}/k.png and annotations/{train,val}/k.png from mnist-seg canvases."""
    from PIL import Image

    from megavit.config import DataConfig, preset_model_config
    from megavit.data.segmentation import build_segmentation_datasets

    model = preset_model_config("vit-debug", img_h=size, img_w=size, num_channels=1)
    _, held = build_segmentation_datasets(DataConfig(dataset="mnist-seg"), model)
    pixels, maps = held.canvases(torch.arange(count))
    for split in ("train", "val"):
        for kind in ("images", "annotations"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            Image.fromarray((pixels[k, 0] * 255).round().byte().numpy()).save(
                root / "images" / split / f"{k}.png")
            Image.fromarray(maps[k].byte().numpy()).save(root / "annotations" / split / f"{k}.png")
    return maps


def test_a_segmentation_folder_reads_its_maps_and_names_what_is_wrong(tmp_path):
    from PIL import Image

    from megavit.config import DataConfig, preset_model_config
    from megavit.data.bad_samples import DataError
    from megavit.data.segmentation import build_segmentation_datasets

    maps = _write_folder(tmp_path)
    data = DataConfig(dataset="seg-folder", data_path=str(tmp_path))
    model = preset_model_config("vit-debug", img_h=24, img_w=24, num_channels=1)
    train, held = build_segmentation_datasets(data, model, num_classes=11)
    assert (len(train), len(held), held.num_classes) == (4, 4, 11)
    images, labels = held.get(torch.arange(4))
    assert images.shape == (4, 1, 24, 24) and torch.equal(labels, maps)
    half = preset_model_config("vit-debug", img_h=12, img_w=12, num_channels=1)
    small = build_segmentation_datasets(data, half, num_classes=11)[1].get(torch.arange(1))[1]
    assert small.shape == (1, 12, 12) and set(small.unique().tolist()) <= set(range(11))
    with pytest.raises(DataError, match="needs --num-classes"):
        build_segmentation_datasets(data, model)
    with pytest.raises(DataError, match=r"value \d+ is no class of --num-classes 2"):
        build_segmentation_datasets(data, model, num_classes=2)[1].get(torch.arange(4))
    Image.new("L", (10, 10)).save(tmp_path / "annotations" / "val" / "1.png")
    with pytest.raises(DataError, match=r"1.png: label map of 10x10 px for the 24x24 px image"):
        held.get(torch.tensor([1]))
    (tmp_path / "annotations" / "val" / "2.png").unlink()
    with pytest.raises(DataError, match=r"no label map for 1 of 4 images \(2.png"):
        build_segmentation_datasets(data, model, num_classes=11)


def test_training_on_a_segmentation_folder(tmp_path):
    _write_folder(tmp_path, count=8)
    cfg = seg_config("gap")
    cfg.base.data = dataclasses.replace(cfg.base.data, dataset="seg-folder",
                                        data_path=str(tmp_path))
    cfg.base.model = dataclasses.replace(cfg.base.model, img_h=24, img_w=24, num_classes=11)
    validate_segmentation(cfg)
    run = segmentation_run(cfg, serial_state())
    losses = _steps(run, 0, 2)
    assert all(l == l and l > 0 for l in losses)
    evaluation = run.evaluate()
    assert evaluation["eval_images"] == 8 and 0 <= evaluation["eval_miou"] <= 1


def test_a_segmentation_checkpoint_exports_its_backbone_to_timm(tmp_path):
    from safetensors import safe_open

    from megavit.checkpointing.checkpointer import resolve_checkpoint, save_checkpoint
    from megavit.interop.export_hf import export_checkpoint

    run = segmentation_run(seg_config("gap"), serial_state())
    save_checkpoint(run, str(tmp_path / "ck"), 2, 0, lambda line: None)
    lines = []
    export_checkpoint(resolve_checkpoint(tmp_path / "ck"), "timm", tmp_path / "export", None,
                      1 << 20, report=lines.append)
    assert any("a segmentation checkpoint: its backbone" in x and "left out" in x
               for x in lines), lines
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "patch_embed.proj.weight" in keys and "blocks.1.in_proj.weight" in keys
    assert not any(k.startswith(("neck", "decode_head", "head.")) for k in keys), keys
    theirs = run.model.state_dict()
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("patch_embed.proj.weight").flatten(1),   # conv
                           theirs["patch_embed.proj.weight"])


def test_patch_merge_is_its_rule_written_plainly():
    from megavit.config import preset_model_config
    from megavit.models.transformer import Runtime
    from megavit.models.vit import PatchMerge
    from megavit.parallel.sharding import initialize_parameters

    cfg = preset_model_config("vit-debug", img_h=24, img_w=16, patch_dim=4, pooling="cls")
    merge = PatchMerge(cfg, Runtime(serial_state().tp))
    initialize_parameters(merge, 0)
    gh, gw, h = 6, 4, cfg.hidden_size
    x = torch.randn(1 + gh * gw, 3, h, dtype=torch.float64)
    merge = merge.double()
    got = merge(x)
    assert got.shape == (1 + (gh // 2) * (gw // 2), 3, h)
    assert torch.equal(got[0], x[0])                      # the class token, unmerged
    for r in range(gh // 2):
        for c in range(gw // 2):
            four = [x[1 + (2 * r + dr) * gw + 2 * c + dc] for dr in (0, 1) for dc in (0, 1)]
            want = merge.proj(merge.norm(torch.cat(four, dim=-1)))
            torch.testing.assert_close(got[1 + r * (gw // 2) + c], want)


def test_merging_flags_and_exports():
    from megavit.config import preset_model_config, validate
    from megavit.interop import hf_vit, timm_vit

    cfg = seg_config("merge", layers=4)
    validate(cfg.base)
    assert cfg.model.grid_at(0) == (8, 8) and cfg.model.grid_at(2) == (4, 4)
    assert cfg.model.at_layer(3).seq_length == 5 and cfg.model.at_layer(4).grid == (2, 2)
    bad = dataclasses.replace(cfg.base, model=dataclasses.replace(
        cfg.model, patch_merge_layers="0,1,2,3"))
    with pytest.raises(ConfigError, match=r"--patch-merge-layers 0,1,2,3: the grid after "
                                          r"block 3 is 1x1; merging 2x2 groups needs both "
                                          r"sides even"):
        validate(bad)
    odd = dataclasses.replace(cfg.base, model=dataclasses.replace(
        cfg.model, img_h=21, img_w=21))
    with pytest.raises(ConfigError, match=r"--patch-merge-layers 1,2: the grid after block 1 "
                                          r"is 7x7"):
        validate(odd)
    with pytest.raises(ConfigError, match="outside 0..3"):
        validate(dataclasses.replace(cfg.base, model=dataclasses.replace(
            cfg.model, patch_merge_layers="4")))
    vit = preset_model_config("vit-debug", patch_merge_layers="1")
    assert any("no patch merging" in d for d in timm_vit.differences(vit))
    assert any("no patch merging" in d for d in hf_vit.differences(vit))
