"""Fine-tuning: weights only from any layout into any layout (new classifier, resized
position table), layer-wise lr decay and a frozen-backbone linear probe — each equal to the
serial run at TP=2 (plain, and with sequence parallelism over an odd token count and
selective recomputation) and at PP=2 (with full recomputation).

One process group per layout runs every check (harness jobs); the serial references run in
this process. The pretrained checkpoint is written once per module by the serial run at
16x16 px (16 tokens) with 10 classes; fine-tuning runs at 20x20 px (25 tokens: odd, so
padded under SP) with 12 classes.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from megavit.checkpointing.checkpointer import resume, save_checkpoint
from megavit.models.vit import resize_pos_embed, vit_layer_id
from megavit.parallel.sharding import full_state
from megavit.parallel.state import ParallelState, serial_state
from megavit.tasks.classification import ClassificationTask, classification_run
from megavit.training.loop import pretrain
from tests.harness import run_distributed
from tests.scenarios import debug_config, train_steps, uncounted
from tests.test_tensor_parallel import adam_first_order_bound, assert_tensors_close

RTOL = 1e-5
SP_SELECTIVE = {"sequence_parallel": True, "recompute_granularity": "selective"}
PP2_FULL = {"pipeline_model_parallel_size": 2, "recompute_granularity": "full",
            "recompute_method": "uniform", "recompute_num_layers": 1}
# name: (world, tp, pp, [ParallelConfig overrides of the checks run in that group])
LAYOUTS = {"tp2": (2, 2, 1, [{}, SP_SELECTIVE]), "pp2": (2, 1, 2, [PP2_FULL])}


def pretrained_config():
    return debug_config(model=dict(img_h=16, img_w=16, drop_path_rate=0.0))


def finetune_config(tp: int = 1, parallel: dict | None = None, **training):
    """vit-debug at 20x20 px with 12 classes (2 blocks; 4 under pipeline parallelism)."""
    layers = 4 if parallel and parallel.get("pipeline_model_parallel_size") else 2
    return debug_config(tp=tp, parallel=parallel, layers=layers, model=dict(num_classes=12),
                        **training)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Serial checkpoints (iteration 3, with Adam state) of the 16x16 px, 10-class model
    with 2 and with 4 blocks, as --save directories layers2/ and layers4/."""
    root = tmp_path_factory.mktemp("pretrained")
    for layers in (2, 4):
        cfg = pretrained_config()
        cfg.model = dataclasses.replace(cfg.model, num_layers=layers)
        run = classification_run(cfg, serial_state())
        save_checkpoint(run, str(root / f"layers{layers}"), 3, 0, lambda line: None)
    return root


def finetuned_steps(pstate: ParallelState, cfg, checkpoint: str) -> dict:
    """The weights right after loading the checkpoint's weights (new head, resized table),
    then two training steps' losses, gradients and weights."""
    lines: list[str] = []
    run = classification_run(cfg, pstate)
    first = resume(run, None, lines.append, pretrained=checkpoint)
    loaded = uncounted(pstate, full_state, run.model, pstate.tp)
    out = train_steps(pstate, cfg, steps=2, run=run)
    return {**out, "loaded": loaded, "first": first, "lines": lines}


def probe_steps(pstate: ParallelState, cfg, checkpoint: str) -> dict:
    return finetuned_steps(pstate, dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, freeze_backbone=True, lr=5e-2)),
        checkpoint)


def decay_steps(pstate: ParallelState, cfg, checkpoint: str) -> dict:
    return finetuned_steps(pstate, dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, layer_decay=0.5)), checkpoint)


def probe_loop(pstate: ParallelState, cfg, checkpoint: str) -> dict:
    """The whole training loop of a linear probe (logging, evaluation, summary)."""
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(
        cfg.training, freeze_backbone=True, train_iters=2))
    cfg.logging = dataclasses.replace(cfg.logging, eval_iters=2, peak_tflops=1.0)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, pretrained_checkpoint=checkpoint)
    return pretrain(ClassificationTask(cfg), pstate)


CHECKS = {"finetune": finetuned_steps, "probe": probe_steps, "decay": decay_steps}


def _checkpoint(root: Path, cfg) -> str:
    return str(root / f"layers{cfg.model.num_layers}")


