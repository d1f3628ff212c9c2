"""``ties``: TIES-merging (Yadav et al. 2023): trim, elect signs, disjoint mean."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from weightflow.ops.lib.merging import (
    DeltaMergeParams,
    DeltaRecipe,
    check_density,
    magnitude_trim,
    prepare_magnitude_trim,
    sign_consensus,
)
from weightflow.ops.lib.params import PerDelta
from weightflow.ops.merge_methods import MergeMethod


class TiesParams(DeltaMergeParams):
    """Keep the top-`density` of each delta by magnitude, elect each element's sign as
    sign(Σ wᵢ·δ̂ᵢ), and take the disjoint weighted mean of the agreeing elements (or their
    sum with `normalize: false`)."""

    method: Literal["ties"]
    density: PerDelta = Field(description="fraction of each delta kept by magnitude, in (0, 1]; or one per delta")
    normalize: bool = Field(True, description="disjoint weighted mean (true) or disjoint sum (false)")
    trim_scope: Literal["tensor", "model"] = Field("tensor", description="rank magnitudes per tensor "
                                                   "or over the whole delta")
    _d = field_validator("density")(check_density)

    @model_validator(mode="after")
    def _scope(self):
        one_number = isinstance(self.density, (int, float)) or (
            isinstance(self.density, list) and all(isinstance(d, (int, float)) for d in self.density))
        if self.trim_scope == "model" and not one_number:
            raise ValueError("trim_scope: model needs a number for 'density' (or one per delta), not per-tensor rules")
        return self


METHOD = MergeMethod("ties", TiesParams, order=11,
                     recipe=DeltaRecipe(magnitude_trim, sign_consensus, prepare=prepare_magnitude_trim))
