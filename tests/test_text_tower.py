"""The text tower computes the serial function at TP=2 and TP=4: caption features (rtol
1e-5) and every parameter's gradient (gathered to its serial shape; within 1e-5 of its
largest entry, measured 2e-7) equal the single-process tower's, for a
causal tower pooled at EOS (CLIP) and a bidirectional one pooled by MAP over the non-padded
tokens (SigLIP). At TP=4 with a 5-token vocabulary padded to 8 rows, one rank holds only
padding rows. The vocabulary padding does not depend on TP, so the embedding table has the
same shape in every layout. --text-activation reaches every block; --text-pad-with-eos
pools the first EOS and is refused where padding is masked by id."""

from __future__ import annotations


import pytest
import torch

from megavit.config import TEXT_PRESETS, TextConfig, section_from_dict
from megavit.models.text import build_text_tower
from megavit.models.transformer import Runtime
from megavit.parallel.sharding import full_state
from megavit.parallel.state import ParallelState, serial_state
from megavit.parallel.vocab_embedding import padded_vocab_size
from tests.harness import run_distributed

PAD, EOS = 0, 1
VARIANTS = {   # flat names, as flags and presets give them
    "clip": dict(text_causal=True, text_pooling="eos"),
    "siglip": dict(text_causal=False, text_pooling="map", text_block_type="parallel"),
}


def _config(variant: str, **flat) -> TextConfig:
    return section_from_dict(TextConfig, {**TEXT_PRESETS["text-debug"], **VARIANTS[variant],
                                          **flat})


def _ids(vocab: int, length: int) -> torch.Tensor:
    """4 captions of 3, 7, 15 and 0 tokens, then EOS, then padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.full((4, length), PAD)
    for row, n in enumerate((3, 7, length - 1, 0)):
        ids[row, :n] = torch.randint(2, vocab, (n,), generator=g)
        ids[row, n] = EOS
    return ids


def _run(pstate: ParallelState, variant: str, vocab: int) -> dict:
    cfg = _config(variant)
    tower = build_text_tower(cfg, Runtime(tp=pstate.tp, seed=5), seed=5, vocab_size=vocab,
                             pad_id=PAD, eos_id=EOS)
    out = tower(_ids(vocab, cfg.context_length))                    # [4, h]
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    grads = {id(p): p.grad for p in tower.parameters()}
    return {"out": out.detach(), "weights": full_state(tower, pstate.tp),
            "grads": full_state(tower, pstate.tp, grads)}


def _jobs(vocab: int) -> dict:
    return {v: (_run, (v, vocab)) for v in VARIANTS}


@pytest.mark.parametrize("world,vocab", [(2, 13), (4, 5)], ids=["tp2", "tp4_padding_rank"])
def test_text_tower_matches_serial(world, vocab):
    results = run_distributed(world, world, _jobs(vocab))
    for variant in VARIANTS:
        serial = _run(serial_state(), variant, vocab)
        assert serial["weights"]["embedding.weight"].shape[0] == padded_vocab_size(vocab, 8)
        for rank in results[variant]:
            torch.testing.assert_close(rank["out"], serial["out"], rtol=1e-5, atol=1e-6)
            assert rank["weights"].keys() == serial["weights"].keys()
            for name, w in serial["weights"].items():
                assert torch.equal(rank["weights"][name], w), (variant, name)
            for name, g in serial["grads"].items():   # within 1e-5 of the largest entry
                err = (rank["grads"][name] - g).abs().max().item()
                assert err <= 1e-5 * g.abs().max().item() + 1e-7, (variant, name, err)


def test_padding_and_text_after_eos_do_not_change_a_caption_embedding():
    """Causal + EOS: tokens after EOS are never seen. Bidirectional + MAP: padded tokens are
    masked as keys everywhere, so even changing the pad token's embedding changes nothing."""
    for variant in VARIANTS:
        cfg = _config(variant)
        tower = build_text_tower(cfg, Runtime(tp=serial_state().tp), seed=1, vocab_size=13,
                                 pad_id=PAD, eos_id=EOS)
        ids = _ids(13, cfg.context_length)
        with torch.no_grad():
            base = tower(ids)
            if variant == "clip":
                changed = ids.clone()
                changed[:, -1] = 7                     # after every EOS but row 2's
                same = tower(changed)
                torch.testing.assert_close(same[[0, 1, 3]], base[[0, 1, 3]])
                assert not torch.allclose(same[2], base[2])
            else:
                tower.embedding.weight[PAD] += 1.0
                torch.testing.assert_close(tower(ids), base)