@functools.lru_cache(maxsize=None)
def serial(check: str, layers: int, root: str):
    cfg = finetune_config()
    cfg.model = dataclasses.replace(cfg.model, num_layers=layers)
    return CHECKS[check](serial_state(), cfg, _checkpoint(Path(root), cfg))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, pretrained):
    world, tp, pp, variants = LAYOUTS[request.param]
    jobs = {}
    for i, parallel in enumerate(variants):
        cfg = finetune_config(tp=tp, parallel=parallel)
        for check, fn in CHECKS.items():
            jobs[f"{check}{i}"] = (fn, (cfg, _checkpoint(pretrained, cfg)))
    cfg = finetune_config(tp=tp, parallel=variants[-1])
    jobs["loop"] = (probe_loop, (cfg, _checkpoint(pretrained, cfg)))
    return request.param, run_distributed(world, tp, jobs, pp=pp)


def _merged(results: list[dict], pp: int) -> list[dict]:
    """One whole-model result per rank of the first stage: its stages' tensors joined."""
    world = len(results)
    column = world // pp
    merged = []
    for c in range(column):
        ranks = [k * column + c for k in range(pp)]
        out = {"loss": results[ranks[-1]]["loss"], "grad_norm": results[ranks[-1]]["grad_norm"],
               "loaded": {}, "weights": {}, "initial": {}, "grads": [{}, {}]}
        for r in ranks:
            for key in ("loaded", "weights", "initial"):
                out[key].update(results[r][key])
            for step in range(2):
                out["grads"][step].update(results[r]["grads"][step])
        merged.append(out)
    return merged


@pytest.mark.parametrize("check", list(CHECKS))
def test_finetuning_matches_serial(layout, pretrained, check):
    name, results = layout
    world, tp, pp, variants = LAYOUTS[name]
    for i, _ in enumerate(variants):
        layers = finetune_config(tp=tp, parallel=variants[i]).model.num_layers
        ref = serial(check, layers, str(pretrained))
        for got in _merged(results[f"{check}{i}"], pp):
            what = f"{name}[{i}] {check}"
            assert_tensors_close(got["loaded"], ref["loaded"], f"{what} loaded", rtol=0,
                                 atol=1e-7)
            assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), what
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), what
            for step in range(2):
                assert_tensors_close(got["grads"][step], ref["grads"][step],
                                     f"{what} step {step} grad")
            cfg = finetune_config()
            if check == "probe":
                cfg.training = dataclasses.replace(cfg.training, lr=5e-2)
            bound = adam_first_order_bound(ref, got, cfg)   # at the full lr: an upper bound
            for k, w in ref["weights"].items():
                err = (got["weights"][k] - w).abs()
                allowed = 1e-6 * w.abs().max() + 1e-8 + bound[k]
                assert torch.all(err <= allowed), f"{what} weight {k}: max error {err.max():.3e}"


def test_weights_load_with_a_new_classifier_and_a_resized_position_table(pretrained):
    ref = serial("finetune", 2, str(pretrained))
    source = classification_run(pretrained_config(), serial_state())
    resume(source, str(pretrained / "layers2"), lambda line: None)
    saved = full_state(source.model, serial_state().tp)
    fresh = full_state(classification_run(finetune_config(), serial_state()).model,
                       serial_state().tp)
    loaded = ref["loaded"]
    for name, tensor in loaded.items():
        if name.startswith("head."):             # the run's own init, 12 classes
            assert torch.equal(tensor, fresh[name]) and tensor.shape[0] == 12
        elif name == "pos_embed.weight":          # 4x4 -> 5x5 patches, bicubic
            assert torch.equal(tensor, resize_pos_embed(saved[name], (4, 4), (5, 5)))
        else:
            assert torch.equal(tensor, saved[name]), name
    assert ref["first"] == 0
    assert any("classifier re-initialised: 10 classes in the checkpoint, 12 here" in line
               for line in ref["lines"])
    assert any("position table resized from 4x4 to 5x5 patches" in line for line in ref["lines"])


