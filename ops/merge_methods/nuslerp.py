"""``nuslerp``: SLERP of two models with per-model weights, per row or whole tensor, as
mergekit's nuslerp.

t = w₁ / (w₀ + w₁) (0.5 where |w₀ + w₁| < 1e-6) and, per vector pair (x₀, x₁),
slerp = (sin((1 − t)θ)·x₀ + sin(tθ)·x₁) / sin θ with cos θ = x̂₀·x̂₁ (linear where the two
are colinear).  The vectors are the whole flattened tensor (``nuslerp_flatten``, the
default), or the rows along the last dimension, or with ``nuslerp_row_wise`` the vectors
along the first dimension (the columns of a matrix); 1-d tensors are one vector.  With a
``base``, xᵢ are the task vectors Mᵢ − base and the base is added back.

Streaming: last-dimension rows are complete in every row chunk; whole-tensor and
first-dimension products are accumulated in a first pass over the chunks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import ModelRef
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.lib.params import PerTensor
from weightflow.ops.merge_methods import MergeMethod

ZERO_TOTAL = 1e-6  # weights summing to less than this in magnitude give t = 0.5 (mergekit)


class NuslerpParams(MergeCommon):
    """SLERP of two models (or, with `base`, of their task vectors) at t = w₁/(w₀ + w₁): over the
    whole tensor (`nuslerp_flatten`, default), per last-dimension row, or per column
    (`nuslerp_row_wise`) (mergekit's NuSLERP)."""

    method: Literal["nuslerp"]
    base: ModelRef | None = Field(None, description="optional step producing a base model: the task "
                                  "vectors models − base are interpolated and the base added back")
    models: list[ModelRef] = Field(min_length=2, max_length=2, description="the two models")
    weights: list[PerTensor] | None = Field(None, description="one per model (default: 1 each); "
                                            "t = w₁ / (w₀ + w₁)")
    nuslerp_flatten: bool = Field(True, description="interpolate each tensor as one flattened vector")
    nuslerp_row_wise: bool = Field(False, description="with nuslerp_flatten: false, interpolate the "
                                   "vectors along the first dimension (columns) instead of the rows")

    @model_validator(mode="after")
    def _one_layout(self):
        if self.nuslerp_flatten and self.nuslerp_row_wise:
            raise ValueError("nuslerp_row_wise: true needs nuslerp_flatten: false (nuslerp_flatten "
                             "defaults to true and, as in mergekit, would silently take precedence)")
        return self


def interpolation_t(w0: float, w1: float) -> float:
    """t = w₁ / (w₀ + w₁), or 0.5 where the weights cancel (mergekit's rule)."""
    total = w0 + w1
    return 0.5 if abs(total) < ZERO_TOTAL else w1 / total


def vector_axis(p: NuslerpParams, shape: tuple) -> str:
    """Which vectors a tensor of ``shape`` is cut into: 'whole', 'rows' (last dim) or 'columns'
    (first dim).  Vectors of a 0-d or 1-d tensor are the tensor itself."""
    if p.nuslerp_flatten or len(shape) < 2:
        return "whole"
    return "columns" if p.nuslerp_row_wise else "rows"


def run(inputs, p: NuslerpParams, ctx) -> dict:
    import torch

    from weightflow.ops.lib.params import resolve
    from weightflow.ops.merge_methods._sphere import chunks_of, inputs_of, slerp_coefficients

    base_art, arts = inputs.get("base"), inputs["models"]
    ckpts = open_models(([base_art] if base_art is not None else []) + list(arts))
    base = ckpts[0] if base_art is not None else None
    pair = ckpts[-2:]
    weights = list(p.weights) if p.weights is not None else [1.0, 1.0]
    coef: dict[str, tuple] = {}

    def t_of(name: str) -> float:
        return interpolation_t(resolve(weights[0], name), resolve(weights[1], name))

    def before(name):
        """Pass 1 for whole-tensor and column vectors: x₀·x₁, |x₀|², |x₁|² (float64)."""
        coef.pop(name, None)
        axis = vector_axis(p, pair[0].info[name].shape)
        if axis == "rows":
            return
        reduce = (lambda v: v.sum()) if axis == "whole" else (lambda v: v.sum(dim=0))
        dot = sq0 = sq1 = torch.zeros((), dtype=torch.float64)
        for x0, x1 in chunks_of(pair, base, name):
            x0, x1 = x0.to(torch.float64), x1.to(torch.float64)
            dot = dot + reduce(x0 * x1)
            sq0 = sq0 + reduce(x0 * x0)
            sq1 = sq1 + reduce(x1 * x1)
        coef[name] = slerp_coefficients(dot, sq0, sq1, t_of(name))

    def compute(name, lo, hi):
        x0, x1 = inputs_of(pair, base, name, lo, hi)
        if name in coef:
            s0, s1 = coef[name]
        else:  # rows along the last dimension: each chunk holds whole rows
            y0, y1 = x0.to(torch.float64), x1.to(torch.float64)
            s0, s1 = slerp_coefficients((y0 * y1).sum(-1, keepdim=True), (y0 * y0).sum(-1, keepdim=True),
                                        (y1 * y1).sum(-1, keepdim=True), t_of(name))
        out = x0 * s0.to(torch.float32) + x1 * s1.to(torch.float32)
        if base is not None:
            out = out + base.get(name, lo, hi).to(torch.float32)
        return out

    template, template_art = (base, base_art) if base is not None else (pair[0], arts[0])
    n = stream_merge(ctx, template, template_art.path, compute, p.dtype or ctx.dtype, before=before)
    return {"tensors": n}


METHOD = MergeMethod("nuslerp", NuslerpParams, run=run, order=5)
