"""Response distillation (megavit/tasks/distillation, `python -m megavit.distill`): a student
trained on the labels and on a frozen teacher's logits equals the serial run at TP=2 x DP=2
with the distributed optimizer (plain, and with sequence parallelism over an odd token
count and selective recomputation) and at PP=2 (full recomputation; interleaved stages):
losses, gradients and weights after two steps. The teacher's weights are bit-identical
after training, it has no gradient and no optimizer state, and the student's checkpoint
holds none of it (a reference and its config's hash).

The feature term (pairs of student and teacher blocks through a learned projection, MSE or
cosine) is checked the same way, its blocks' maps travelling between pipeline stages, and
equals its formula written out on the models' own maps.

The relation term (MiniLMv2: Q-Q, K-K, V-V relations of paired blocks, re-split into
relation heads; its loss enters the backward pass wherever the student block runs) is
checked the same way — under TP its relation heads split over the ranks with the
attention heads, under PP one pair sits on the first stage, under full recomputation its
loss is made again in backward — and its value equals the formula on the models' own
queries, keys and values.

The teacher (3 blocks, 20x20 px like the students: 25 tokens, odd, padded under SP;
trained 3 steps) is saved once per module by the serial run; the feature formula check
uses a 16x16 px student, so the teacher's 5x5 maps are resized to its 4x4 grid. One
process group per layout runs every check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import pytest
import torch

from megavit.checkpointing.checkpointer import resume, save_checkpoint
from megavit.config.distillation import DistillationConfig, DistillationRunConfig
from megavit.parallel.sharding import full_state
from megavit.parallel.state import ParallelState, serial_state
from megavit.tasks.classification import classification_run
from megavit.tasks.distillation.task import DistillationTask, teacher_input
from megavit.training.run import Run
from tests import cli
from tests.harness import run_distributed
from tests.scenarios import debug_config, train_steps, uncounted
from tests.test_checkpoint_cli import ROOT
from tests.test_tensor_parallel import adam_first_order_bound, assert_tensors_close

RTOL = 1e-5
SP_SELECTIVE = {"sequence_parallel": True, "recompute_granularity": "selective",
                "use_distributed_optimizer": True}
PP2_FULL = {"pipeline_model_parallel_size": 2, "recompute_granularity": "full",
            "recompute_method": "uniform", "recompute_num_layers": 1}
PP2_INTERLEAVED = {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1}
SOFT = dict(distill_loss="soft", distill_alpha=0.5, distill_temperature=2.0)
HARD = dict(distill_loss="hard", distill_alpha=0.7)
# feature pairs (student block : teacher block; both on a 5x5 grid): under PP=2 (2 blocks a
# stage) block 0's map travels from stage 0 to the loss on stage 1; interleaved (1 block a
# chunk) block 1's goes stage 1 -> 0 -> 1. Relation pairs: under PP=2 block 1's relation
# loss is made on stage 0, block 2's on stage 1 (full recomputation: in backward); under
# TP=2 (+SP) each rank holds one of the 2 relation heads.
SOFT_FEATURES = dict(SOFT, distill_feature_pairs="0:0,3:2", distill_feature_weight=0.5,
                     distill_relation_pairs="1:0,2:1", distill_relation_weight=2.0)
HARD_COSINE = dict(HARD, distill_feature_pairs="0:1", distill_feature_loss="cosine",
                   distill_relation_pairs="1:2", distill_relation_heads=2,
                   distill_pooled_weight=0.3)     # + pooled features (cosine too)
SOFT_POOLED = dict(SOFT, distill_pooled_weight=0.5)
TOKEN = dict(distill_loss="token", distill_alpha=0.5)      # DeiT's distillation token
TOKEN_FEATURE = dict(TOKEN, distill_feature_pairs="1:2")
# name: (world, tp, pp, [(ParallelConfig overrides, distillation settings) per check])
LAYOUTS = {"tp2dp2": (4, 2, 1, [({"use_distributed_optimizer": True}, TOKEN),
                                (SP_SELECTIVE, HARD_COSINE)]),
           "pp2": (2, 1, 2, [(PP2_FULL, SOFT_FEATURES), (PP2_INTERLEAVED, TOKEN_FEATURE)])}


def teacher_config():
    return debug_config(layers=3, model=dict(drop_path_rate=0.0))      # 20x20 px, 25 tokens


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """The serial teacher after three steps, as a --save directory."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = teacher_config()
    run = classification_run(cfg, serial_state())
    train_steps(serial_state(), cfg, steps=3, run=run)
    save_checkpoint(run, str(root), 3, 0, lambda line: None)
    return str(root)