def test_linear_probe_trains_the_classifier_only(pretrained):
    ref = serial("probe", 2, str(pretrained))
    for name, weight in ref["weights"].items():
        if name.startswith("head."):
            assert not torch.equal(weight, ref["loaded"][name]), name
        else:
            assert torch.equal(weight, ref["loaded"][name]), f"{name} changed"
    cfg = finetune_config()
    cfg.training = dataclasses.replace(cfg.training, freeze_backbone=True)
    run = classification_run(cfg, serial_state())
    assert [n for n, p in run.model.named_parameters() if p.requires_grad] == \
        ["head.weight", "head.bias"]


def test_probe_runs_the_whole_loop_at_every_stage(layout):
    name, results = layout
    for summary in results["loop"]:
        assert summary["iteration"] == 2 and 0.0 <= summary["eval_accuracy"] <= 1.0


def test_layer_decay_scales_each_depth():
    task = ClassificationTask(dataclasses.replace(
        finetune_config(), training=dataclasses.replace(finetune_config().training,
                                                        layer_decay=0.5)))
    scales = {n: task.lr_scale(n) for n in ("patch_embed.proj.weight", "pos_embed.weight",
                                            "blocks.0.in_proj.weight", "blocks.1.norm.weight",
                                            "norm.weight", "map_head.probe", "head.bias")}
    assert scales == {"patch_embed.proj.weight": 0.125, "pos_embed.weight": 0.125,
                      "blocks.0.in_proj.weight": 0.25, "blocks.1.norm.weight": 0.5,
                      "norm.weight": 1.0, "map_head.probe": 1.0, "head.bias": 1.0}
    assert vit_layer_id("cls_token", 2) == 0
    # the first AdamW step moves a weight by about lr x scale (m / sqrt(v) = sign(g))
    ref_cfg = finetune_config(lr_decay_style="constant", clip_grad=0.0, weight_decay=0.0)
    moved = {}
    for decay in (None, 0.5):
        cfg = dataclasses.replace(ref_cfg, training=dataclasses.replace(
            ref_cfg.training, layer_decay=decay))
        out = train_steps(serial_state(), cfg, steps=1)
        moved[decay] = {k: (out["weights"][k] - out["initial"][k]).abs().max().item()
                        for k in ("patch_embed.proj.weight", "blocks.0.in_proj.weight",
                                  "head.weight")}
    for key, scale in (("patch_embed.proj.weight", 0.125), ("blocks.0.in_proj.weight", 0.25),
                       ("head.weight", 1.0)):
        assert moved[0.5][key] == pytest.approx(moved[None][key] * scale, rel=1e-3), key


# --- what --load, --pretrained-checkpoint and --save accept ----------------------------------

def test_load_takes_a_checkpoint_or_a_save_directory_and_names_anything_else(pretrained,
                                                                              tmp_path):
    from megavit.checkpointing.checkpointer import checkpoint_to_load
    from megavit.checkpointing.directory import CheckpointDirectoryError

    save = pretrained / "layers2"
    assert checkpoint_to_load("--load", str(save)) == save / "iter_0000003"
    assert checkpoint_to_load("--load", str(save / "iter_0000003")) == save / "iter_0000003"
    assert checkpoint_to_load("--load", str(tmp_path / "missing")) is None
    (tmp_path / "empty" / ".staging-iter_0000001").mkdir(parents=True)  # a first save cut short
    assert checkpoint_to_load("--load", str(tmp_path / "empty")) is None
    with pytest.raises(CheckpointDirectoryError, match=r"--load .*pretrained.*: neither a "
                       r"checkpoint .* it holds layers2/, layers4/; did you mean --load "
                       r".*layers2\?"):
        checkpoint_to_load("--load", str(pretrained))
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "1.png").write_bytes(b"x")
    with pytest.raises(CheckpointDirectoryError, match="it holds cat/$"):
        checkpoint_to_load("--load", str(tmp_path / "images"))
    lost = tmp_path / "lost"             # a save killed between its rename and the pointer
    lost.mkdir()
    (lost / "iter_0000003").symlink_to(save / "iter_0000003")
    notes: list[str] = []
    assert checkpoint_to_load("--load", str(lost), notes.append) == lost / "iter_0000003"
    assert "no latest_checkpointed_iteration.txt" in notes[0]
    own = tmp_path / "own"                # the run's own --save directory: metrics, logs
    own.mkdir()
    (own / "metrics.jsonl").write_text("")
    assert checkpoint_to_load("--load", str(own), notes.append, save_dir=str(own)) is None
    assert "no checkpoint yet (it holds metrics.jsonl)" in notes[-1]
    with pytest.raises(CheckpointDirectoryError, match="it holds metrics.jsonl"):
        checkpoint_to_load("--load", str(own))
    with pytest.raises(CheckpointDirectoryError, match="a file, not a checkpoint directory"):
        checkpoint_to_load("--pretrained-checkpoint", str(lost / "iter_0000003" /
                                                          "megavit_config.json"))


