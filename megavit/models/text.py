"""The text tower: a transformer over token ids, built from the image tower's parallel
blocks.

    ids [b, L] (int64; EOS after the text, then pad_id: --text-pad-with-eos makes it EOS)
      └─ VocabParallelEmbedding (vocab split over TP, one all-reduce) ─► [L, b, h]
      └─ + learned positions [L, h]
      └─ blocks.0 ... blocks.N-1  (ParallelBlock or SequentialBlock, TP like the ViT's)
           causal mask [L, L], or bidirectional: padded keys masked [b, 1, 1, L]
           (--text-mask-padding, the default) or no mask at all (SigLIP)
      └─ norm ─► pool: the EOS token / the first token / the last position / MAP ─► [b, h]

The blocks are those of `megavit/models/transformer.py`, configured by the text config's
own `TransformerConfig` (`TextConfig.blocks`): the same TP splits, selective recomputation,
dropout streams and parameter names (`blocks.3.in_proj.weight`) as the ViT's, so
checkpoints reshard the same way. Sequence parallelism and full recomputation are not
applied to the text tower (its sequences are short: 64-77 tokens); the image tower keeps
them.
"""

from __future__ import annotations

import torch
from torch import nn

from megavit.config import TextConfig
from megavit.models.transformer import (ForwardContext, MAPHead, Runtime, build_block,
                                        norm_from_config)
from megavit.parallel.sharding import initialize_parameters, set_init, trunc_normal
from megavit.parallel.vocab_embedding import VocabParallelEmbedding, padded_vocab_size


class TextTransformer(nn.Module):
    """ids [b, L] int64 -> features [b, h] (replicated on every TP rank).
    `pad_id` / `eos_id`: the tokenizer's padding and end-of-text ids; they may be equal
    (--text-pad-with-eos) where nothing tells them apart by id: EOS pooling takes the first
    EOS, and padding is masked by id only with --text-mask-padding, which validation then
    refuses."""

    def __init__(self, cfg: TextConfig, rt: Runtime, vocab_size: int, pad_id: int,
                 eos_id: int) -> None:
        super().__init__()
        if rt.sequence_parallel or rt.recompute_granularity == "full":
            raise ValueError("the text tower runs without sequence parallelism or full "
                             "recomputation; pass it a Runtime without them")
        self.cfg, self.rt = cfg, rt
        blocks = cfg.blocks
        self.pad_id, self.eos_id = pad_id, eos_id
        h, L = blocks.hidden_size, cfg.context_length
        self.vocab_size = vocab_size
        self.embedding = VocabParallelEmbedding(
            padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by), h, rt.tp,
            blocks.init_method_std)
        self.pos_embed = nn.Parameter(torch.empty(L, h))
        self.pos_embed.no_weight_decay = True  # type: ignore[attr-defined]
        set_init(self.pos_embed, trunc_normal(0.01))
        self.blocks = nn.ModuleDict({str(i): build_block(blocks, rt, i)
                                     for i in range(blocks.num_layers)})
        self.norm = norm_from_config(blocks, h, rt.layernorm_impl)
        self.map_head = (MAPHead(blocks, rt.tp, rt.layernorm_impl)
                         if cfg.text_pooling == "map" else None)
        if cfg.text_causal:
            self.register_buffer("causal_mask", torch.empty(L, L), persistent=False)

    def init_buffers(self) -> None:
        if self.cfg.text_causal:
            self.causal_mask.fill_(float("-inf")).triu_(1)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Additive mask: causal [L, L], [b, 1, 1, L] hiding padded keys, or None (every
        token sees every token: --no-text-mask-padding)."""
        if self.cfg.text_causal:
            return self.causal_mask
        if not self.cfg.text_mask_padding:
            return None
        pad = (ids == self.pad_id).view(ids.shape[0], 1, 1, ids.shape[1])
        return torch.zeros(pad.shape, device=ids.device).masked_fill(pad, float("-inf"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, L = ids.shape
        if L != self.cfg.context_length:
            raise ValueError(f"token ids of length {L}, the tower was built for "
                             f"--context-length {self.cfg.context_length}")
        x = self.embedding(ids.t()) + self.pos_embed.unsqueeze(1)     # [L, b, h]
        mask = self.attention_mask(ids)
        mask = mask.to(x.dtype) if mask is not None else None
        ctx = ForwardContext(mask, None)
        for block in self.blocks.values():
            x = block(x, ctx)
        x = self.norm(x)
        if self.cfg.text_pooling == "first":
            return x[0]
        if self.cfg.text_pooling == "last":
            return x[-1]
        if self.cfg.text_pooling == "map":
            return self.map_head(x, None if self.cfg.text_causal else mask)
        eos = (ids == self.eos_id).int().argmax(dim=1)                  # the first EOS
        return x[eos, torch.arange(b, device=ids.device)]               # [b, h]


def build_text_tower(cfg: TextConfig, rt: Runtime, seed: int, vocab_size: int, pad_id: int,
                     eos_id: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> TextTransformer:
    """Built on the meta device, then initialised from (seed, "text." + parameter name): the
    serial weights in every TP layout."""
    with torch.device("meta"):
        tower = TextTransformer(cfg, rt, vocab_size, pad_id, eos_id)
    initialize_parameters(tower, seed, device=device, prefix="text.")
    return tower if dtype == torch.float32 else tower.to(dtype)
