"""The model sections: the transformer blocks both towers are made of (`TransformerConfig`),
the ViT (`ModelConfig`, flags of `megavit.pretrain`) and the text tower of contrastive
training (`TextConfig`, flags of `megavit.pretrain_contrastive`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megavit.config.fields import nested, opt


ATTENTION_TYPES = ("full", "window", "local-global", "linear")


@dataclass
class TransformerConfig:
    """The transformer blocks: depth, widths, block type, norms, biases, activation,
    regularisation. Both towers are made of them: the image model's `ModelConfig` extends
    it; the text tower holds one (`TextConfig.blocks`). Defaults: ViT-B with the ViT-22B
    recipe."""

    num_layers: int = field(default=12, metadata=opt("Number of transformer blocks."))
    hidden_size: int = field(default=768, metadata=opt("Transformer width h."))
    num_attention_heads: int = field(default=12, metadata=opt("Attention heads per block."))
    ffn_hidden_size: int = field(default=3072, metadata=opt("MLP hidden width f."))
    block_type: str = field(
        default="parallel",
        metadata=opt(
            "'parallel': the ViT-22B block (one LayerNorm feeding attention and MLP side by "
            "side, fused projections, one TP all-reduce each way). 'sequential': the classic "
            "pre-LN ViT block (two all-reduces each way).",
            choices=("parallel", "sequential"),
        ),
    )
    qk_layernorm: bool = field(
        default=True, metadata=opt("LayerNorm on queries and keys per head (ViT-22B).")
    )
    add_qkv_bias: bool = field(default=False, metadata=opt("Bias in the QKV projection."))
    add_mlp_bias: bool = field(
        default=True, metadata=opt("Biases in the MLP projections (kept in ViT-22B).")
    )
    add_proj_bias: bool = field(
        default=False,
        metadata=opt(
            "Bias in the attention output projection. The parallel block's fused output "
            "projection has one bias, present when this or --add-mlp-bias is set."
        ),
    )
    norm_bias: bool = field(
        default=False,
        metadata=opt("Bias (beta) in the LayerNorms, QK-norms included (ViT-22B: none)."),
    )
    norm_epsilon: float = field(default=1e-6, metadata=opt("Norm epsilon."))
    normalization: str = field(
        default="layernorm",
        metadata=opt(
            "The norm of every block, QK-norm, pre-norm and final norm: 'layernorm' or "
            "'rmsnorm' (scale only, no mean subtraction; no bias).",
            choices=("layernorm", "rmsnorm"),
        ),
    )
    activation: str = field(
        default="gelu",
        metadata=opt(
            "The MLP activation (blocks and MAP head): 'gelu' (exact, erf) or 'gelu_tanh' "
            "(the tanh approximation: SigLIP's gelu_pytorch_tanh, timm's gelu_tanh).",
            choices=("gelu", "gelu_tanh"),
        ),
    )
    init_method_std: float = field(
        default=0.02, metadata=opt("Std of the truncated-normal init of weight matrices.")
    )
    hidden_dropout: float = field(
        default=0.0,
        metadata=opt(
            "Dropout on each block's output before the residual add (drawn per TP rank "
            "under sequence parallelism, identically on every TP rank otherwise)."
        ),
    )
    attention_type: str = field(
        default="full",
        metadata=opt(
            "Attention of every block (image tower): 'full' (softmax over all tokens), "
            "'window' (ViTDet: non-overlapping --window-size x --window-size windows of the "
            "patch grid, a grid the window does not divide padded and the padding masked; a "
            "class token attends to every token and every token to it), 'local-global' "
            "(windows plus one global token per window, its top-left patch, which attends to "
            "every token and which every token attends to) or 'linear' (kernel attention, "
            "elu(x) + 1 feature map, no softmax: O(s d^2)). Blocks listed in "
            "--global-attention-layers stay 'full'.",
            choices=ATTENTION_TYPES,
        ),
    )
    attention_type_per_layer: str = field(
        default="",
        metadata=opt("Each block's attention, comma-separated (full, window, local-global, "
                     "linear); a list "
                     "shorter than --num-layers repeats, e.g. 'window,window,window,full' "
                     "gives ViTDet's 12-block pattern. Replaces --attention-type and "
                     "--global-attention-layers."),
    )
    window_size: int | None = field(
        default=None,
        metadata=opt("Window side in patches for --attention-type window (ViTDet: 14 at "
                     "1024 px with patch 16)."),
    )
    window_shift: bool = field(
        default=False,
        metadata=opt("Swin's shifted windows: every second window block (in order) rolls the "
                     "grid by --window-size // 2 before cutting windows, with its mask."),
    )
    global_attention_layers: str = field(
        default="",
        metadata=opt("With --attention-type window: comma-separated block indices that keep "
                     "full attention, e.g. '2,5,8,11' (ViTDet's recipe for 12 blocks)."),
    )
    attention_dropout: float = field(
        default=0.0,
        metadata=opt(
            "Dropout on the attention probabilities (each TP rank draws its own heads' "
            "masks). On CPU this selects SDPA's math kernel, which keeps s x s tensors."
        ),
    )
    drop_path_rate: float = field(
        default=0.0,
        metadata=opt(
            "Stochastic depth: block l's branch is dropped per image with probability "
            "rate * l / (layers - 1). Masks depend on (seed, image, layer) only, so they are "
            "the same in every parallel layout."
        ),
    )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def global_layers(self) -> set[int]:
        """--global-attention-layers as block indices (ValueError when not integers)."""
        return {int(v) for v in self.global_attention_layers.replace(" ", "").split(",") if v}

    def attention_pattern(self) -> list[str]:
        """--attention-type-per-layer as a list (empty when unset)."""
        return [v for v in self.attention_type_per_layer.replace(" ", "").split(",") if v]

    def attention_kind(self, layer: int) -> str:
        """Block `layer`'s attention: 'full', 'window', 'local-global' or 'linear'."""
        if pattern := self.attention_pattern():
            return pattern[layer % len(pattern)]
        if self.attention_type != "full" and layer not in self.global_layers():
            return self.attention_type
        return "full"

    def window_shift_of(self, layer: int) -> int:
        """How far block `layer` rolls the grid (0: not at all): with --window-shift, the
        second, fourth, ... window blocks roll by window_size // 2."""
        if not self.window_shift or self.attention_kind(layer) != "window":   # not carriers
            return 0
        order = sum(self.attention_kind(i) == "window" for i in range(layer))
        return self.window_size // 2 if order % 2 else 0

    def uses_attention(self, kind: str) -> bool:
        """Whether some block uses `kind` ('window' also answers for 'local-global', which
        cuts windows too)."""
        kinds = {self.attention_kind(i) for i in range(self.num_layers)}
        return kind in kinds or (kind == "window" and "local-global" in kinds)


