"""``dare-ties``: DARE on each delta, then TIES sign consensus."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.ops.lib.merging import DareParams, DeltaRecipe, dare, sign_consensus
from weightflow.ops.merge_methods import MergeMethod


class DareTiesParams(DareParams):
    """DARE (keep each element with probability `density`, rescale) on each delta, then TIES
    sign election and disjoint mean."""

    method: Literal["dare-ties"]
    normalize: bool = Field(True, description="disjoint weighted mean (true) or disjoint sum (false)")


METHOD = MergeMethod("dare-ties", DareTiesParams, recipe=DeltaRecipe(dare, sign_consensus), order=12)
