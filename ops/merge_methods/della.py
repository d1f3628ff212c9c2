"""``della``: DELLA-merging (Deep et al. 2024), MAGPRUNE drop probabilities."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.lang.spec import FiniteFloat, SeedParam
from weightflow.ops.lib.merging import (
    DeltaMergeParams,
    DeltaRecipe,
    check_density,
    della,
    densities,
    optional_sign_consensus,
)
from weightflow.ops.lib.params import PerDelta
from weightflow.ops.merge_methods import MergeMethod


class DellaParams(DeltaMergeParams, SeedParam):
    """Keep each element with a probability ranked by magnitude within its row, from
    density − epsilon (smallest) to density + epsilon (largest), rescale the survivors,
    then TIES sign consensus (or a plain sum with `sign_consensus: false`)."""

    method: Literal["della"]
    density: PerDelta = Field(description="mean keep probability, in (0, 1]; or one per delta")
    epsilon: FiniteFloat = Field(0.15, ge=0, description="spread of keep probabilities: density ± epsilon")
    seed: int | None = Field(None, ge=0, description="mask seed (default: the pipeline's)")
    rescale: Literal["dare", "l1", "none"] = Field("dare", description="kept values / their own keep "
                                                   "probability (dare, as the DELLA paper), to the original "
                                                   "L1 norm (l1, mergekit), or unscaled")
    sign_consensus: bool = Field(True, description="TIES sign election (false: della-linear)")
    normalize: bool = Field(True, description="with sign_consensus: disjoint mean or sum")
    _d = field_validator("density")(check_density)

    @model_validator(mode="after")
    def _bounds(self):
        if any(d - self.epsilon <= 0 or d + self.epsilon > 1 for d in densities(self.density)):
            raise ValueError("della needs 0 < density - epsilon and density + epsilon <= 1")
        return self


METHOD = MergeMethod("della", DellaParams, recipe=DeltaRecipe(della, optional_sign_consensus), order=15)
