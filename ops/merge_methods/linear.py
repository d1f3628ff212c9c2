"""``linear``: a weighted sum (or average) of whole models, as mergekit's linear."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import ModelRef
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.lib.params import PerTensor
from weightflow.ops.merge_methods import MergeMethod


class LinearParams(MergeCommon):
    """Σ wᵢ·Mᵢ over `models`; `normalize: true` (the default) divides by Σ wᵢ: a weighted average."""

    method: Literal["linear"]
    models: list[ModelRef] = Field(min_length=1, description="steps producing the models to merge")
    weights: list[PerTensor] | None = Field(None, description="one per model (default: 1 each)")
    normalize: bool = Field(True, description="divide by the sum of the weights")


def run(inputs, p: LinearParams, ctx) -> dict:
    import torch

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.params import resolve

    arts = inputs["models"]
    ckpts = open_models(arts)
    weights = list(p.weights) if p.weights is not None else [1.0] * len(ckpts)

    def compute(name, lo, hi):
        ws = [resolve(w, name) for w in weights]
        total = sum(ws)
        if p.normalize and abs(total) < 1e-12:
            raise OpError(f"normalize: true needs weights whose sum is not zero (tensor '{name}')")
        acc = None
        for w, c in zip(ws, ckpts, strict=True):
            term = c.get(name, lo, hi).to(torch.float32) * w
            acc = term if acc is None else acc.add_(term)
        return acc / total if p.normalize else acc

    return {"tensors": stream_merge(ctx, ckpts[0], arts[0].path, compute, p.dtype or ctx.dtype)}


METHOD = MergeMethod("linear", LinearParams, run=run, order=0)
