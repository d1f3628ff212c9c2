"""``ram``: Reinforced Agent Merging (arXiv 2601.13572), as mergekit's ``ram``.

An element counts as changed by a task vector τᵢ where |τᵢ| > ε.  Elements that only one
task vector changes keep its value whole; elements that several change take their
mean; so with cᵢ = #{j : |τⱼ| > ε} per element, merged = base + λ·Σᵢ [|τᵢ| > ε]·τᵢ / c
(0 where c = 0).  Unlike a plain average, a change that only one agent made is not
diluted by the agents that left the element alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import FiniteFloat
from weightflow.ops.merge_methods import MergeMethod
from weightflow.ops.merge_methods._task_vectors import TaskVectorParams, changed, merge_task_vectors


class RamParams(TaskVectorParams):
    """Each element: the value of the one task vector that changes it (|τ| > epsilon), or the
    mean of those that do (Reinforced Agent Merging)."""

    method: Literal["ram"]
    epsilon: FiniteFloat = Field(1e-5, ge=0, description="|τ| above which a task vector changes an element")


def combine(p: RamParams, taus: list, j: int):
    import torch

    nonzero, count = changed(taus, p.epsilon)
    share = count.clamp(min=1).to(torch.float32)
    merged = torch.zeros_like(taus[0])
    for tau, nz in zip(taus, nonzero, strict=True):
        merged.add_(torch.where(nz, tau, torch.zeros((), dtype=tau.dtype)) / share)
    return merged


def run(inputs, p: RamParams, ctx) -> dict:
    return merge_task_vectors(inputs, p, ctx, fit=lambda t: p, combine=combine)


METHOD = MergeMethod("ram", RamParams, run=run, order=17)