def test_finetuning_refuses_other_models_and_a_resume_reports_a_new_schedule(pretrained):
    from megavit.checkpointing.errors import CheckpointLoadError

    cfg = finetune_config()
    cfg.model = dataclasses.replace(cfg.model, hidden_size=64)
    with pytest.raises(CheckpointLoadError, match="a different model, not loaded: "
                       "--hidden-size 32 in the checkpoint, 64 here"):
        resume(classification_run(cfg, serial_state()), None, print,
               pretrained=str(pretrained / "layers2"))
    cfg = pretrained_config()
    cfg.training = dataclasses.replace(cfg.training, train_iters=9, lr=1e-3)
    lines: list[str] = []
    assert resume(classification_run(cfg, serial_state()), str(pretrained / "layers2"),
                  lines.append) == 3
    assert any("resumed with another schedule: --train-iters 2 in the checkpoint, 9 here; "
               "--lr 0.005 in the checkpoint, 0.001 here" in line for line in lines), lines


@pytest.mark.parametrize("argv,message", [
    (["--finetune"], "--finetune loads the weights of --load DIR"),
    (["--freeze-backbone"], "--freeze-backbone trains a classifier on a frozen model"),
    (["--reset-classifier"], "--reset-classifier applies when fine-tuning"),
    (["--layer-decay", "1.5"], "--layer-decay must be in (0, 1]"),
    (["--save", "SAVE_UNDER_FILE/ck"], "is a file, so the directory cannot be made"),
    (["--pretrained-checkpoint", "/nonexistent"], "--pretrained-checkpoint /nonexistent: no "
                                                  "such directory"),
    (["--freeze-backbone", "--load", "TMP"], "--freeze-backbone trains a classifier"),
    (["--pretrained-checkpoint", "TMP", "--save", "TMP/"], "is where the weights to "
                                                          "fine-tune come from"),
])
def test_fine_tuning_mistakes_exit_2(argv, message, tmp_path, capsys):
    from megavit.pretrain import main

    (tmp_path / "file").write_text("x")
    argv = [a.replace("SAVE_UNDER_FILE", str(tmp_path / "file")).replace("TMP", str(tmp_path))
            for a in argv]
    assert main(["--preset", "vit-debug", "--dataset", "digits", *argv]) == 2
    assert message in capsys.readouterr().err


def test_fine_tunes_an_imported_transformers_vit(tmp_path):
    """tools/import_hf.py's output (a headless ViTModel at 8 px) fine-tuned as a 10-class
    classifier at 16 px: the classifier starts fresh, the position table is resized."""
    import json

    from transformers import ViTConfig, ViTModel

    from megavit.config import ModelConfig
    from tests.test_bad_inputs import tool

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=8, patch_size=2, num_channels=1,
                       layer_norm_eps=1e-6)).save_pretrained(str(tmp_path / "hf"))
    assert tool("import_hf").main(["--input", str(tmp_path / "hf"), "--save",
                                   str(tmp_path / "ck")]) == 0
    imported = json.loads((tmp_path / "ck" / "iter_0000000" / "megavit_config.json").read_text())
    cfg = debug_config(layers=2, train_iters=1)
    cfg.model = dataclasses.replace(ModelConfig(**imported["model"]), img_h=16, img_w=16,
                                    num_classes=None)
    run = classification_run(cfg, serial_state())
    lines: list[str] = []
    assert resume(run, None, lines.append, pretrained=str(tmp_path / "ck")) == 0
    assert any("classifier re-initialised: 0 classes in the checkpoint, 10 here" in line
               for line in lines), lines
    assert any("position table resized from 4x4 to 8x8 patches" in line for line in lines)
    result = run.step(0, next(iter(run.batches(0, 1))))
    assert torch.isfinite(result.loss)