def student_config(teacher: str, tp: int = 1, parallel: dict | None = None,
                   distill: dict | None = None) -> DistillationRunConfig:
    """vit-debug at 20x20 px (2 blocks; 4 under pipeline parallelism), digits."""
    layers = 4 if parallel and parallel.get("pipeline_model_parallel_size") else 2
    base = debug_config(tp=tp, parallel=parallel, layers=layers)
    return DistillationRunConfig(base, DistillationConfig(teacher_checkpoint=teacher,
                                                          **(distill or SOFT)))


def resumed_and_straight(pstate: ParallelState, cfg: DistillationRunConfig, path: str
                         ) -> dict:
    """Four steps straight, and two steps, a checkpoint (the real one: its description
    names the teacher), a new run resumed from it, two more steps."""
    from tests.test_checkpoint_resume import _steps

    straight = Run.build(DistillationTask(cfg), pstate)
    losses = _steps(straight, 0, 4)
    first = Run.build(DistillationTask(cfg), pstate)
    resumed = _steps(first, 0, 2)
    save_checkpoint(first, path, 2, 0, lambda line: None)
    second = Run.build(DistillationTask(cfg), pstate)
    lines: list[str] = []
    start = resume(second, path, lines.append)
    resumed += _steps(second, start, 4)
    return {"start": start, "losses": losses, "resumed_losses": resumed, "lines": lines,
            "straight": full_state(straight.model, pstate.tp),
            "resumed": full_state(second.model, pstate.tp)}


def distilled_steps(pstate: ParallelState, cfg: DistillationRunConfig) -> dict:
    """Two steps' losses, gradients and weights; the teacher's weights before and after
    (first stage) and what it trains."""
    task = DistillationTask(cfg)
    run = Run.build(task, pstate)
    teacher = task.teacher.model if task.teacher is not None else None
    before = uncounted(pstate, full_state, teacher, pstate.tp) if teacher is not None else None
    out = train_steps(pstate, cfg.base, steps=2, run=run)
    if teacher is not None:
        out["teacher_before"] = before
        out["teacher_after"] = uncounted(pstate, full_state, teacher, pstate.tp)
        out["teacher_trainable"] = [n for n, p in teacher.named_parameters() if p.requires_grad]
        out["teacher_in_optimizer"] = any(   # what the optimizer trains: its segments
            seg.param is q for seg in run.optimizer.segments for q in teacher.parameters())
        assert run.optimizer.segments        # (the student's are there)
    out["evaluation"] = run.evaluate()
    return out


def merged(results: list[dict], pp: int) -> list[dict]:
    """One whole-student result per rank of the first stage: its stages' tensors joined."""
    column = len(results) // pp
    out = []
    for c in range(column):
        ranks = [results[k * column + c] for k in range(pp)]
        whole = {"loss": ranks[-1]["loss"], "grad_norm": ranks[-1]["grad_norm"],
                 "weights": {}, "initial": {}, "grads": [{}, {}]}
        for r in ranks:
            whole["weights"].update(r["weights"])
            whole["initial"].update(r["initial"])
            for step in range(2):
                whole["grads"][step].update(r["grads"][step])
        out.append(whole)
    return out


@functools.lru_cache(maxsize=None)
def serial(layers: int, distill_items: tuple, teacher: str) -> dict:
    cfg = student_config(teacher, distill=dict(distill_items))
    cfg.base.model = dataclasses.replace(cfg.base.model, num_layers=layers)
    return distilled_steps(serial_state(), cfg)


@functools.lru_cache(maxsize=None)
def layout_results(name: str, teacher: str, resume_dir: str, cache: str) -> dict:
    """Every job of layout `name` in one gloo process group (run once per module)."""
    world, tp, pp, checks = LAYOUTS[name]
    jobs = {f"c{i}": (distilled_steps, (student_config(teacher, tp, parallel, distill),))
            for i, (parallel, distill) in enumerate(checks)}
    if pp > 1:     # resume mid-distillation, with feature pairs crossing the stages
        parallel, distill = checks[0]
        jobs["resume"] = (resumed_and_straight, (student_config(teacher, tp, parallel, distill),
                                                 resume_dir))
        # from the offline cache (K = all 10 classes, pooled features): as the serial run
        # with the teacher
        jobs["cache"] = (distilled_steps, (student_config(teacher, tp, PP2_FULL, dict(
            SOFT_POOLED, distill_cache=cache)),))
    return run_distributed(world, tp, jobs, pp=pp)