def test_bad_lengths_and_vocabulary_splits_are_refused():
    cfg = _config("clip")
    with pytest.raises(ValueError, match="--context-length 16"):
        build_text_tower(cfg, Runtime(tp=serial_state().tp), 0, 13, PAD, EOS)(
            torch.zeros(2, 10, dtype=torch.long))
    from megavit.parallel.comm import CommStats, Group

    group = Group("tp", (0, 1, 2), 0, None, CommStats())
    with pytest.raises(ValueError, match="does not divide the padded vocabulary of 16 rows"):
        build_text_tower(_config("clip", text_num_attention_heads=3, text_hidden_size=48,
                                 text_ffn_hidden_size=96),
                         Runtime(tp=group), 0, 13, PAD, EOS)


def test_text_activation_reaches_every_block():
    cfg = _config("siglip", text_activation="gelu_tanh")
    assert cfg.blocks.activation == "gelu_tanh"
    tower = build_text_tower(cfg, Runtime(tp=serial_state().tp), seed=1, vocab_size=13,
                             pad_id=PAD, eos_id=EOS)
    acts = [m for n, m in tower.named_modules() if n.endswith("act")]
    assert len(acts) == cfg.blocks.num_layers + 1                 # the blocks' and MAP head's
    assert all(m.approximate == "tanh" for m in acts)
    exact = build_text_tower(_config("siglip"), Runtime(tp=serial_state().tp), seed=1,
                             vocab_size=13, pad_id=PAD, eos_id=EOS)
    ids = _ids(13, cfg.context_length)
    with torch.no_grad():
        assert not torch.allclose(tower(ids), exact(ids))       # same weights, other GELU


def test_padding_with_eos_pools_the_first_eos():
    """--text-pad-with-eos: a causal tower pooled at EOS reads the first EOS, so its caption
    embeddings do not depend on which id pads."""
    cfg = _config("clip")
    tower = build_text_tower(cfg, Runtime(tp=serial_state().tp), seed=1, vocab_size=13,
                             pad_id=EOS, eos_id=EOS)
    ids = _ids(13, cfg.context_length)
    eos_padded = ids.masked_fill(ids == PAD, EOS)
    with torch.no_grad():
        torch.testing.assert_close(tower(eos_padded), tower(ids))


def test_padding_with_eos_is_refused_where_padding_is_masked_by_id():
    from megavit.config import ConfigError, parse_contrastive_args, validate_contrastive

    flags = ["--preset", "vit-debug", "--text-preset", "text-debug", "--global-batch-size", "8",
             "--micro-batch-size", "8", "--text-pad-with-eos",
             "--no-text-causal", "--text-pooling", "last"]
    with pytest.raises(ConfigError, match="--text-pad-with-eos: padding has EOS's id"):
        validate_contrastive(parse_contrastive_args(flags))
    cfg = parse_contrastive_args(flags + ["--no-text-mask-padding", "--text-activation",
                                          "gelu_tanh", "--text-cleaning", "siglip"])
    validate_contrastive(cfg)
    assert (cfg.text.text_pad_with_eos, cfg.text.blocks.activation, cfg.text.text_cleaning) == \
        (True, "gelu_tanh", "siglip")
