"""``sce``: SCE, select–calculate–erase (Wan et al. 2024, FuseChat, arXiv 2408.07990), as mergekit.

Per tensor, with task vectors τ₁..τₙ:

- select: keep the k = ⌊select_topk · #{σ² ≠ 0}⌋ elements of largest variance
  σ² = Varᵢ(τᵢ) (population variance across the task vectors), the same elements in
  every τᵢ (with ``select_topk: 1`` all are kept);
- calculate: weigh each task vector by its mass, wᵢ = mean(τ̂ᵢ²) / Σⱼ mean(τ̂ⱼ²)
  (uniform 1/n where that sum is below 1e-6, as mergekit);
- erase: elect each element's sign as sign(Σᵢ τ̂ᵢ) (a zero sum elects +), drop the
  elements of other signs, and take base + λ·Σᵢ wᵢ·mᵢ·τ̂ᵢ / max(Σᵢ wᵢ·mᵢ, 1e-6).

The weights are computed from the data and the sign election is unweighted, which is
why this is not a ``DeltaRecipe`` (whose consensus elects over the user's weights).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import FiniteFloat
from weightflow.ops.merge_methods import MergeMethod
from weightflow.ops.merge_methods._task_vectors import DeltaTensor, TaskVectorParams, merge_task_vectors

UNIFORM_BELOW = 1e-6   # a total mass below this gives every task vector the weight 1/n
DIVISOR_FLOOR = 1e-6   # the erased weights' sum is clamped here


class SceParams(TaskVectorParams):
    """Keep the `select_topk` fraction of elements whose task vectors vary most, weigh each
    task vector by its mean squared value, elect signs and average the agreeing ones (SCE)."""

    method: Literal["sce"]
    select_topk: FiniteFloat = Field(1.0, gt=0, le=1, description="fraction of the elements with the "
                                     "largest variance across the task vectors kept, in (0, 1]")


def variance(taus: list):
    """Population variance across the task vectors, per element."""
    import torch

    return torch.var(torch.stack(taus), dim=0, unbiased=False)


def _fit(p: SceParams):
    def fit(t: DeltaTensor):
        import torch

        from weightflow.ops.lib.sparsify import TopK

        top = None
        if p.select_topk < 1:
            nonzero = sum(int(torch.count_nonzero(variance(cs))) for cs in t.chunks())
            top = TopK.fit(lambda: (variance(cs) for cs in t.chunks()), int(nonzero * p.select_topk))
        mass = [0.0] * len(t.deltas)
        for j, cs in enumerate(t.chunks()):
            for i, tau in enumerate(select(top, cs, j)):
                mass[i] += float(tau.square().sum(dtype=torch.float64))
        mass = [m / t.numel for m in mass]
        total = sum(mass)
        weights = [1 / len(mass)] * len(mass) if abs(total) < UNIFORM_BELOW else [m / total for m in mass]
        return top, weights
    return fit


def select(top, taus: list, j: int) -> list:
    """Chunk ``j`` of every task vector, zero outside the top-k variance elements (all of
    them when ``top`` is None)."""
    import torch

    if top is None:
        return taus
    keep = top.mask_at(variance(taus), j)
    return [torch.where(keep, tau, torch.zeros((), dtype=tau.dtype)) for tau in taus]


def combine(state, taus: list, j: int):
    import torch

    top, weights = state
    taus = select(top, taus, j)
    total = taus[0].clone()
    for tau in taus[1:]:
        total.add_(tau)
    positive = total >= 0
    merged = torch.zeros_like(taus[0])
    divisor = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights, strict=True):
        agree = torch.where(positive, tau > 0, tau < 0).to(torch.float32) * w
        merged.add_(tau * agree)
        divisor.add_(agree)
    return merged / divisor.clamp(min=DIVISOR_FLOOR)


def run(inputs, p: SceParams, ctx) -> dict:
    return merge_task_vectors(inputs, p, ctx, _fit(p), combine)


METHOD = MergeMethod("sce", SceParams, run=run, order=16)