@dataclass
class ModelConfig(TransformerConfig):
    """The ViT: its transformer blocks, the image stem and the head. Defaults are ViT-B/16
    with the ViT-22B recipe."""

    patch_dim: int = field(default=16, metadata=opt("Square patch size in pixels."))
    img_h: int = field(default=224, metadata=opt("Input image height in pixels."))
    img_w: int = field(default=224, metadata=opt("Input image width in pixels."))
    num_channels: int = field(default=3, metadata=opt("Input image channels."))
    num_classes: int | None = field(
        default=None,
        metadata=opt(
            "Classifier outputs; default: the dataset's class count (synthetic: 1000); "
            "0 = no classifier (the model returns pooled features)."
        ),
    )
    pre_norm: bool = field(
        default=False,
        metadata=opt(
            "A norm over the embedded tokens before the first block (CLIP's vision tower, "
            "timm's pre_norm; ViT-22B: none)."
        ),
    )
    position_embedding_type: str = field(
        default="learned",
        metadata=opt(
            "Position embeddings: 'learned' (one table over the grid, resized by bicubic "
            "interpolation when the image size changes), 'learned-2d' (a learned row table "
            "and column table, added per token, each resized along its axis), fixed "
            "'sincos2d', or 'rope-2d' (axial rotary embedding of queries and keys: half of "
            "each head's width rotated by the row, half by the column; no table, so any "
            "resolution runs as is).",
            choices=("learned", "learned-2d", "sincos2d", "rope-2d"),
        ),
    )
    pooling: str = field(
        default="map",
        metadata=opt(
            "How the tokens become one vector: 'map' (multihead attention pooling, "
            "ViT-22B), 'gap' (mean of tokens) or 'cls' (a prepended class token).",
            choices=("map", "gap", "cls"),
        ),
    )

    patch_merge_layers: str = field(
        default="",
        metadata=opt(
            "Merge each 2x2 group of neighbouring patch tokens into one after these blocks "
            "(comma-separated indices, e.g. '1,3'): the four tokens concatenated (4h), "
            "normed and projected back to --hidden-size, so the grid halves per side and "
            "widths, TP shards and pipeline shapes stay uniform. A class token passes "
            "through unmerged. Every merged grid must be even on both sides. Later blocks "
            "see the smaller grid: windows keep --window-size tokens a side (a window wider "
            "than the grid covers it: full attention), rope-2d counts positions on the "
            "merged grid."),
    )

    num_registers: int = field(
        default=0,
        metadata=opt(
            "Extra learned tokens (Darcet et al. 2023, 'Vision Transformers Need "
            "Registers') placed after the class token, before the patches: they attend and "
            "are attended like a class token (global under window attention) and are dropped "
            "before pooling."),
    )
    distillation_token: bool = field(
        default=False,
        metadata=opt(
            "DeiT's distillation token (Touvron et al. 2021): a learned token after the "
            "class token with its own classifier, trained by python -m megavit.distill "
            "--distill-loss token (which sets it) towards the teacher while the class head "
            "learns the labels; dropped before pooling; at evaluation the two heads' logits "
            "are averaged."),
    )
    feature_layers: str = field(
        default="",
        metadata=opt(
            "Blocks whose outputs (before a merge after them) a dense head reads as feature "
            "maps [b, h, rows, columns] (comma-separated indices, e.g. '1,3,5'; used by "
            "megavit.segment's --neck fpn). Under pipeline parallelism each stage passes "
            "the maps it holds or made on to the next, with its hidden states, so the last "
            "stage has them all."),
    )

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the embedded image (before any merge)."""
        return self.img_h // self.patch_dim, self.img_w // self.patch_dim

    def merge_layers(self) -> list[int]:
        """--patch-merge-layers as sorted block indices (ValueError when not integers)."""
        return sorted({int(v) for v in self.patch_merge_layers.replace(" ", "").split(",")
                       if v})

    def feature_layer_list(self) -> list[int]:
        """--feature-layers as sorted block indices (ValueError when not integers)."""
        return sorted({int(v) for v in self.feature_layers.replace(" ", "").split(",") if v})

    def grid_at(self, layer: int) -> tuple[int, int]:
        """The token grid block `layer` works on (layer = num_layers: after the last
        block): the embedded grid halved per side once per merge before it."""
        gh, gw = self.grid
        for merged in self.merge_layers():
            if merged < layer:
                gh, gw = gh // 2, gw // 2
        return gh, gw

    def at_layer(self, layer: int) -> "ModelConfig":
        """The config of a plain (unmerged) ViT whose grid is block `layer`'s: what the
        block, its attention, FLOPs and activation formula are built from. Windows wider
        than that grid are narrowed to cover it (one window: full attention)."""
        if not self.patch_merge_layers:
            return self
        gh, gw = self.grid_at(layer)
        window = self.window_size
        if window is not None:
            window = min(window, max(gh, gw))
        return dataclasses.replace(self, img_h=gh * self.patch_dim, img_w=gw * self.patch_dim,
                                   patch_merge_layers="", feature_layers="", window_size=window)

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch grid: the class token (pooling 'cls'), the distillation
        token, then the --num-registers registers."""
        return (1 if self.pooling == "cls" else 0) + self.dropped_before_pooling

    @property
    def dropped_before_pooling(self) -> int:
        """The prefix tokens that pooling leaves out: the distillation token and the
        registers."""
        return int(self.distillation_token) + self.num_registers

    @property
    def seq_length(self) -> int:
        """Tokens entering the first block: patches, plus the class token and registers."""
        gh, gw = self.grid
        return gh * gw + self.prefix_tokens


