"""``karcher``: the Karcher (Riemannian, Fréchet) mean of two or more models on the unit
hypersphere, as mergekit's karcher (arXiv 2603.04972).

Per tensor, with uᵢ = xᵢ/|xᵢ| the directions of the k flattened models, the mean direction
μ minimises Σ d(μ, uᵢ)², d the great-circle distance; it is found by the fixed-point
iteration below from the normalised Euclidean mean, and the merge is μ·Σ|xᵢ|/k:

    θᵢ = arccos(μ·uᵢ),  τ = Σ (1/k)·θᵢ/sin θᵢ·(uᵢ − (μ·uᵢ)·μ),
    μ ← normalise(cos|τ|·μ + sin|τ|·τ/|τ|),   until |τ| < tol or ``max_iter`` steps.

Inputs of norm ≤ tol are left out of the direction (still counted in the norm).  Memory:
every iterate is a combination of the uᵢ, so the iteration runs on k coefficients and the
k×k Gram matrix Gᵢⱼ = xᵢ·xⱼ (float64); the tensors stream in row chunks, read twice (once
for G, once to write), so no whole tensor of any model is held at a time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import FiniteFloat, ModelRef
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.merge_methods import MergeMethod


class KarcherParams(MergeCommon):
    """The Karcher (Riemannian) mean of the models' directions on the unit sphere, times their mean
    norm, per tensor (mergekit's Karcher Mean)."""

    method: Literal["karcher"]
    models: list[ModelRef] = Field(min_length=2, description="steps producing two or more models")
    max_iter: int = Field(10, ge=1, description="most fixed-point iterations per tensor")
    tol: FiniteFloat = Field(1e-5, gt=0, description="stop once the tangent step is shorter than this; "
                             "angles and norms below it count as zero")


def run(inputs, p: KarcherParams, ctx) -> dict:
    from weightflow.ops.merge_methods._sphere import combine, gram, inputs_of, karcher_coefficients

    arts = inputs["models"]
    models = open_models(arts)
    coef: dict[str, list[float]] = {}
    unconverged: list[str] = []

    def before(name):
        """Pass 1: the Gram matrix of the models' tensors -> the Karcher mean's coefficients."""
        coef[name], converged = karcher_coefficients(gram(models, None, name), p.max_iter, p.tol)
        if not converged:
            unconverged.append(name)

    def compute(name, lo, hi):
        return combine(coef[name], inputs_of(models, None, name, lo, hi))

    n = stream_merge(ctx, models[0], arts[0].path, compute, p.dtype or ctx.dtype, before=before)
    ctx.info["unconverged_tensors"] = len(unconverged)  # stopped by max_iter, not tol
    return {"tensors": n}


METHOD = MergeMethod("karcher", KarcherParams, run=run, order=7)