# tools/cache_teacher.py with the flags of `student_config`'s data (debug_config: digits,
# 20x20 px, affine augmentation, seed 7, micro-batches of 2 in global batches of 8)
CACHE_FLAGS = ["--preset", "vit-debug", "--num-channels", "1", "--img-h", "20", "--img-w",
               "20", "--dataset", "digits", "--augment", "affine", "--seed", "7",
               "--micro-batch-size", "2", "--global-batch-size", "8", "--eval-iters", "2",
               "--progress-bar", "off"]


def cache_teacher(*args: str):
    return cli.run([sys.executable, str(ROOT / "tools" / "cache_teacher.py"), *args],
                   capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def teacher_cache(teacher, tmp_path_factory) -> str:
    """The teacher's logits (K = 10: every class) and pooled features for the students'
    first 2 iterations, one shard an iteration."""
    out = str(tmp_path_factory.mktemp("cache"))
    proc = cache_teacher("--output", out, "--top-k", "10", "--shard-iterations", "1",
                         "--pooled-features",
                         "--teacher-checkpoint", teacher, "--train-iters", "2", *CACHE_FLAGS)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def resume_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, teacher, resume_dir, teacher_cache):
    return request.param, layout_results(request.param, teacher, resume_dir, teacher_cache)


def test_distillation_matches_serial(layout, teacher):
    name, results = layout
    world, tp, pp, checks = LAYOUTS[name]
    for i, (parallel, distill) in enumerate(checks):
        cfg = student_config(teacher, tp, parallel, distill)
        ref = serial(cfg.base.model.num_layers, tuple(sorted(distill.items())), teacher)
        what = f"{name}[{i}]"
        for got in merged(results[f"c{i}"], pp):
            assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), what
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), what
            for step in range(2):
                assert_tensors_close(got["grads"][step], ref["grads"][step],
                                     f"{what} step {step} grad")
            bound = adam_first_order_bound(ref, got, debug_config())
            for k, w in ref["weights"].items():
                err = (got["weights"][k] - w).abs()
                allowed = 1e-6 * w.abs().max() + 1e-8 + bound[k]
                assert torch.all(err <= allowed), f"{what} weight {k}: max error {err.max():.3e}"
        first_stage = results[f"c{i}"][:world // pp]
        for rank in first_stage:               # the teacher lives on the first stage
            assert rank["teacher_trainable"] == [] and not rank["teacher_in_optimizer"]
            for k, w in rank["teacher_before"].items():
                assert torch.equal(rank["teacher_after"][k], w), f"{what} teacher {k} changed"
            assert_tensors_close(rank["teacher_before"], ref["teacher_before"],
                                 f"{what} teacher loaded", rtol=0, atol=0)
        for rank in results[f"c{i}"]:          # every rank reports the same evaluation
            assert rank["evaluation"]["teacher_accuracy"] == pytest.approx(
                ref["evaluation"]["teacher_accuracy"]), what
            assert rank["evaluation"]["eval_accuracy"] == pytest.approx(
                ref["evaluation"]["eval_accuracy"]), what
    if "cache" in results:      # the offline cache at PP=2 = the serial run with the teacher
        ref = serial(4, tuple(sorted(SOFT_POOLED.items())), teacher)
        for got in merged(results["cache"], pp):
            assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), "cache"
            for step in range(2):
                assert_tensors_close(got["grads"][step], ref["grads"][step], f"cache {step}")


