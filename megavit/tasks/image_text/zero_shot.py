"""Zero-shot evaluation of a two-tower model: classification by caption prompts and
image<->text retrieval.

Zero-shot classification: each class name is put into every prompt template ("a photo of
the number {}."), the captions' text embeddings are averaged per class and re-normalised,
and an image is assigned the class whose embedding has the largest cosine similarity.

Retrieval: for N (image, caption) pairs, recall@k image->text is the fraction of images
whose own caption is among the k captions most similar to it (and text->image the reverse).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor],
                     prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """[C, d] unit-norm class embeddings: the mean of each class's prompt embeddings
    (`prompts[c]`: class c's name in every template), re-normalised.
    `encode_text(captions) -> [n, d]` (unit norm)."""
    return torch.stack([F.normalize(encode_text(list(p)).float().mean(dim=0), dim=-1)
                        for p in prompts])


def prompts_for(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Every template filled with each class name: [C][len(templates)] prompts."""
    return [[t.format(name) for t in templates] for name in class_names]


def zero_shot_correct(image_embeddings: torch.Tensor, labels: torch.Tensor,
                      classes: torch.Tensor) -> torch.Tensor:
    """How many of the images [n, d] are classified as their label [n] by the class
    embeddings [C, d] (0-d int64 tensor)."""
    predicted = (image_embeddings.float() @ classes.t()).argmax(dim=-1)
    return (predicted == labels.to(predicted.device)).sum()


def retrieval_recall(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways for N pairs (row i of each is pair i): {'image_to_text_r1': ...,
    'text_to_image_r1': ..., ...}. Ties count against the pair (strictly greater scores
    of other items push it down)."""
    sim = image_embeddings.float() @ text_embeddings.float().t()       # [N, N]
    own = sim.diagonal()
    # rank of the own item: how many others score strictly higher
    rank_i2t = (sim > own.unsqueeze(1)).sum(dim=1)
    rank_t2i = (sim > own.unsqueeze(0)).sum(dim=0)
    out = {}
    for k in ks:
        out[f"image_to_text_r{k}"] = (rank_i2t < k).float().mean().item()
        out[f"text_to_image_r{k}"] = (rank_t2i < k).float().mean().item()
    return out
