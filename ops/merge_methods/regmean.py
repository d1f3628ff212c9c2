"""``regmean``: RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of
Language Models", arXiv 2212.09849), as FusionBench defines it.

For each linear layer, the merged weight minimises Σᵢ ‖Xᵢ W − Xᵢ Wᵢ‖², the distance between
the merged layer's and each model's outputs on that model's own inputs Xᵢ; in closed form
W* = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢ (W in the [in, out] orientation), with Gᵢ the mean input Gram matrix
of model i (``collect-stats kind: gram``) and G̃ = α·G + (1 − α)·diag(G): off-diagonal entries
scaled by ``alpha`` (FusionBench: ``reduce_non_diagonal_ratio``; 1 is plain RegMean, 0 a
per-input-feature weighted average).  Every other tensor (biases, norms, embeddings, and
linears matched by ``exclude``) is the plain average, as in FusionBench.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import FiniteFloat, ModelRef, StatsRef
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.lib.train_params import AliasedParams, aliased
from weightflow.ops.merge_methods import MergeMethod


class RegMeanParams(MergeCommon, AliasedParams):
    """Per linear layer W* = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢ from each model's input Gram matrix (`stats`:
    collect-stats kind gram, one per model), off-diagonals scaled by `alpha`; other tensors
    averaged (RegMean)."""

    method: Literal["regmean"]
    models: list[ModelRef] = Field(min_length=2, description="steps producing the fine-tuned models")
    stats: list[StatsRef] = Field(min_length=2, description="collect-stats steps (kind: gram), one per "
                                  "model, in the order of 'models'")
    alpha: FiniteFloat = Field(0.9, ge=0, le=1, validation_alias=aliased("alpha", "reduce_non_diagonal_ratio"),
                               description="scale of the Gram matrices' off-diagonal entries, in [0, 1] "
                               "(alias: reduce_non_diagonal_ratio)")
    exclude: list[str] = Field(default_factory=list, description="globs over tensor names averaged "
                               "instead (e.g. 'classifier.*')")

    @model_validator(mode="after")
    def _one_stats_per_model(self):
        if len(self.stats) != len(self.models):
            raise ValueError(f"expected {len(self.models)} entries in 'stats', one per model, got "
                             f"{len(self.stats)}")
        return self


def run(inputs, p: RegMeanParams, ctx) -> dict:  # noqa: C901
    import torch

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.stats import open_stats, regmean_weight

    arts = inputs["models"]
    ckpts = open_models(arts)
    opened = [open_stats(s, "gram", "regmean", m, ctx.warn) for s, m in zip(inputs["stats"], arts, strict=True)]
    grams = [g for g, _ in opened]
    transposed = set(opened[0][1].get("transposed") or [])
    merged: dict[str, torch.Tensor] = {}
    by_regmean: list[str] = []
    inexact: list[str] = []

    def uses_regmean(name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, pat) for pat in p.exclude):
            return False
        have = [name in g for g in grams]
        if any(have) and not all(have):
            missing = next(s.step for s, h in zip(inputs["stats"], have, strict=True) if not h)
            raise OpError(f"stats '{missing}' has no Gram matrix for '{name}', which the other stats have")
        return all(have) and len(ckpts[0].info[name].shape) == 2

    def before(name: str) -> None:
        merged.clear()
        if not uses_regmean(name):
            return
        flip = name in transposed
        ws = [c.get(name).to(torch.float32) for c in ckpts]
        gs = [g.get(name) for g in grams]
        want = ws[0].shape[0] if flip else ws[0].shape[1]
        if any(tuple(g.shape) != (want, want) for g in gs):
            raise OpError(f"the Gram matrix of '{name}' is {list(gs[0].shape)}, but the weight takes "
                          f"{want} inputs: the stats were collected on another architecture")
        w, exact = regmean_weight(ws, gs, p.alpha, transposed=flip)
        merged[name] = w.to(torch.float32)
        by_regmean.append(name)
        if not exact:
            inexact.append(name)

    def compute(name, lo, hi):
        if name in merged:
            return merged[name][lo:hi]
        acc = ckpts[0].get(name, lo, hi).to(torch.float32)
        for c in ckpts[1:]:
            acc.add_(c.get(name, lo, hi).to(torch.float32))
        return acc / len(ckpts)

    written = stream_merge(ctx, ckpts[0], arts[0].path, compute, p.dtype or ctx.dtype, before=before)
    if not by_regmean:
        ctx.warn("no tensor has a Gram matrix in every stats step: the result is the plain average")
    if inexact:
        ctx.warn(f"the summed Gram matrix of {len(inexact)} layer(s) is singular ({inexact[0]}, ...); "
                 "their least-squares solution was used (an alpha below 1 usually avoids this)")
    ctx.info["regmean_tensors"] = len(by_regmean)
    ctx.info["other_tensors"] = written - len(by_regmean)  # averaged, or copied (ints)
    if inexact:
        ctx.info["singular"] = inexact
    return {"tensors": written}


METHOD = MergeMethod("regmean", RegMeanParams, run=run, order=20)