def test_a_resumed_distillation_equals_the_uninterrupted_one(teacher, resume_dir, teacher_cache,
                                                            tmp_path):
    """At PP=2 with feature pairs (the pp2 group's job): bitwise the same losses and
    weights; resuming with another teacher says so."""
    for r in layout_results("pp2", teacher, resume_dir, teacher_cache)["resume"]:
        assert r["start"] == 2 and r["resumed_losses"] == r["losses"]
        for k, w in r["straight"].items():
            assert torch.equal(r["resumed"][k], w), k
        assert not any("another teacher" in line or "distilled from" in line
                       for line in r["lines"])
    # resumed in one process with another teacher: a note, and the training goes on
    save = tmp_path / "s"
    cfg = student_config(teacher)
    run = Run.build(DistillationTask(cfg), serial_state())
    save_checkpoint(run, str(save), 1, 0, lambda line: None)
    described = save / "iter_0000001" / "megavit_config.json"
    info = json.loads(described.read_text())
    info["distillation"]["teacher_config_sha256"] = "0" * 64
    described.write_text(json.dumps(info))
    lines: list[str] = []
    assert resume(Run.build(DistillationTask(cfg), serial_state()), str(save),
                  lines.append) == 1
    assert any("distilled from the teacher at" in line and "sha256 000000000000" in line
               for line in lines), lines