# The text tower's block settings that are flags (--text-<field>), with their help; the
# others are fixed by `text_blocks`.
TEXT_BLOCK_FLAGS = {
    "num_layers": "Text transformer blocks.",
    "hidden_size": "Text transformer width.",
    "num_attention_heads": "Text attention heads.",
    "ffn_hidden_size": "Text MLP hidden width.",
    "block_type": "Text block: 'sequential' (pre-LN, CLIP) or 'parallel' (ViT-22B style).",
    "qk_layernorm": "LayerNorm on the text queries and keys.",
    "init_method_std": "Std of the text tower's weight and embedding init.",
    "norm_epsilon": "Epsilon of the text tower's LayerNorms (CLIP 1e-5, SigLIP 1e-6).",
    "activation": "The text MLP activation: 'gelu' (exact, erf) or 'gelu_tanh' (the tanh "
                  "approximation: SigLIP's gelu_pytorch_tanh).",
}


def text_blocks() -> TransformerConfig:
    """The text tower's blocks by default: CLIP's text transformer (sequential pre-LN
    blocks, biases in every projection and norm, no QK-norm, LayerNorm epsilon 1e-5, no
    dropout)."""
    return TransformerConfig(num_layers=12, hidden_size=512, num_attention_heads=8,
                             ffn_hidden_size=2048, block_type="sequential", qk_layernorm=False,
                             add_qkv_bias=True, add_mlp_bias=True, add_proj_bias=True,
                             norm_bias=True, norm_epsilon=1e-5)


