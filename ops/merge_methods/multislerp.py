"""``multislerp``: barycentric interpolation of two or more models on a hypersphere, as
mergekit's multislerp (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

Per tensor, with xᵢ the flattened models (or task vectors Mᵢ − base with a ``base``),
uᵢ = xᵢ / (|xᵢ| + eps) and weights wᵢ (divided by Σ wᵢ with ``normalize_weights``):
project onto the tangent space at the normalised weighted mean m̂ of the uᵢ, average
there, map back with the exponential map and scale by Σ wᵢ·|xᵢ|:

    m̂ = normalise(Σ wᵢ·uᵢ),  τ = Σ wᵢ·(uᵢ − (uᵢ·m̂)·m̂),
    result = (m̂·cos(|τ| + eps) + τ·sin(|τ| + eps)/(|τ| + eps))·Σ wᵢ·|xᵢ|  (+ base).

The result is a combination of the xᵢ whose coefficients come from their Gram matrix, so
the tensors stream: one pass of row chunks for the products, one to write.  Two inputs whose
weighted unit vectors cancel are averaged linearly; more than two are an error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import FiniteFloat, ModelRef
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.lib.params import PerTensor
from weightflow.ops.merge_methods import MergeMethod

ZERO_SUM = 1e-12  # weights summing to less than this in magnitude cannot be normalised


class MultislerpParams(MergeCommon):
    """Barycentric SLERP of two or more models (or, with `base`, of their task vectors): the
    weighted mean of their directions on the sphere times their weighted mean norm (mergekit's
    Multi-SLERP)."""

    method: Literal["multislerp"]
    base: ModelRef | None = Field(None, description="optional step producing a base model: the task "
                                  "vectors models − base are interpolated and the base added back")
    models: list[ModelRef] = Field(min_length=2, description="steps producing two or more models")
    weights: list[PerTensor] | None = Field(None, description="one per model (default: 1 each)")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: FiniteFloat = Field(1e-8, gt=0, description="added to norms for numerical stability")

    @model_validator(mode="after")
    def _weights_to_normalize(self):
        plain = self.weights is not None and all(isinstance(w, (int, float)) for w in self.weights)
        if self.normalize_weights and plain and abs(sum(self.weights)) < ZERO_SUM:  # type: ignore[arg-type]
            raise ValueError(f"normalize_weights: true needs weights whose sum is not zero, got {self.weights}")
        return self


def run(inputs, p: MultislerpParams, ctx) -> dict:
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.params import resolve
    from weightflow.ops.merge_methods._sphere import barycentric_coefficients, combine, gram, inputs_of

    base_art, arts = inputs.get("base"), inputs["models"]
    ckpts = open_models(([base_art] if base_art is not None else []) + list(arts))
    base = ckpts[0] if base_art is not None else None
    models = ckpts[1:] if base is not None else ckpts
    weights = list(p.weights) if p.weights is not None else [1.0] * len(models)
    coef: dict[str, list[float]] = {}
    linear: list[str] = []

    def before(name):
        """Pass 1: the Gram matrix of the xᵢ (float64) -> the coefficients of Σ cᵢ·xᵢ."""
        ws = [resolve(w, name) for w in weights]
        if p.normalize_weights:
            total = sum(ws)
            if abs(total) < ZERO_SUM:
                raise OpError(f"normalize_weights: true needs weights whose sum is not zero (tensor '{name}')")
            ws = [w / total for w in ws]
        c = barycentric_coefficients(gram(models, base, name), ws, p.eps)
        if c is None:
            if len(models) != 2:
                raise OpError(f"multislerp: the weighted directions of the models cancel out in tensor "
                              f"'{name}' (antipodal tensors with balancing weights); use other weights")
            linear.append(name)
            c = ws  # two models: linear interpolation, as mergekit falls back to
        coef[name] = c

    def compute(name, lo, hi):
        out = combine(coef[name], inputs_of(models, base, name, lo, hi))
        if base is not None:
            out = out + base.get(name, lo, hi).float()
        return out

    template, template_art = (base, base_art) if base is not None else (models[0], arts[0])
    n = stream_merge(ctx, template, template_art.path, compute, p.dtype or ctx.dtype, before=before)
    ctx.info["lerp_fallback_tensors"] = len(linear)
    return {"tensors": n}


METHOD = MergeMethod("multislerp", MultislerpParams, run=run, order=6)