def test_the_offline_cache_continues_and_refuses_what_does_not_fit(teacher, teacher_cache,
                                                                   tmp_path):
    """A longer --train-iters writes only the missing shards; a serial student from the
    cache logs the losses of the student with the teacher online; a cache of other data
    is refused by the tool and by the student, naming the field; a truncated shard is
    named, and the tool run again rewrites it; top-3 logits keep the teacher's top class."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(teacher_cache, cache)
    more = cache_teacher("--output", str(cache), "--top-k", "10", "--shard-iterations", "1",
                         "--pooled-features", "--teacher-checkpoint", teacher,
                         "--train-iters", "3", *CACHE_FLAGS)
    assert more.returncode == 0, more.stderr
    assert "shards to write 1 of 3" in more.stdout, more.stdout
    with_teacher = distilled_steps(serial_state(), student_config(teacher, distill=SOFT_POOLED))
    from_cache = distilled_steps(serial_state(), student_config(teacher, distill=dict(
        SOFT_POOLED, distill_cache=str(cache))))
    assert from_cache["loss"] == pytest.approx(with_teacher["loss"], rel=1e-6)
    without = cache_teacher("--output", str(cache), "--top-k", "10", "--shard-iterations", "1",
                            "--teacher-checkpoint", teacher, "--train-iters", "3",
                            *CACHE_FLAGS)
    assert without.returncode == 2 and "pooled_features: True in the cache, False here" in \
        without.stderr, without.stderr
    other = cache_teacher("--output", str(cache), "--teacher-checkpoint", teacher,
                          "--train-iters", "3", *CACHE_FLAGS[:-6], "--seed", "8",
                          *CACHE_FLAGS[-6:])
    assert other.returncode == 2 and "seed: 7 in the cache, 8 here" in other.stderr, other.stderr
    cfg = student_config(teacher, distill=dict(SOFT, distill_cache=str(cache)))
    cfg.base.training = dataclasses.replace(cfg.base.training, global_batch_size=16)
    with pytest.raises(Exception, match="global_batch_size: 8 in the cache, 16 here"):
        Run.build(DistillationTask(cfg), serial_state())
    cfg = student_config(teacher, distill=dict(SOFT, distill_cache=str(cache)))
    cfg.base.training = dataclasses.replace(cfg.base.training, train_iters=5)
    with pytest.raises(Exception, match="no rows for iterations 3..4"):
        Run.build(DistillationTask(cfg), serial_state())
    shard = cache / "shard_00000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    task = DistillationTask(student_config(teacher, distill=dict(SOFT,
                                                                 distill_cache=str(cache))))
    run = Run.build(task, serial_state())
    with pytest.raises(Exception, match="shard_00000001.safetensors: damaged or truncated"):
        for _ in run.batches(0, 2):
            pass
    again = cache_teacher("--output", str(cache), "--top-k", "10", "--shard-iterations", "1",
                          "--pooled-features", "--teacher-checkpoint", teacher,
                          "--train-iters", "3", *CACHE_FLAGS)
    assert again.returncode == 0 and "rewriting 1 missing or damaged" in again.stdout, \
        again.stdout + again.stderr
    assert len(list(Run.build(DistillationTask(student_config(teacher, distill=dict(
        SOFT, distill_cache=str(cache)))), serial_state()).batches(0, 2))) == 2
    top3 = tmp_path / "top3"
    assert cache_teacher("--output", str(top3), "--top-k", "3", "--teacher-checkpoint",
                         teacher, "--train-iters", "2", *CACHE_FLAGS).returncode == 0
    task = DistillationTask(student_config(teacher, distill=dict(SOFT,
                                                                 distill_cache=str(top3))))
    run = Run.build(task, serial_state())
    mb = next(iter(run.batches(0, 1)))[0]
    full = next(iter(Run.build(DistillationTask(student_config(teacher)),
                               serial_state()).batches(0, 1)))[0]
    cached, online = mb.labels[:, 10:], full.labels[:, 10:]
    assert torch.equal(cached.argmax(-1), online.argmax(-1))
    top = online.topk(3, dim=-1)
    torch.testing.assert_close(cached.gather(1, top.indices), top.values)
    from megavit.tasks.distillation.cache import TeacherCacheError

    with pytest.raises(TeacherCacheError, match="holds no pooled features"):   # written without
        Run.build(DistillationTask(student_config(teacher, distill=dict(
            SOFT_POOLED, distill_cache=str(top3)))), serial_state())


def test_the_distillation_term_moves_the_student(teacher):
    """alpha 0 is plain classification of the same student; alpha > 0 changes the loss by
    the distillation term exactly as losses.py mixes it (checked on the first step's
    loss, from the same initial weights)."""
    plain = serial(2, tuple(sorted(SOFT.items())), teacher)
    cfg = student_config(teacher, distill=dict(SOFT, distill_alpha=0.0))
    alone = distilled_steps(serial_state(), cfg)
    base = train_steps(serial_state(), cfg.base, steps=2)
    assert alone["loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert plain["loss"][0] != pytest.approx(base["loss"][0], rel=1e-3)


def test_the_feature_term_is_the_distance_of_the_projected_maps(teacher):
    """On one micro-batch: the task's loss minus its response part equals the weight times
    the mean over pairs of the MSE between the student block's map (from
    forward_intermediates, through the pair's projection) and the teacher block's map
    resized bilinearly to the student's 4x4 grid (16x16 px), plus the pooled weight times
    the MSE between the student's pooled features (through their projection) and the
    teacher's."""
    import torch.nn.functional as F

    from megavit.tasks.distillation.losses import response_loss

    pairs = dict(SOFT, distill_feature_pairs="0:0,1:2", distill_feature_weight=0.5,
                 distill_pooled_weight=0.25)
    cfg = student_config(teacher, distill=pairs)
    cfg.base.model = dataclasses.replace(cfg.base.model, drop_path_rate=0.0, img_h=16,
                                         img_w=16)            # no ids needed; a 4x4 grid
    task = DistillationTask(cfg)
    run = Run.build(task, serial_state())
    mb = next(iter(run.batches(0, 1)))[0]
    student = run.model.chunks[0]
    output = student(mb.images)
    loss = task.distillation_loss(output, mb.labels)
    logits = output[:, :10]
    response = response_loss("soft", task.loss_fn(logits, mb.labels[:, :10]), logits,
                             mb.labels[:, 10:20], 0.5, 2.0)
    x = teacher_input(mb.images, task.train_set.preprocessing, task.teacher.preprocessing)
    teacher_maps = task.teacher.model.forward_intermediates(x, [0, 2])
    student_maps = student.forward_intermediates(mb.images, [0, 1])
    terms = []
    for k, (s_map, t_map) in enumerate(zip(student_maps, teacher_maps)):
        proj = student.feature_projections[k]
        s_tokens = proj(s_map.permute(0, 2, 3, 1))                    # [m, 4, 4, 32]
        t_tokens = F.interpolate(t_map, size=(4, 4), mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
        terms.append(((s_tokens - t_tokens) ** 2).mean())
    pooled: list[torch.Tensor] = []
    student.output_and_intermediates(mb.images, [], with_output=False, pooled=pooled)
    student.train()
    _, teacher_pooled = task.teacher_logits_and_pooled(mb.images, torch.float32)
    pooled_term = ((student.pooled_projection(pooled[0]) - teacher_pooled) ** 2).mean()
    assert loss.item() == pytest.approx(response.item() + 0.5 * (terms[0] + terms[1]).item() / 2
                                        + 0.25 * pooled_term.item(), rel=1e-5)
    assert (terms[0] + terms[1]).item() > 1e-3          # the term is not vanishing
    assert pooled_term.item() > 1e-3


def test_the_relation_term_is_minilm_on_the_blocks_queries_keys_and_values(teacher):
    """One micro-batch through a student with relation pairs 0:0 and 1:2 (2 relation
    heads): each link's recorded value is `relation_distillation` of the q, k, v the
    student block's attention core receives against those the teacher block's core
    receives when the teacher runs alone on the micro-batch's images (not the ones that
    travelled with the labels); the term changes the student's gradients."""
    from megavit.tasks.distillation.losses import relation_distillation

    pairs = dict(SOFT, distill_relation_pairs="0:0,1:2", distill_relation_heads=2)
    cfg = student_config(teacher, distill=pairs)
    cfg.base.model = dataclasses.replace(cfg.base.model, drop_path_rate=0.0)
    task = DistillationTask(cfg)
    run = Run.build(task, serial_state())
    mb = next(iter(run.batches(0, 1)))[0]
    student = run.model.chunks[0]
    seen: dict[int, torch.Tensor] = {}

    def tap(store, key, inner):     # records the core's [q | k | v], then runs `inner`
        return lambda qkv, ids: (store.__setitem__(key, qkv), inner(qkv, ids))[1]
    for (i, _), link in zip(task.relation_pairs, task.links):
        student.blocks[str(i)].attention.relation = tap(seen, i, link)
    teacher_qkv: dict[int, torch.Tensor] = {}
    for j in (0, 2):
        core = task.teacher.model.blocks[str(j)].attention
        core.relation = tap(teacher_qkv, j, core.relation)
    x = teacher_input(mb.images, task.train_set.preprocessing, task.teacher.preprocessing)
    with torch.no_grad():
        task.teacher.model(x)

    def qkv_of(out):       # [s, b, 3h] -> q, k, v [b, s, h]
        return tuple(part.transpose(0, 1) for part in out.chunk(3, dim=-1))
    for link in task.links:
        link.values, link.micro_batches = [], 1
    grads = {}
    for weight in (1.0, 0.0):
        for link in task.links:
            link.weight = weight
        out = student(mb.images, mb.sample_ids)
        grads[weight] = torch.autograd.grad(task.distillation_loss(out, mb.labels),
                                            student.blocks["0"].in_proj.weight)[0]
    for link, (i, j) in zip(task.links, [(0, 0), (1, 2)]):
        want = relation_distillation(qkv_of(seen[i].detach()), qkv_of(teacher_qkv[j]), 2)
        assert link.values[0].item() == pytest.approx(want.item(), rel=1e-5)
        assert want.item() > 1e-6
    assert not torch.allclose(grads[1.0], grads[0.0])


def test_feature_pairs_are_checked_against_both_models(teacher):
    from megavit.config import ConfigError

    with pytest.raises(ConfigError, match="teacher block 5 outside 0..2"):
        Run.build(DistillationTask(student_config(teacher, distill=dict(
            SOFT, distill_feature_pairs="0:5"))), serial_state())
    cfg = student_config(teacher, distill=dict(SOFT, distill_feature_pairs="0:0"))
    cfg.base.model = dataclasses.replace(cfg.base.model, img_w=24)      # a 5x6 grid
    with pytest.raises(ConfigError, match="different aspect ratios"):
        Run.build(DistillationTask(cfg), serial_state())
    cfg = student_config(teacher, distill=dict(SOFT, distill_relation_pairs="0:0"))
    cfg.base.model = dataclasses.replace(cfg.base.model, img_h=16, img_w=16)   # 16 tokens
    with pytest.raises(ConfigError, match="student block 0 sees 16 tokens, teacher block 0 25"):
        Run.build(DistillationTask(cfg), serial_state())


def test_the_distillation_token_has_its_own_head_averaged_at_evaluation():
    """[cls | dist | registers | patches]; pooling leaves the token out; training returns
    both heads' logits, evaluation their mean (DeiT)."""
    from megavit.config import preset_model_config
    from megavit.models.transformer import Runtime
    from megavit.models.vit import build_vit

    for pooling in ("cls", "gap", "map"):
        cfg = preset_model_config("vit-debug", num_channels=1, img_h=16, img_w=16,
                                  num_classes=5, pooling=pooling, num_registers=1,
                                  distillation_token=True, drop_path_rate=0.0)
        model = build_vit(cfg, Runtime(serial_state().tp), 0)
        x = torch.randn(3, 1, 16, 16)
        tokens = model.embed(x)
        at = int(pooling == "cls")
        torch.testing.assert_close(tokens[at, 0], model.dist_token)
        assert cfg.prefix_tokens == 2 + at and tokens.shape[0] == 16 + cfg.prefix_tokens
        both = model(x)
        assert both.shape == (3, 10)
        hidden = torch.randn(cfg.seq_length, 3, cfg.hidden_size)
        normed = model.norm(hidden)
        pooled = (normed[0] if pooling == "cls" else normed[2:].mean(0) if pooling == "gap"
                  else model.map_head(normed[2:]))
        torch.testing.assert_close(model.pool(hidden), pooled)
        model.eval()
        with torch.no_grad():
            want = (model.head(pooled) + model.head_dist(normed[at])) / 2
            torch.testing.assert_close(model.output(hidden), want)


def test_teacher_input_renormalises_and_resizes():
    from megavit.data.preprocessing import Preprocessing

    student = Preprocessing(mean=(0.5,), std=(0.25,), channels=1, height=4, width=4)
    same = dataclasses.replace(student)
    other = Preprocessing(mean=(0.1,), std=(0.5,), channels=1, height=2, width=2)
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(teacher_input(x, student, same), x)
    pixels = x * 0.25 + 0.5
    want = torch.nn.functional.interpolate((pixels - 0.1) / 0.5, size=(2, 2), mode="bilinear",
                                           align_corners=False, antialias=True)
    torch.testing.assert_close(teacher_input(x, student, other), want)


def distill_cli(*args: str):
    return cli.run([sys.executable, "-m", "megavit.distill", "--preset", "vit-debug",
                    "--num-channels", "1", "--img-h", "8", "--img-w", "8", "--patch-dim", "2",
                    "--num-layers", "1", "--dataset", "digits", "--micro-batch-size", "8",
                    "--global-batch-size", "8", "--log-interval", "1", "--eval-iters", "2",
                    "--progress-bar", "off", *args],
                   capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_the_cli_distils_saves_the_student_only_and_names_bad_teachers(teacher, tmp_path):
    save = tmp_path / "student"
    proc = distill_cli("--teacher-checkpoint", teacher, "--train-iters", "2", "--save",
                       str(save), "--distill-pooled-weight", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the pooled projection is saved with the student; a one-process load reads it back
    from megavit.checkpointing.inference import load_for_inference

    loaded = load_for_inference(save)
    assert loaded.info["distillation"]["pooled_width"] == 32
    assert loaded.model.pooled_projection.weight.shape == (32, 32)
    assert loaded.model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    from megavit.interop.export_hf import export_plan     # exports say they drop them

    plan = export_plan("timm", loaded.info, loaded.model_config, None, loaded.checkpoint)
    assert any("a distilled student" in note for note in plan.notes), plan.notes
    assert "teacher: " in proc.stdout and "frozen, forward only" in proc.stdout
    done = proc.stdout.splitlines()[-1]
    for key in ("student_accuracy", "teacher_accuracy", "student_teacher_ratio"):
        assert f"| {key} " in done, done
    described = json.loads((save / "iter_0000002" / "megavit_config.json").read_text())
    ref = described["distillation"]
    assert ref["teacher_checkpoint"].endswith("iter_0000003") and len(
        ref["teacher_config_sha256"]) == 64
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(save / "iter_0000002")).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if k.startswith("model/")}
    assert model_keys and not any("teacher" in k for k in keys)
    assert len({k for k in model_keys if ".blocks." in k or k.startswith("model/blocks.")}
               ) > 0
    # bad teachers: missing, not a classifier's classes, a file
    missing = distill_cli("--teacher-checkpoint", str(tmp_path / "none"), "--train-iters", "1")
    assert missing.returncode == 2 and "--teacher-checkpoint" in missing.stderr and \
        "no such directory" in missing.stderr
    classes = distill_cli("--teacher-checkpoint", teacher, "--num-classes", "12",
                          "--train-iters", "1")
    assert classes.returncode == 2 and "the teacher has 10 classes, the student 12" in \
        classes.stderr, classes.stderr
    none = distill_cli("--train-iters", "1")
    assert none.returncode == 2 and "--teacher-checkpoint is required" in none.stderr
