"""``model_stock``: Model Stock (Jang et al. 2024, arXiv 2403.19522), as mergekit defines it.

With task vectors τᵢ = Mᵢ − base of N ≥ 2 fine-tunes and cos θ their mean pairwise
cosine similarity (over the whole tensor, or per output row with ``filter_wise``), the
merge is t·mean(Mᵢ) + (1 − t)·base with t = N·cos θ / (1 + (N − 1)·cos θ); where the
denominator vanishes the base is kept.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import ModelRef
from weightflow.ops.lib.merging import (
    MergeCommon,
    open_models,
    stream_merge,
    tensor_pass,
)
from weightflow.ops.merge_methods import MergeMethod

NORM_FLOOR = 1e-6      # mergekit clamps the product of norms here
SINGULAR = 1e-6        # |1 + (N - 1)·cos θ| below this keeps the base


class ModelStockParams(MergeCommon):
    """t·mean(models) + (1 − t)·base, t = N·cos θ / (1 + (N − 1)·cos θ) from the mean pairwise
    cosine of the task vectors (Model Stock)."""

    method: Literal["model_stock"]
    base: ModelRef = Field(description="step producing the pre-trained model")
    models: list[ModelRef] = Field(min_length=2, description="steps producing two or more fine-tunes of it")
    filter_wise: bool = Field(False, description="cosines and t per output row instead of per tensor")


def interpolation(cos, n: int):
    """t = n·cos / (1 + (n − 1)·cos) for a tensor of mean cosines; 0 (the base) where the
    denominator vanishes."""
    import torch

    den = 1 + (n - 1) * cos
    singular = den.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))


def pair_cosine(dots, norms, n: int):
    """Mean over pairs i < j < n of dot(τᵢ, τⱼ) / max(|τᵢ|·|τⱼ|, floor), clamped to [-1, 1]."""
    import torch

    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append((dots[i][j] / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1, 1))
    return torch.stack(cos).mean(dim=0)


def run(inputs, p: ModelStockParams, ctx) -> dict:
    import torch

    base_art, arts = inputs["base"], inputs["models"]
    base, *models = open_models([base_art, *arts])
    n = len(models)
    t_per_tensor: dict[str, float] = {}

    def row_stats(chunks):
        """Per-row (or whole-chunk) dot products and norms of the task vectors, float64."""
        w0, ws = chunks[0], chunks[1:]
        flat = (lambda x: x.reshape(1, -1)) if w0.dim() < 2 else (lambda x: x.reshape(x.shape[0], -1))
        taus = [flat(w) - flat(w0) for w in ws]
        dots = [[(taus[i] * taus[j]).sum(dim=-1) for j in range(n)] for i in range(n)]
        return dots, taus

    def before(name):
        if p.filter_wise:
            return
        dots = [[torch.zeros((), dtype=torch.float64) for _ in range(n)] for _ in range(n)]
        for chunks in tensor_pass([base, *models], name):
            w0 = chunks[0].reshape(-1)
            taus = [w.reshape(-1) - w0 for w in chunks[1:]]
            for i in range(n):
                for j in range(i, n):
                    dots[i][j] = dots[i][j] + (taus[i] * taus[j]).sum()
        norms = [dots[i][i].sqrt() for i in range(n)]
        t_per_tensor[name] = float(interpolation(pair_cosine(dots, norms, n), n))

    def compute(name, lo, hi):
        w0 = base.get(name, lo, hi).to(torch.float32)
        ws = [m.get(name, lo, hi).to(torch.float32) for m in models]
        average = ws[0].clone()
        for w in ws[1:]:
            average.add_(w)
        average.div_(n)
        if p.filter_wise:
            chunks = [w0.to(torch.float64)] + [w.to(torch.float64) for w in ws]
            dots, _ = row_stats(chunks)
            norms = [dots[i][i].sqrt() for i in range(n)]
            t = interpolation(pair_cosine(dots, norms, n), n).to(torch.float32)
            t = t.reshape((-1,) + (1,) * (w0.dim() - 1)) if w0.dim() >= 2 else t.reshape(())
        else:
            t = t_per_tensor[name]
        return t * average + (1 - t) * w0

    written = stream_merge(ctx, base, base_art.path, compute, p.dtype or ctx.dtype, before=before)
    ctx.info["interpolation_t"] = {k: round(v, 6) for k, v in t_per_tensor.items()}
    return {"tensors": written}


METHOD = MergeMethod("model_stock", ModelStockParams, run=run, order=3)
