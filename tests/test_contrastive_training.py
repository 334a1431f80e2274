"""Contrastive training computes the serial function in every layout (megavit's invariant):
at DP=2 (CLIP and SigLIP), TP=2 (CLIP) and TP=2 x DP=2 (SigLIP, with the distributed
optimizer) and PP=2 (the text tower and loss on the last stage; PP=2 x DP=2 too), the
first step's reduced gradient of every parameter equals the serial one
(within 1e-5 of its largest entry; measured 1.4e-6 at TP=2), three steps give the serial
losses (rel 1e-5), and the weights after them agree within 1e-3 of each tensor's largest
entry (Adam's first steps divide tiny gradients by their own size, so rounding differences
of 1e-6 move a weight by up to lr; measured 1.1e-4 at TP=2), and the zero-shot evaluation
afterwards (computed on the last stage, shared with every rank) gives the same figures.

LiT: with the image tower locked and loaded from a megavit.pretrain checkpoint, training
leaves every image weight bit-identical, the gradient buffer and the optimizer hold no image
parameter, and the text tower learns.

Two-tower distillation (--teacher-checkpoint, a CLIP teacher of another embedding width and
seed): the same serial equality at DP=2 (CLIP and SigLIP students), TP=2 with SP over 25
tokens (20x20 images, resized to the teacher's 16x16) and selective recomputation, and PP=2
with full recomputation (the teacher on stage 0, its embeddings broadcast to stage 1); the
teacher stays bit-identical and out of the optimizer.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from megavit.config import parse_contrastive_args, validate_contrastive
from megavit.parallel.sharding import full_state
from megavit.parallel.state import ParallelState, serial_state
from megavit.tasks.image_text.task import image_text_run
from tests import cli
from tests.harness import run_distributed

GLOBAL_BATCH = 16


def _flags(loss: str, tp: int, dp: int, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--preset", "vit-debug", "--num-channels", "1", "--img-h", "16", "--img-w", "16",
            "--text-preset", "text-debug", "--loss", loss,
            "--tensor-model-parallel-size", str(tp),
            "--micro-batch-size", str(GLOBAL_BATCH // dp),
            "--global-batch-size", str(GLOBAL_BATCH), "--train-iters", "3", "--lr", "5e-3",
            "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--weight-decay", "0.1",
            "--clip-grad", "0.5", "--seed", "7", "--adam-eps", "1e-6", *extra]


def _three_steps(pstate: ParallelState, flags: list[str]) -> dict:
    cfg = parse_contrastive_args(flags)
    validate_contrastive(cfg, pstate.world_size)
    run = image_text_run(cfg, pstate)
    teacher = run.task.teacher.model if run.task.teacher is not None else None
    before = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher else {}
    grads = {}

    def keep_gradients(model) -> None:
        if not run.buffers.shard:    # sharded: main_grad is valid only in this rank's shard
            grads.update(full_state(model, pstate.tp, {id(p): p.main_grad for _, p in
                                                        run.model.trainable_parameters()}))

    losses = [run.step(i, on_gradients=keep_gradients if i == 0 else None).loss.item()
              for i in range(3)]
    out = {"losses": losses, "weights": full_state(run.model, pstate.tp), "grads": grads,
           "eval": run.evaluate()}
    if teacher is not None:         # frozen: bit-identical, not among what the optimizer steps
        assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
        assert run.optimizer.segments and not any(
            seg.param is q for seg in run.optimizer.segments for q in teacher.parameters())
        assert not any(q.requires_grad for q in teacher.parameters())
        out["teacher_checked"] = True
    return out


@functools.lru_cache(maxsize=None)
def _serial(loss: str, extra: tuple[str, ...] = ()) -> dict:
    """The serial reference of `_flags(loss, 1, 1, extra)` (computed once per module)."""
    return _three_steps(serial_state(), _flags(loss, 1, 1, extra))


def _check(results: list[dict], serial: dict) -> None:
    for r in results:
        assert r["losses"] == pytest.approx(serial["losses"], rel=1e-5)
        assert r["eval"] == pytest.approx(serial["eval"], abs=2 / 359)   # a tie may flip
        assert r["weights"].keys() == serial["weights"].keys()
        for name, w in serial["weights"].items():
            err = (r["weights"][name] - w).abs().max().item()
            assert err <= 1e-3 * w.abs().max().item() + 1e-7, f"{name}: {err:.2e}"
        for name, g in r["grads"].items():
            err = (g - serial["grads"][name]).abs().max().item()
            assert err <= 1e-5 * serial["grads"][name].abs().max().item() + 1e-9, \
                f"gradient of {name}: {err:.2e}"


CASES = {   # job: (loss, tp, dp, extra flags)
    "dp2_clip": ("clip", 1, 2, ()),
    "dp2_siglip": ("siglip", 1, 2, ()),
    "dp2_siglip_3_chunks": ("siglip", 1, 2, ("--siglip-chunks", "3")),
}


@pytest.fixture(scope="module")
def clip_teacher(tmp_path_factory) -> str:
    """A two-tower CLIP teacher (vit-debug + text-debug, embedding width 24, context length
    12, seed 3, 4 iterations on the digits' captions) for two-tower distillation; tests only
    read it."""
    import os
    import sys

    from tests.test_checkpoint_cli import ROOT

    save = tmp_path_factory.mktemp("teacher") / "clip"
    proc = cli.run([sys.executable, "-m", "megavit.pretrain_contrastive",
                    *_flags("clip", 1, 1, ("--embed-dim", "24", "--seed", "3",
                                           "--context-length", "12",
                                           "--train-iters", "4", "--save", str(save),
                                           "--progress-bar", "off"))],
                   timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(save)


def _teacher(path: str, *extra: str) -> tuple[str, ...]:
    return ("--teacher-checkpoint", path, "--distill-similarity-weight", "2.0", *extra)


def test_dp2_matches_serial(clip_teacher):
    cases = {**CASES, "dp2_clip_teacher": ("clip", 1, 2, _teacher(clip_teacher)),
             "dp2_siglip_teacher": ("siglip", 1, 2, _teacher(clip_teacher))}
    results = run_distributed(2, 1, {k: (_three_steps, (_flags(loss, tp, dp, extra),))
                                     for k, (loss, tp, dp, extra) in cases.items()})
    for job, (loss, _, _, extra) in cases.items():
        _check(results[job], _serial(loss, extra))
    for job in ("dp2_clip_teacher", "dp2_siglip_teacher"):
        assert all(r["teacher_checked"] for r in results[job])
        assert results[job][0]["eval"]["teacher_zero_shot_accuracy"] > 0
    # the term is there: the teacher's run differs from the plain one
    assert results["dp2_clip_teacher"][0]["losses"] != pytest.approx(
        results["dp2_clip"][0]["losses"], rel=1e-3)


def test_tp2_and_tp2_dp2_match_serial(clip_teacher):
    sp = _teacher(clip_teacher, "--img-h", "20", "--img-w", "20", "--sequence-parallel",
                  "--recompute-granularity", "selective")
    tp2 = run_distributed(2, 2, {"clip": (_three_steps, (_flags("clip", 2, 1),)),
                                 "teacher_sp": (_three_steps, (_flags("clip", 2, 1, sp),))})
    _check(tp2["clip"], _serial("clip"))
    _check(tp2["teacher_sp"], _serial("clip", sp))
    assert all(r["teacher_checked"] for r in tp2["teacher_sp"])
    extra = ("--use-distributed-optimizer", "--ddp-bucket-size", "3000")
    both = run_distributed(4, 2, {"siglip": (_three_steps, (_flags("siglip", 2, 2, extra),))})
    _check(both["siglip"], _serial("siglip"))


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory):
    """A megavit.pretrain checkpoint (vit-debug on digits, 1 iteration) for LiT's image
    tower; tests only read it."""
    from tests.test_checkpoint_cli import pretrain

    save = tmp_path_factory.mktemp("lit") / "image"
    proc = pretrain("--train-iters", "1", "--save", str(save))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return save


def test_lit_keeps_the_loaded_image_tower_fixed_and_out_of_the_optimizer(image_checkpoint):
    save = image_checkpoint
    flags = _flags("siglip", 1, 1, ("--lock-image-tower", "--image-checkpoint", str(save)))
    cfg = parse_contrastive_args(flags)
    validate_contrastive(cfg)
    run = image_text_run(cfg, serial_state())
    fresh = image_text_run(parse_contrastive_args(_flags("siglip", 1, 1)), serial_state())
    loaded = {n: p.detach().clone() for n, p in run.model.image.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in run.model.text.named_parameters()}
    assert any(not torch.equal(w, dict(fresh.model.image.named_parameters())[n])
               for n, w in loaded.items())                       # the checkpoint was read
    image_ids = {id(p) for p in run.model.image.parameters()}
    assert not image_ids & set(run.buffers.offsets)              # no gradient buffer space
    assert not image_ids & {id(p) for p in run.optimizer.adamw.state}
    assert run.optimizer.masters and len(run.optimizer.masters) == len(
        run.model.trainable_parameters())
    for i in range(3):
        run.step(i)
    for n, p in run.model.image.named_parameters():
        assert torch.equal(p, loaded[n]), f"locked image weight {n} changed"
        assert p.grad is None
    assert any(not torch.equal(p, text_before[n]) for n, p in run.model.text.named_parameters())
    assert not image_ids & {id(p) for p in run.optimizer.adamw.state}


def test_lit_refuses_an_image_checkpoint_of_another_model(image_checkpoint):
    from megavit.checkpointing.model_state import CheckpointLoadError

    save = image_checkpoint
    flags = _flags("clip", 1, 1, ("--lock-image-tower", "--image-checkpoint", str(save),
                                  "--hidden-size", "64"))
    with pytest.raises(CheckpointLoadError, match="--hidden-size 32 in the checkpoint, 64 here"):
        image_text_run(parse_contrastive_args(flags), serial_state())


def _start_cli(*args: str) -> cli.Started:
    import os
    import sys

    from tests.test_checkpoint_cli import ROOT

    return cli.start([sys.executable, "-m", "megavit.pretrain_contrastive",
                      *_flags("siglip", 1, 1, ("--hidden-dropout", "0.1",
                                               "--log-interval", "1",
                                               "--progress-bar", "off")), *args],
                     timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _cli(*args: str):
    return _start_cli(*args).wait()


def test_contrastive_checkpoints_resume_exactly_and_convert(tmp_path):
    """3 iterations + save + resume to 6 log the uninterrupted run's losses (dropout on: the
    RNG streams are restored); the checkpoint consolidates into a safetensors file holding
    both towers, and a ViT run refuses it."""
    import json

    from safetensors.torch import load_file

    from tests.test_checkpoint_cli import pretrain, records

    save = tmp_path / "ckpt"
    runs = dict(zip(["straight", "first"], cli.run_parallel(   # independent: side by side
        _start_cli("--train-iters", "6", "--metrics-file", str(tmp_path / "s.jsonl")),
        _start_cli("--train-iters", "3", "--save", str(save),
                   "--metrics-file", str(tmp_path / "a.jsonl")))))
    runs["second"] = _cli("--train-iters", "6", "--load", str(save),
                          "--metrics-file", str(tmp_path / "b.jsonl"))
    for name, proc in runs.items():
        assert proc.returncode == 0, (name, proc.stdout + proc.stderr)
    assert f"loaded checkpoint | iteration 3 | path {save / 'iter_0000003'}" in \
        runs["second"].stdout
    straight = {r["iteration"]: r["loss"] for r in records(tmp_path / "s.jsonl", "train")}
    resumed = {r["iteration"]: r["loss"] for name in ("a", "b")
               for r in records(tmp_path / f"{name}.jsonl", "train")}
    assert resumed == straight and sorted(straight) == list(range(1, 7))
    info = json.loads((save / "iter_0000003" / "megavit_config.json").read_text())
    assert info["text"]["vocab_size"] == 128 and info["contrastive"]["loss"] == "siglip"

    from megavit.checkpointing.offline import read_tensors
    from megavit.checkpointing.safe_reader import check_checkpoint
    from tests.test_checkpoint_convert import convert

    file = tmp_path / "w.safetensors"
    proc = convert(str(save), "--to-safetensors", str(file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    weights = load_file(str(file))
    stored = read_tensors(save / "iter_0000003", check_checkpoint(save / "iter_0000003"),
                          ["model/logit_bias", "model/text.embedding.weight"])
    assert torch.equal(weights["logit_bias"], stored["model/logit_bias"])
    assert torch.equal(weights["text.embedding.weight"], stored["model/text.embedding.weight"])
    assert any(k.startswith("image.blocks.") for k in weights)

    refused = pretrain("--train-iters", "4", "--load", str(save))
    assert refused.returncode == 2 and "a two-tower checkpoint, a ViT run here" in refused.stderr

    # resharding keeps the tokenizer beside the tensors; a run with another tokenizer is refused
    assert convert(str(save), "--target-tensor-parallel-size", "2", "--output",
                   str(tmp_path / "tp2")).returncode == 0
    assert (tmp_path / "tp2" / "iter_0000003" / "tokenizer.model").read_bytes() == \
        (save / "iter_0000003" / "tokenizer.model").read_bytes()
    (save / "iter_0000003" / "tokenizer.model").write_bytes(b"another tokenizer")
    other = _cli("--train-iters", "6", "--load", str(save))
    assert other.returncode == 2 and "differs from this run's tokenizer.model" in other.stderr



def _merged(results: list[dict]) -> dict:
    """One result with every stage's weights and gradients (serial names are disjoint
    across stages; TP/DP replicas agree, as the per-rank checks show elsewhere)."""
    out = {"losses": results[-1]["losses"], "weights": {}, "grads": {},
           "eval": results[0]["eval"]}
    for r in results:
        assert r["losses"] == results[-1]["losses"]        # broadcast from the last stage
        out["weights"].update(r["weights"])
        out["grads"].update(r["grads"])
    return out


def test_pp2_matches_serial_with_the_text_tower_and_loss_on_the_last_stage(clip_teacher):
    """PP=2 (CLIP), PP=2 x DP=2 (SigLIP): the image tower's 2 blocks split over 2 stages, the
    text tower, projections and loss on stage 1. Ranks are (pp, dp): stage k of DP column d
    is rank 2k + d at PP=2 x DP=2."""
    pp = ("--pipeline-model-parallel-size", "2")
    teacher = _teacher(clip_teacher, "--recompute-granularity", "full", "--recompute-method",
                       "uniform", "--recompute-num-layers", "1")
    got = run_distributed(2, 1, {"clip": (_three_steps, (_flags("clip", 1, 1, pp),)),
                                 "teacher": (_three_steps, (_flags("clip", 1, 1,
                                                                   pp + teacher),))}, pp=2)
    _check([_merged(got["clip"])], _serial("clip"))
    _check([_merged(got["teacher"])], _serial("clip", teacher))
    assert got["teacher"][0]["teacher_checked"] and "teacher_checked" not in got["teacher"][1]
    got = run_distributed(4, 1, {"siglip": (_three_steps, (_flags("siglip", 1, 2, pp),))},
                          pp=2)["siglip"]
    _check([_merged([got[d], got[2 + d]]) for d in range(2)],
           _serial("siglip"))


def _lit_steps(pstate: ParallelState, flags: list[str]) -> dict:
    run = image_text_run(parse_contrastive_args(flags), pstate)
    before = full_state(run.model, pstate.tp)
    losses = [run.step(i).loss.item() for i in range(3)]
    return {"before": before, "after": full_state(run.model, pstate.tp), "losses": losses,
            "image_state": sum(1 for p in run.optimizer.adamw.state
                               if any(p is q for q in run.model.image.parameters()))}


def test_lit_at_pp2_runs_the_image_tower_forward_only_and_matches_serial(image_checkpoint):
    lit = ("--lock-image-tower", "--image-checkpoint", str(image_checkpoint))
    got = run_distributed(2, 1, {"lit": (_lit_steps, (_flags("clip", 1, 1, lit + (
        "--pipeline-model-parallel-size", "2")),))}, pp=2)["lit"]
    serial = _lit_steps(serial_state(), _flags("clip", 1, 1, lit))
    assert got[0]["losses"] == got[1]["losses"]
    assert got[1]["losses"] == pytest.approx(serial["losses"], rel=1e-5)
    for r in got:
        assert r["image_state"] == 0
        for name, w in r["after"].items():
            if name.startswith("image."):
                assert torch.equal(w, r["before"][name]), name
                assert torch.equal(w, serial["after"][name]), name
    assert any(not torch.equal(w, got[1]["before"][n]) for n, w in got[1]["after"].items()
               if n.startswith("text."))


def test_clip_queue_adds_past_batches_as_negatives_and_siglip_refuses_it():
    from megavit.config import ConfigError

    cfg = parse_contrastive_args(_flags("clip", 1, 1, ("--contrastive-queue-size", "40")))
    validate_contrastive(cfg)
    run = image_text_run(cfg, serial_state())
    plain = image_text_run(parse_contrastive_args(_flags("clip", 1, 1)), serial_state())
    first = [run.step(0).loss.item(), plain.step(0).loss.item()]
    assert first[0] == pytest.approx(first[1], rel=1e-6)     # an empty queue changes nothing
    assert len(run.task.queue) == GLOBAL_BATCH
    # same weights after the identical first step; now 16 queued rows are extra negatives
    queued, alone = run.step(1).loss.item(), plain.step(1).loss.item()
    assert queued > alone
    for i in range(2, 4):
        run.step(i)
    assert len(run.task.queue) == 40                               # oldest rows dropped
    with pytest.raises(ConfigError, match="--contrastive-queue-size adds negatives"):
        validate_contrastive(parse_contrastive_args(
            _flags("siglip", 1, 1, ("--contrastive-queue-size", "40"))))


@pytest.mark.parametrize("precision", [("--bf16",), ("--fp16", "--initial-loss-scale", "16")],
                         ids=["bf16", "fp16"])
def test_16_bit_training_follows_fp32(precision):
    """Three steps in bf16 / fp16 (fp32 masters; fp16 with a loss scale that does not
    overflow) stay within 3 % of the fp32 losses, and fp16 skips no step."""
    def losses(extra):
        run = image_text_run(parse_contrastive_args(_flags("siglip", 1, 1, extra)),
                                   serial_state())
        results = [run.step(i) for i in range(3)]
        assert not any(r.skipped for r in results)
        return [r.loss.item() for r in results]

    assert losses(precision) == pytest.approx(losses(()), rel=0.03)


def _lit_resumed(pstate: ParallelState, flags: list[str], save: str) -> dict:
    """4 straight steps, and 2 steps + save + a fresh run resumed for 2 more."""
    from megavit.checkpointing.checkpointer import resume, save_checkpoint

    straight = image_text_run(parse_contrastive_args(flags), pstate)
    losses = [straight.step(i).loss.item() for i in range(4)]
    first = image_text_run(parse_contrastive_args(flags), pstate)
    resumed = [first.step(i).loss.item() for i in range(2)]
    save_checkpoint(first, save, 2, 0, lambda line: None)
    second = image_text_run(parse_contrastive_args(flags), pstate)
    start = resume(second, save, lambda line: None)
    resumed += [second.step(i).loss.item() for i in range(start, 4)]
    return {"losses": losses, "resumed": resumed, "start": start}


def test_lit_at_pp2_resumes_exactly(tmp_path, image_checkpoint):
    """LiT over two stages (stage 0 trains nothing) resumes exactly: 2 + save + 2 steps give
    the losses of 4 straight steps. (Stage 0 has no Adam step of its own; every rank stores
    the same step value, so whichever copy DCP keeps is right. Here DCP kept the trained
    stage's copy even without that, so this test does not single it out.)"""
    flags = _flags("clip", 1, 1, ("--lock-image-tower", "--image-checkpoint",
                                  str(image_checkpoint),
                                  "--pipeline-model-parallel-size", "2", "--train-iters", "4"))
    got = run_distributed(2, 1, {"r": (_lit_resumed, (flags, str(tmp_path / "ck")))},
                          pp=2)["r"]
    for r in got:
        assert r["start"] == 2 and r["resumed"] == r["losses"]


def test_recompute_auto_is_refused_for_two_towers():
    from megavit.config import ConfigError

    with pytest.raises(ConfigError, match="--recompute-granularity auto plans"):
        validate_contrastive(parse_contrastive_args(_flags("clip", 1, 1, (
            "--recompute-granularity", "auto", "--activation-memory-budget-gb", "1"))))


def test_image_checkpoints_written_before_the_newer_model_fields_still_load(tmp_path,
                                                                         image_checkpoint):
    """A megavit.pretrain checkpoint whose config predates --normalization, --activation
    and --pre-norm resumes (their defaults assumed) and serves as LiT's image tower."""
    import json

    from megavit.checkpointing.checkpointer import resume
    from megavit.config import parse_args
    from megavit.tasks.classification import classification_run
    import shutil

    from tests.test_checkpoint_cli import COMMON

    save = tmp_path / "image"                  # a copy: its config is edited below
    shutil.copytree(image_checkpoint, save)
    config = save / "iter_0000001" / "megavit_config.json"
    info = json.loads(config.read_text())
    for field in ("normalization", "activation", "pre_norm"):
        del info["model"][field]
    config.write_text(json.dumps(info))
    run = classification_run(parse_args([*COMMON, "--train-iters", "2"]), serial_state())
    assert resume(run, str(save), lambda line: None) == 1
    flags = _flags("clip", 1, 1, ("--lock-image-tower", "--image-checkpoint", str(save)))
    image_text_run(parse_contrastive_args(flags), serial_state())


def test_two_tower_distillation_resumes_exactly_and_records_only_the_teachers_reference(
        tmp_path, clip_teacher, image_checkpoint):
    """A SigLIP student of the CLIP teacher: 2 iterations + save + resume to 4 log the
    uninterrupted run's losses and similarity terms; the checkpoint records the teacher's
    path and config hash, holds none of its tensors; the summary line carries the teacher's
    zero-shot accuracy and the ratio. A classifier teacher is refused by name, and
    megavit.distill refuses this two-tower teacher."""
    import hashlib
    import json

    from megavit.checkpointing.model_state import CheckpointLoadError
    from megavit.checkpointing.safe_reader import check_checkpoint
    from tests.test_checkpoint_cli import records

    teacher = ("--teacher-checkpoint", clip_teacher, "--eval-interval", "4")
    save = tmp_path / "ckpt"
    runs = dict(zip(["straight", "first"], cli.run_parallel(
        _start_cli(*teacher, "--train-iters", "4", "--metrics-file", str(tmp_path / "s.jsonl")),
        _start_cli(*teacher, "--train-iters", "2", "--save", str(save),
                   "--metrics-file", str(tmp_path / "a.jsonl")))))
    runs["second"] = _cli(*teacher, "--train-iters", "4", "--load", str(save),
                          "--metrics-file", str(tmp_path / "b.jsonl"))
    for name, proc in runs.items():
        assert proc.returncode == 0, (name, proc.stdout + proc.stderr)
    fields = ("loss", "similarity_loss")
    straight = {r["iteration"]: [r[f] for f in fields] for r in records(tmp_path / "s.jsonl",
                                                                         "train")}
    resumed = {r["iteration"]: [r[f] for f in fields] for name in ("a", "b")
               for r in records(tmp_path / f"{name}.jsonl", "train")}
    assert resumed == straight and sorted(straight) == [1, 2, 3, 4]
    summary = records(tmp_path / "b.jsonl", "summary")[-1]
    assert summary["teacher_zero_shot_accuracy"] > 0 and summary["student_teacher_ratio"] == \
        pytest.approx(summary["zero_shot_accuracy"] / summary["teacher_zero_shot_accuracy"])
    checkpoint = save / "iter_0000002"
    info = json.loads((checkpoint / "megavit_config.json").read_text())
    teacher_dir = Path(clip_teacher) / "iter_0000004"
    assert info["distillation"] == {
        "teacher_checkpoint": str(teacher_dir), "similarity_weight": 1.0,
        "teacher_config_sha256": hashlib.sha256(
            (teacher_dir / "megavit_config.json").read_bytes()).hexdigest()}
    stored = check_checkpoint(checkpoint).state_dict_metadata
    assert "model/text_proj.weight" in stored
    assert not any("teacher" in name for name in stored)

    with pytest.raises(CheckpointLoadError, match="a two-tower student distils a two-tower "
                                                  "teacher .* this is a classifier checkpoint"):
        image_text_run(parse_contrastive_args(_flags("clip", 1, 1, (
            "--teacher-checkpoint", str(image_checkpoint)))), serial_state())
    from megavit.config.distillation import parse_distillation_args
    from megavit.tasks.distillation.task import DistillationTask
    from megavit.training.run import Run

    with pytest.raises(CheckpointLoadError, match="a two-tower checkpoint; megavit.distill "
                                                  "distils classifiers"):
        Run.build(DistillationTask(parse_distillation_args(
            ["--preset", "vit-debug", "--teacher-checkpoint", clip_teacher])), serial_state())


def test_the_similarity_term_is_open_clips_rule_on_both_models_embeddings(clip_teacher,
                                                                        tmp_path):
    """One serial step of a SigLIP student: the logged term equals open_clip's rule written
    out on the student's embeddings (its scale exp(t')) and the teacher's own (its images
    through its preprocessing, the captions through its tokenizer, its scale); a tokenizer
    file that is not the teacher's is refused by name."""
    from megavit.data.tokenizer import TokenizerError
    from megavit.tasks.distillation.losses import similarity_distillation
    from megavit.tasks.distillation.task import teacher_input

    run = image_text_run(parse_contrastive_args(_flags("siglip", 1, 1, _teacher(clip_teacher))),
                         serial_state())
    task, model = run.task, run.model
    images, ids, teacher_ids = next(iter(run.batches(0, 1)))
    teacher = task.teacher.model
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(ids)
        scale = model.logit_scale.exp()
        t_image = teacher.encode_image(teacher_input(images, task.train_set.preprocessing,
                                                     task.teacher.preprocessing))
        t_text = teacher.encode_text(teacher_ids)
        t_scale = teacher.logit_scale.exp().clamp(max=100.0)
        want = similarity_distillation(scale * image @ text.T, t_scale * t_image @ t_text.T,
                                       scale * text @ image.T, t_scale * t_text @ t_image.T)
    assert teacher_ids.shape[1] == 12 != ids.shape[1]        # its own context length
    run.step(0, (images, ids, teacher_ids))
    assert task.similarity_values[0].item() == pytest.approx(want.item(), rel=1e-5)

    other = tmp_path / "other.model"
    other.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="other.model"):
        image_text_run(parse_contrastive_args(_flags("siglip", 1, 1, _teacher(
            clip_teacher, "--teacher-tokenizer-model", str(other)))), serial_state())
