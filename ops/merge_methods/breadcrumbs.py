"""``breadcrumbs``: Model Breadcrumbs (Davari & Belilovsky 2023)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.lang.spec import FiniteFloat
from weightflow.ops.lib.merging import (
    DeltaMergeParams,
    DeltaRecipe,
    breadcrumbs,
    check_density,
    densities,
    optional_sign_consensus,
)
from weightflow.ops.lib.params import PerDelta
from weightflow.ops.merge_methods import MergeMethod


class BreadcrumbsParams(DeltaMergeParams):
    """Drop the largest `gamma` fraction of each delta (outliers) and the smallest, keeping
    `density`; combine by a weighted sum, or TIES with `sign_consensus: true`."""

    method: Literal["breadcrumbs"]
    density: PerDelta = Field(description="fraction kept, in (0, 1]; or one per delta")
    gamma: FiniteFloat = Field(0.01, ge=0, lt=1, description="fraction of largest magnitudes dropped")
    sign_consensus: bool = Field(False, description="combine with TIES sign election")
    normalize: bool = Field(True, description="with sign_consensus: disjoint mean or sum")
    _d = field_validator("density")(check_density)

    @model_validator(mode="after")
    def _fits(self):
        if any(d + self.gamma > 1 for d in densities(self.density)):
            raise ValueError("density + gamma must be <= 1")
        return self


METHOD = MergeMethod("breadcrumbs", BreadcrumbsParams, recipe=DeltaRecipe(breadcrumbs, optional_sign_consensus),
                     order=14)
