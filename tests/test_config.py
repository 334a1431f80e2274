"""Configuration: presets, flags generated from the dataclasses, and validation messages."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from megavit.config import (PRESETS, Config, ConfigError, ModelConfig, TextConfig,
                            TransformerConfig, contrastive_parser, flag_names, parse_args,
                            parse_contrastive_args, section_from_dict, section_to_dict, validate)
from megavit.config.model import TEXT_BLOCK_FLAGS
from megavit.pretrain import main
from tests import cli

# width / depth / heads / MLP / patch, as the issue lists them
EXPECTED = {
    "vit-ti": (192, 12, 3, 768, 16), "vit-s": (384, 12, 6, 1536, 16),
    "vit-b": (768, 12, 12, 3072, 16), "vit-l": (1024, 24, 16, 4096, 16),
    "vit-h": (1280, 32, 16, 5120, 14), "vit-g": (1408, 40, 16, 6144, 14),
    "vit-G": (1664, 48, 16, 8192, 14), "vit-e": (1792, 56, 16, 15360, 14),
    "vit-22b": (6144, 48, 48, 24576, 14), "vit-debug": (32, 2, 4, 128, 4),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_dimensions(name):
    m = parse_args(["--preset", name]).model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.ffn_hidden_size,
            m.patch_dim) == EXPECTED[name]
    assert set(PRESETS) == set(EXPECTED)


def test_vit22b_preset_is_the_paper_recipe():
    m = parse_args(["--preset", "vit-22b"]).model
    assert (m.img_h, m.img_w, m.seq_length) == (224, 224, 256)
    assert m.block_type == "parallel" and m.qk_layernorm and m.pooling == "map"
    assert not m.add_qkv_bias and not m.norm_bias and m.add_mlp_bias


def test_flags_override_the_preset():
    m = parse_args(["--preset", "vit-b", "--num-layers", "4", "--img-h", "32", "--img-w", "48",
                    "--patch-dim", "8", "--num-channels", "1", "--num-classes", "7",
                    "--no-qk-layernorm", "--block-type", "sequential"]).model
    assert (m.num_layers, m.hidden_size, m.img_h, m.img_w, m.patch_dim) == (4, 768, 32, 48, 8)
    assert (m.num_channels, m.num_classes, m.qk_layernorm, m.block_type) == (1, 7, False, "sequential")


def test_every_section_has_megatron_flag_names():
    flags = set(flag_names())
    for f in ["--tensor-model-parallel-size", "--micro-batch-size", "--global-batch-size",
              "--clip-grad", "--lr", "--min-lr", "--lr-decay-style", "--lr-warmup-iters",
              "--train-iters", "--log-interval", "--eval-interval", "--img-h", "--img-w",
              "--patch-dim", "--num-channels", "--num-layers", "--hidden-size",
              "--num-attention-heads", "--ffn-hidden-size", "--num-classes", "--preset",
              "--dataset", "--data-path", "--seed", "--metrics-file"]:
        assert f in flags, f


def test_both_towers_share_one_transformer_config():
    """The image model is a TransformerConfig; the text tower holds one, set by the --text-*
    flags (same names as before), with CLIP's fixed settings where no flag exists, and
    written to megavit_config.json in the flat form the flags use."""
    cfg = parse_contrastive_args(["--preset", "vit-debug", "--text-preset", "text-debug",
                                  "--text-hidden-size", "48", "--text-activation", "gelu_tanh",
                                  "--text-block-type", "parallel", "--text-norm-epsilon",
                                  "1e-6", "--context-length", "12"])
    assert isinstance(cfg.model, TransformerConfig)
    blocks = cfg.text.blocks
    assert type(blocks) is TransformerConfig
    assert (blocks.hidden_size, blocks.num_layers, blocks.activation, blocks.block_type,
            blocks.norm_epsilon) == (48, 2, "gelu_tanh", "parallel", 1e-6)
    assert (blocks.add_qkv_bias, blocks.add_proj_bias, blocks.norm_bias, blocks.qk_layernorm,
            blocks.hidden_dropout) == (True, True, True, False, 0.0)
    flat = section_to_dict(cfg.text)
    assert flat["text_hidden_size"] == 48 and flat["context_length"] == 12
    assert "add_qkv_bias" not in flat and "text_add_qkv_bias" not in flat
    assert section_from_dict(TextConfig, flat) == cfg.text
    with pytest.raises(TypeError, match="text_dropout"):
        section_from_dict(TextConfig, {**flat, "text_dropout": 0.1})
    # every text block flag is a field of the one TransformerConfig
    text_flags = {f for f in flag_names_of(contrastive_parser()) if f.startswith("--text-")}
    for name in TEXT_BLOCK_FLAGS:
        assert "--text-" + name.replace("_", "-") in text_flags
        assert name in {f.name for f in dataclasses.fields(TransformerConfig)}


def flag_names_of(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_help_explains_every_flag(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in flag_names():
        assert flag in text, f"{flag} missing from --help"
    assert "(default:" in text


def ok(**kw) -> Config:
    cfg = parse_args(["--preset", "vit-debug"])
    for section, values in kw.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


BAD = [
    (dict(parallel={"tensor_model_parallel_size": 3}), 3,
     "--tensor-model-parallel-size 3 does not divide --num-attention-heads 4"),
    (dict(model={"ffn_hidden_size": 130}, parallel={"tensor_model_parallel_size": 4}), 4,
     "--tensor-model-parallel-size 4 does not divide --ffn-hidden-size 130"),
    (dict(parallel={"tensor_model_parallel_size": 2}), 3,
     "world size 3 is not divisible by --tensor-model-parallel-size 2"),
    (dict(parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}), 6,
     "world size 6 is not divisible by --tensor-model-parallel-size 2 x "
     "--pipeline-model-parallel-size 2"),
    (dict(parallel={"recompute_granularity": "auto"}), 1,
     "--recompute-granularity auto needs a positive --activation-memory-budget-gb"),
    (dict(parallel={"activation_memory_budget_gb": 1.0}), 1,
     "--activation-memory-budget-gb applies to --recompute-granularity auto"),
    (dict(training={"global_batch_size": 12, "micro_batch_size": 4}), 2,
     "--global-batch-size 12 is not divisible by --micro-batch-size 4 x data-parallel size 2"),
    (dict(model={"img_h": 18}), 1, "image 18x16 (--img-h x --img-w) is not divisible by --patch-dim 4"),
    (dict(model={"hidden_size": 30}), 1, "--hidden-size 30 is not divisible by --num-attention-heads 4"),
    (dict(data={"dataset": "image-folder"}), 1, "--dataset image-folder needs --data-path"),
    (dict(data={"data_path": "/x"}), 1, "--data-path is only read by --dataset image-folder"),
    (dict(training={"micro_batch_size": 0}), 1, "--micro-batch-size must be at least 1"),
    (dict(data={"dataset": "image-folder", "data_path": "/x"}, model={"num_channels": 2}), 1,
     "--num-channels must be 1 or 3 (got 2)"),
    (dict(logging={"peak_tflops": 0.0}), 1, "--peak-tflops must be positive"),
    (dict(model={"drop_path_rate": 0.1, "num_layers": 1}), 1,
     "--drop-path-rate has no effect with --num-layers 1"),
    (dict(parallel={"recompute_granularity": "full"}), 1,
     "--recompute-granularity full needs --recompute-method"),
    (dict(parallel={"recompute_method": "block"}), 1,
     "--recompute-method and --recompute-num-layers apply to --recompute-granularity full"),
    (dict(parallel={"recompute_granularity": "full", "recompute_method": "uniform",
                    "recompute_num_layers": 3}), 1, "--recompute-num-layers 3 is more than"),
    (dict(parallel={"sequence_parallel_regather": True}), 1,
     "--sequence-parallel-regather needs --sequence-parallel"),
    (dict(model={"hidden_dropout": 1.0}), 1, "--hidden-dropout must be in [0, 1)"),
    (dict(training={"lr": -1.0}), 1, "--lr must be 0 or more"),
    (dict(training={"min_lr": 1.0}), 1, "--min-lr 1.0 is above --lr"),
    (dict(model={"position_embedding_type": "sincos2d", "hidden_size": 30,
                 "num_attention_heads": 5}), 1, "sincos2d needs --hidden-size divisible by 4"),
    (dict(model={"normalization": "rmsnorm", "norm_bias": True}), 1,
     "--norm-bias: an RMSNorm has no bias"),
    (dict(parallel={"data_parallel_sharding_strategy": "full",
                    "use_distributed_optimizer": True}), 2,
     "--use-distributed-optimizer belongs to --data-parallel-sharding-strategy optimizer"),
    (dict(parallel={"pipeline_schedule": "zb-h1", "pipeline_model_parallel_size": 2,
                    "num_layers_per_virtual_pipeline_stage": 1}), 2,
     "--pipeline-schedule zb-h1 runs one chunk per stage"),
    (dict(parallel={"pipeline_schedule": "zb-h1", "data_parallel_sharding_strategy": "full"}),
     2, "--pipeline-schedule zb-h1 with --data-parallel-sharding-strategy full"),
    (dict(parallel={"data_parallel_sharding_strategy": "full"},
          training={"freeze_backbone": True}, checkpoint={"pretrained_checkpoint": "/x"}), 2,
     "--freeze-backbone with --data-parallel-sharding-strategy full"),
    (dict(parallel={"data_parallel_sharding_strategy": "full"}), 1,
     "--data-parallel-sharding-strategy full shards over the data-parallel ranks, but there "
     "is 1"),
]


@pytest.mark.parametrize("changes,world,message", BAD, ids=[b[2][:40] for b in BAD])
def test_validation_names_the_flag_and_fix(changes, world, message):
    with pytest.raises(ConfigError) as e:
        validate(ok(**changes), world_size=world)
    assert message in str(e.value)


def test_several_problems_are_reported_together():
    cfg = ok(parallel={"tensor_model_parallel_size": 3}, model={"img_h": 18})
    with pytest.raises(ConfigError, match="3 problems"):
        validate(cfg, world_size=3)


def test_valid_layouts_pass():
    validate(ok(parallel={"tensor_model_parallel_size": 2},
                training={"global_batch_size": 16, "micro_batch_size": 4}), world_size=4)
    validate(Config(model=ModelConfig()), world_size=1)


@pytest.mark.parametrize("argv,message", [
    (["--preset", "vit-b", "--tensor-model-parallel-size", "5"], "does not divide"),
    (["--preset", "vit-xxl"], "invalid choice: 'vit-xxl'"),
    (["--num-layers", "two"], "invalid int value: 'two'"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--preset", "vit-debug", "--num-classes", "0"], "pretraining needs a classifier"),
    (["--preset", "vit-debug", "--num-layers", "3", "--pipeline-model-parallel-size", "2"],
     "world size 1 is not divisible"),
    (["--preset", "vit-debug", "--num-layers-per-virtual-pipeline-stage", "1"],
     "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size of 2 or more"),
    (["--preset", "vit-debug", "--num-layers-in-first-pipeline-stage", "1"],
     "need --pipeline-model-parallel-size of 2 or more"),
    (["--preset", "vit-debug", "--num-layers-per-virtual-pipeline-stage", "0"],
     "--num-layers-per-virtual-pipeline-stage must be at least 1 (got 0)"),
    (["--preset", "vit-debug", "--recompute-granularity", "auto",
      "--activation-memory-budget-gb", "1e-9"], "is too small for pipeline stage 0"),
    (["--preset", "vit-debug", "--train-iters", "1", "--metrics-file", "/proc/nope/m.jsonl"],
     "--metrics-file /proc/nope/m.jsonl: cannot write"),
])
def test_cli_mistakes_exit_2_without_traceback(argv, message):
    proc = cli.run([sys.executable, "-m", "megavit.pretrain", *argv], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_launcher_environment_exits_2():
    env = {**os.environ, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "two"}
    proc = cli.run([sys.executable, "-m", "megavit.pretrain", "--preset", "vit-debug"],
                   timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "OMPI_COMM_WORLD_SIZE='two' is not an integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pipeline_split_and_schedule_are_checked_before_launch():
    """With the world size of a real launch, an impossible split or schedule is an error
    before any process group starts."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}   # never reached
    for argv, message in [
        (["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
         "--num-layers (3) do not split evenly over 2 pipeline stages"),
        (["--num-layers", "8", "--pipeline-model-parallel-size", "4",
          "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "6",
          "--micro-batch-size", "1"],
         "to be a multiple of --pipeline-model-parallel-size 4"),
    ]:
        proc = cli.run([sys.executable, "-m", "megavit.pretrain", "--preset", "vit-debug",
                        *argv], timeout=60, env=env)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_full_block_recomputation_runs_from_the_cli(tmp_path):
    proc = cli.run([sys.executable, "-m", "megavit.pretrain", "--preset", "vit-debug",
                    "--num-channels", "1", "--train-iters", "2", "--global-batch-size", "8",
                    "--micro-batch-size", "4", "--recompute-granularity", "full",
                    "--recompute-method", "block", "--recompute-num-layers", "1",
                    "--progress-bar", "off", "--peak-tflops", "1", "--eval-iters", "1"],
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recompute full (block, 1 layers)" in proc.stdout
