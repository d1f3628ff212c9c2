"""``dare-linear``: DARE on each delta, then a plain weighted sum."""

from __future__ import annotations

from typing import Literal

from weightflow.ops.lib.merging import DareParams, DeltaRecipe, dare, no_consensus
from weightflow.ops.merge_methods import MergeMethod


class DareLinearParams(DareParams):
    """DARE (keep each element with probability `density`, rescale) on each delta, then
    base + lambda · Σ wᵢ·δ̂ᵢ."""

    method: Literal["dare-linear"]


METHOD = MergeMethod("dare-linear", DareLinearParams, recipe=DeltaRecipe(dare, no_consensus), order=13)
