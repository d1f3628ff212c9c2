"""``fisher``: Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted
Averaging", arXiv 2111.09832), as FusionBench defines it.

Each parameter is the average of the models' parameters weighted elementwise by their
diagonal Fisher information (``collect-stats kind: fisher``), the Laplace-approximation
posterior precision of each model:

    θ* = Σᵢ cᵢ·(Fᵢ + ε)·θᵢ / Σᵢ cᵢ·(Fᵢ + ε)

``weights`` are the cᵢ (FusionBench's ``fisher_scaling_coefficients``; default equal);
``epsilon`` (FusionBench's ``minimal_fisher_weight``) keeps the quotient defined where
every Fisher is zero (there: the cᵢ-weighted average).  With ``normalize_fisher_weight``
(FusionBench's default) each cᵢ is first multiplied by (1/‖Fᵢ‖) / Σⱼ(1/‖Fⱼ‖), ‖Fᵢ‖ the L2
norm of model i's Fisher over every merged tensor, so a model whose Fisher is larger
overall (trained longer, sharper) does not dominate everywhere.  Tensors without a Fisher
in every stats step (buffers, integer tensors) are the cᵢ-weighted average (copied if
integer).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import FiniteFloat, ModelRef, StatsRef
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.lib.train_params import AliasedParams, aliased
from weightflow.ops.merge_methods import MergeMethod


class FisherParams(MergeCommon, AliasedParams):
    """θ* = Σ cᵢ(Fᵢ + ε)θᵢ / Σ cᵢ(Fᵢ + ε) elementwise, Fᵢ each model's diagonal Fisher (`stats`:
    collect-stats kind fisher, one per model), cᵢ `weights` (Fisher merging)."""

    method: Literal["fisher"]
    models: list[ModelRef] = Field(min_length=2, description="steps producing the fine-tuned models")
    stats: list[StatsRef] = Field(min_length=2, description="collect-stats steps (kind: fisher), one per "
                                  "model, in the order of 'models'")
    weights: list[FiniteFloat] | None = Field(
        None, validation_alias=aliased("weights", "fisher_scaling_coefficients"),
        description="cᵢ, one per model, > 0 (default: equal; alias: fisher_scaling_coefficients)")
    epsilon: FiniteFloat = Field(1e-6, ge=0, validation_alias=aliased("epsilon", "minimal_fisher_weight"),
                                 description="added to every Fisher value (alias: minimal_fisher_weight)")
    normalize_fisher_weight: bool = Field(True, description="scale each model's cᵢ by the inverse L2 "
                                          "norm of its Fisher (FusionBench's default)")

    @model_validator(mode="after")
    def _one_per_model(self):
        if len(self.stats) != len(self.models):
            raise ValueError(f"expected {len(self.models)} entries in 'stats', one per model, got "
                             f"{len(self.stats)}")
        if self.weights is not None and any(w <= 0 for w in self.weights):
            raise ValueError(f"weights must be > 0 (they scale a Fisher, a precision), got {self.weights}")
        return self


def run(inputs, p: FisherParams, ctx) -> dict:
    import torch

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.stats import fisher_average, fisher_norms, open_stats

    arts = inputs["models"]
    ckpts = open_models(arts)
    fishers = [open_stats(s, "fisher", "fisher", m, ctx.warn)[0]
               for s, m in zip(inputs["stats"], arts, strict=True)]
    base = ckpts[0]
    names = [n for n in base.names() if base.is_float(n) and all(n in f for f in fishers)]
    for n in names:
        for f, s in zip(fishers, inputs["stats"], strict=True):
            if tuple(f.info[n].shape) != tuple(base.info[n].shape):
                raise OpError(f"the Fisher of '{n}' in stats '{s.step}' has shape {list(f.info[n].shape)}, the "
                              f"tensor {list(base.info[n].shape)}: the stats were collected on another model")
    coeffs = list(p.weights) if p.weights is not None else [1.0 / len(ckpts)] * len(ckpts)
    if p.normalize_fisher_weight and names:
        norms = fisher_norms(fishers, names)
        inv = [1.0 / (x + p.epsilon) if x + p.epsilon > 0 else 0.0 for x in norms]
        if sum(inv) == 0:
            raise OpError("every Fisher is zero and epsilon is 0: nothing to normalise by")
        coeffs = [c * v / sum(inv) for c, v in zip(coeffs, inv, strict=True)]
        ctx.info["fisher_norms"] = [round(x, 6) for x in norms]
    ctx.info["coefficients"] = [round(c, 6) for c in coeffs]
    weighted = set(names)
    total = sum(coeffs)

    def compute(name, lo, hi):
        values = [c.get(name, lo, hi) for c in ckpts]
        if name in weighted:
            out = fisher_average(values, [f.get(name, lo, hi) for f in fishers], coeffs, p.epsilon)
            if p.epsilon == 0:  # 0/0 where every Fisher vanishes: the weighted average there
                avg = sum(c * v.to(torch.float64) for c, v in zip(coeffs, values, strict=True)) / total
                out = torch.where(torch.isfinite(out), out, avg)
            return out.to(torch.float32)
        return (sum(c * v.to(torch.float64) for c, v in zip(coeffs, values, strict=True)) / total).to(torch.float32)

    written = stream_merge(ctx, base, arts[0].path, compute, p.dtype or ctx.dtype)
    if not names:
        ctx.warn("no tensor has a Fisher in every stats step: the result is the weighted average")
    ctx.info["fisher_tensors"] = len(names)
    return {"tensors": written}


METHOD = MergeMethod("fisher", FisherParams, run=run, order=21)
