"""The model on one process: shapes, FLOP estimate, position embeddings, init, presets."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megavit.config import preset_model_config
from megavit.models.transformer import Runtime
from megavit.models.vit import (VisionTransformer, build_vit, resize_pos_embed,
                                sincos_2d, vit_flops)
from megavit.parallel.comm import CommStats, Group
from megavit.parallel.state import serial_state

TP1 = serial_state().tp


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    b, h, s_q, d = q_shape
    return 4 * b * h * s_q * k_shape[2] * d  # QK^T and AV


def _sdpa_backward_flops(grad_shape, q_shape, k_shape, *args, **kwargs) -> int:
    return 2 * _sdpa_flops(q_shape, k_shape, None)  # dQ, dK, dV: twice the forward


def _addmm_inplace_flops(self_shape, mat1_shape, mat2_shape, *args, **kwargs) -> int:
    return 2 * mat1_shape[0] * mat1_shape[1] * mat2_shape[1]


# FlopCounterMode does not know the CPU flash-attention kernels, nor the in-place addmm_
# that accumulates a row-parallel layer's partial products; count them like the others.
SDPA_CPU = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    torch.ops.aten.addmm_: _addmm_inplace_flops,
}


@pytest.mark.parametrize("block_type", ["parallel", "sequential"])
@pytest.mark.parametrize("pooling", ["map", "gap", "cls"])
def test_estimate_flops_matches_flop_counter(block_type, pooling):
    cfg = preset_model_config("vit-debug", num_classes=10, pooling=pooling, block_type=block_type)
    model = build_vit(cfg, TP1, seed=0)
    images = torch.randn(5, 3, 16, 16)
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU) as counter:
        logits = model(images)
    assert logits.shape == (5, 10)
    assert model.estimate_flops(5, training=False) == counter.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU) as counter:
        model(images).sum().backward()
    # The estimate is 3x forward; autograd skips the input-gradient of the patch embedding
    # (images need none): 2 * patches * (c p^2) * h per image.
    skipped = 5 * 2 * 16 * (3 * 4 * 4) * 32
    assert counter.get_total_flops() == model.estimate_flops(5, training=True) - skipped


def test_vit22b_block_weights_match_the_paper():
    """(6144 * 43008 + 30720 * 6144) * 48 weights in the blocks (21.74 B), on the meta device."""
    cfg = preset_model_config("vit-22b", num_classes=1000)
    with torch.device("meta"):
        model = VisionTransformer(cfg, Runtime(TP1))
    matrices = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith("blocks.") and p.dim() == 2)
    assert matrices == (6144 * 43008 + 30720 * 6144) * 48
    assert 21.7e9 < matrices < 21.8e9
    # forward FLOPs per image ~ 2 x weights x tokens, plus attention
    assert vit_flops(cfg, 1, training=False) > 2 * matrices * 256


def test_tp_shards_of_vit22b_on_meta_sum_to_the_serial_count():
    cfg = preset_model_config("vit-22b", num_classes=1000)
    stats = CommStats()
    with torch.device("meta"):
        serial = sum(p.numel() for p in VisionTransformer(cfg, Runtime(TP1)).parameters())
        per_rank = []
        for rank in range(8):
            tp = Group("tp", tuple(range(8)), rank, None, stats)
            model = VisionTransformer(cfg, Runtime(tp))
            per_rank.append(sum(p.numel() * (8 if getattr(p, "tp_shard", None) else 1)
                                for p in model.parameters()))
    assert per_rank == [serial] * 8


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = preset_model_config("vit-debug", num_classes=10)
    a, b = build_vit(cfg, TP1, seed=1), build_vit(cfg, TP1, seed=1)
    c = build_vit(cfg, TP1, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.std() > 0:
            assert not torch.equal(pa, pc), name


def test_init_statistics():
    cfg = preset_model_config("vit-s", num_classes=10, num_layers=1)
    model = build_vit(cfg, TP1, seed=0)
    w = model.blocks["0"].in_proj.weight
    assert abs(w.std().item() - 0.02 * 0.8796) < 1e-3   # truncated at 2 std
    assert w.abs().max().item() <= 0.04 + 1e-6
    assert torch.all(model.blocks["0"].norm.weight == 1)
    assert model.blocks["0"].norm.bias is None            # ViT-22B: no LayerNorm bias
    assert torch.all(model.blocks["0"].in_proj.bias == 0)  # only the MLP part has a bias
    assert model.blocks["0"].in_proj.bias.numel() == cfg.ffn_hidden_size


def test_learned_position_embedding_resizes_on_load():
    small = build_vit(preset_model_config("vit-debug", num_classes=10), TP1, seed=0)
    large = build_vit(preset_model_config("vit-debug", num_classes=10, img_h=32, img_w=32), TP1, 0)
    state = small.state_dict()
    state["pos_embed.weight"] = torch.full_like(state["pos_embed.weight"], 0.25)
    large.load_state_dict(state)
    assert large.pos_embed.weight.shape == (64, 32)
    assert torch.allclose(large.pos_embed.weight, torch.full((64, 32), 0.25), atol=1e-6)
    assert large(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resize_pos_embed_keeps_a_linear_ramp():
    grid = torch.arange(4.0).repeat(4, 1)                  # x coordinate, 4x4 grid
    table = grid.reshape(16, 1).repeat(1, 3)
    out = resize_pos_embed(table, (4, 4), (4, 4))
    assert torch.allclose(out, table, atol=1e-5)
    assert resize_pos_embed(table, (4, 4), (8, 6)).shape == (48, 3)


def test_sincos_2d_shape_and_values():
    pe = sincos_2d((2, 3), 8)
    assert pe.shape == (6, 8)
    assert torch.allclose(pe[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(pe[1, 0], torch.sin(torch.tensor(1.0)))   # x = 1, lowest frequency


def test_pipeline_stage_parts_keep_global_names():
    cfg = preset_model_config("vit-debug", num_layers=4, num_classes=10)
    with torch.device("meta"):
        first = VisionTransformer(cfg, Runtime(TP1), layers=range(0, 2), post_process=False)
        last = VisionTransformer(cfg, Runtime(TP1), layers=range(2, 4), pre_process=False)
    names = {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()}
    with torch.device("meta"):
        full = {n for n, _ in VisionTransformer(cfg, Runtime(TP1)).named_parameters()}
    assert names == full
    assert any(n.startswith("blocks.3.") for n, _ in last.named_parameters())


def test_features_without_classifier():
    model = build_vit(preset_model_config("vit-debug", num_classes=0), TP1, seed=0)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 32)
