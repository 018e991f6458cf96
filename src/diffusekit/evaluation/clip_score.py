"""CLIP score: how well images match their prompts, as the cosine similarity of an image embedding and a
text embedding (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning":
CLIP-S = w * max(cos(E_I, E_C), 0); torchmetrics' `clip_score`, used by most diffusion papers, takes
w = 100 and clamps the batch mean rather than each pair).

What is measurable offline, and what is not: the metric needs a pretrained CLIP *image* tower (ViT-L/14 in
torchmetrics' default), which cannot be downloaded here and which the project does not train. So:

- `clip_score(image_features, text_features)` is the metric itself over embeddings the caller brings
  from any image/text encoder pair they have (e.g. `transformers.CLIPModel.get_image_features` /
  `get_text_features` with local weights). It is exact to torchmetrics' definition given the same
  embeddings.
- For the project's own `shapes` world, prompt adherence is measured *exactly* instead, by reading the
  generated image back into attributes with the rule-based detector
  (`diffusekit.evaluation.shapes_detector`) and comparing them with the prompted scene
  (`diffusekit.evaluation.adherence`); for `digits`, by the project's digit classifier
  (`diffusekit.evaluation.features.classify_digits`). `diffusekit.evaluation.evaluate.evaluate_model`
  reports both. These are stronger than a CLIP score where they apply: they are right or wrong per
  attribute, not a similarity.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("mean", "none")


def clip_score(image_features, text_features, *, reduction: str = "mean", scale: float = 100.0) -> torch.Tensor:
    """CLIP score of paired embeddings.

    image_features, text_features: (N, D) (or (D,) for one pair), row i of each is one image and its
    prompt; they are L2-normalised here, so raw encoder outputs are fine.
    reduction="mean": max(scale * mean_i cos_i, 0), torchmetrics' `clip_score` (a scalar in [0, 100]).
    reduction="none": max(scale * cos_i, 0) per pair, the paper's per-caption score (w = scale).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; valid: {', '.join(map(repr, REDUCTIONS))}")
    img = torch.as_tensor(image_features, dtype=torch.float64)
    txt = torch.as_tensor(text_features, dtype=torch.float64)
    img, txt = torch.atleast_2d(img), torch.atleast_2d(txt)
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"image_features {tuple(img.shape)} and text_features {tuple(txt.shape)}: expected two "
                         f"(N, D) arrays of paired embeddings with the same N and D")
    if img.shape[0] == 0:
        raise ValueError("no embeddings given (N = 0)")
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1, eps=1e-12)     # (N,)
    score = scale * cos
    if reduction == "none":
        return score.clamp_min(0.0)
    return score.mean().clamp_min(0.0)