@dataclass
class TextConfig:
    """The text tower of contrastive training (megavit.pretrain_contrastive): its
    transformer blocks and what is particular to text."""

    blocks: TransformerConfig = field(default_factory=text_blocks,
                                      metadata=nested("text_", TEXT_BLOCK_FLAGS))
    context_length: int = field(
        default=64, metadata=opt("Tokens per caption, EOS included (padded / truncated)."))
    make_vocab_size_divisible_by: int = field(
        default=128,
        metadata=opt("Pad the embedding table to a multiple of this many rows (the same in "
                     "every layout, so checkpoints reshard); the TP size must divide it."))
    text_pooling: str = field(
        default="eos",
        metadata=opt("Caption embedding: the 'eos' token (CLIP), the 'first' token, the "
                     "'last' position (SigLIP: the final token, padding or not), or 'map' "
                     "(attention pooling over the tokens, padding hidden unless "
                     "--no-text-mask-padding).",
                     choices=("eos", "first", "last", "map")))
    text_causal: bool = field(
        default=True,
        metadata=opt("Causal attention (CLIP); --no-text-causal: bidirectional (SigLIP). "
                     "Causal attention needs --text-pooling eos or last."))
    text_mask_padding: bool = field(
        default=True,
        metadata=opt("Bidirectional text attention hides padded tokens (their keys are "
                     "masked); --no-text-mask-padding: every token attends to every token, "
                     "padding included (SigLIP as its processor calls it: no attention "
                     "mask). Needs --no-text-causal."))
    text_projection_bias: bool = field(
        default=False,
        metadata=opt("A bias in the text projection to the embedding space (SigLIP's text "
                     "head has one; CLIP's has none)."))
    text_cleaning: str = field(
        default="megavit",
        metadata=opt("How captions and prompts are cleaned before SentencePiece (training, "
                     "zero-shot, tools): 'megavit' (lower-cased when the vocabulary has no "
                     "upper-case piece, whitespace runs collapsed, punctuation kept) or "
                     "'siglip' (exactly transformers' SiglipTokenizer: lower-cased, ASCII "
                     "punctuation deleted, whitespace runs collapsed). Train the tokenizer "
                     "with the same (tools/train_tokenizer.py --text-cleaning).",
                     choices=("megavit", "siglip")))
    text_pad_with_eos: bool = field(
        default=False,
        metadata=opt("Pad captions with the EOS id instead of the tokenizer's pad piece "
                     "(SigLIP's released tokenizers pad with </s>). Padding is then told "
                     "from EOS only by position, so bidirectional text needs "
                     "--no-text-mask-padding."))

