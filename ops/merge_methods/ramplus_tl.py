"""``ramplus_tl``: RAM+ with tensor-local rescaling (arXiv 2601.13572), as mergekit's ``ramplus_tl``.

RAM (see ``ram``) plus a per task vector, per tensor boost of the elements it alone
changes: with sᵢ the number of elements τᵢ changes that others change too and uᵢ the
number only it changes, ρᵢ = sᵢ / max(uᵢ, ε) and λᵢ = 1 + r·clamp(ρᵢ, 0, α); then
merged = base + λ·Σᵢ [|τᵢ| > ε]·τᵢ·(λᵢ where c = 1, 1/c where c > 1).  A task vector
whose changes mostly overlap the others' has its few unique changes scaled up, since
averaging shrank the rest of it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import FiniteFloat
from weightflow.ops.merge_methods import MergeMethod
from weightflow.ops.merge_methods._task_vectors import DeltaTensor, TaskVectorParams, changed, merge_task_vectors


class RamPlusTLParams(TaskVectorParams):
    """RAM, with each task vector's unique changes scaled by 1 + r·clamp(shared/unique, 0, alpha)
    counted per tensor (RAM+, tensor-local)."""

    method: Literal["ramplus_tl"]
    r: FiniteFloat = Field(0.1, ge=0, description="strength of the rescaling of unique changes")
    alpha: FiniteFloat = Field(0.2, ge=0, description="cap on the shared/unique ratio")
    epsilon: FiniteFloat = Field(1e-5, ge=0, description="|τ| above which a task vector changes an element")


def unique_scale(shared: int, unique: int, p: RamPlusTLParams) -> float:
    """λᵢ = 1 + r·clamp(shared / max(unique, ε), 0, α); a task vector with no unique and no
    shared changes gets 1 (mergekit's 0/0 would be NaN when ε = 0)."""
    den = max(unique, p.epsilon)
    rho = shared / den if den > 0 else (float("inf") if shared else 0.0)
    return 1 + p.r * min(max(rho, 0.0), p.alpha)


def _fit(p: RamPlusTLParams):
    def fit(t: DeltaTensor):
        shared, unique = [0] * len(t.deltas), [0] * len(t.deltas)
        for taus in t.chunks():
            nonzero, count = changed(taus, p.epsilon)
            for i, nz in enumerate(nonzero):
                shared[i] += int((nz & (count > 1)).sum())
                unique[i] += int((nz & (count == 1)).sum())
        return [unique_scale(s, u, p) for s, u in zip(shared, unique, strict=True)]
    return fit


def _combine(p: RamPlusTLParams):
    def combine(scales: list[float], taus: list, j: int):
        import torch

        nonzero, count = changed(taus, p.epsilon)
        only = count == 1
        share = count.clamp(min=1).to(torch.float32)
        zero = torch.zeros((), dtype=torch.float32)
        merged = torch.zeros_like(taus[0])
        for tau, nz, scale in zip(taus, nonzero, scales, strict=True):
            kept = torch.where(nz, tau, zero)
            merged.add_(torch.where(only, kept * scale, kept / share))
        return merged
    return combine


def run(inputs, p: RamPlusTLParams, ctx) -> dict:
    return merge_task_vectors(inputs, p, ctx, _fit(p), _combine(p))


METHOD = MergeMethod("ramplus_tl", RamPlusTLParams, run=run, order=18)
