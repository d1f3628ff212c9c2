"""``breadcrumbs-ties``: mergekit's ``breadcrumbs_ties``: Model Breadcrumbs' selection, then TIES.

Each delta drops its largest ``gamma`` fraction (outliers) and keeps the next
``density`` by magnitude (the ``breadcrumbs`` selection), optionally rescaled to its L1
norm (``rescale``); then TIES: elect each element's sign as sign(Σ wᵢ·δ̂ᵢ) (a zero sum
elects +) and take the disjoint sum Σ wᵢ·δ̂ᵢ·mᵢ of the agreeing terms, or with
``normalize: true`` their disjoint weighted mean, 0 where none agrees.  mergekit's
defaults: no rescale, no normalisation (``breadcrumbs`` with ``sign_consensus: true``
normalises by default).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, field_validator, model_validator

from weightflow.dsl.lang.spec import FiniteFloat
from weightflow.ops.lib.merging import (
    ChunkSelection,
    DeltaMergeParams,
    DeltaRecipe,
    breadcrumbs,
    check_density,
    densities,
    sign_consensus,
)
from weightflow.ops.lib.params import PerDelta
from weightflow.ops.merge_methods import MergeMethod
from weightflow.ops.merge_methods._task_vectors import l1_rescale, rescale_choice


class BreadcrumbsTiesParams(DeltaMergeParams):
    """Drop the largest `gamma` fraction of each delta and the smallest, keeping `density`; then
    TIES sign election and the disjoint sum (or mean with `normalize`) of the agreeing elements."""

    method: Literal["breadcrumbs-ties"]
    density: PerDelta = Field(description="fraction kept, in (0, 1]; or one per delta")
    gamma: FiniteFloat = Field(0.01, ge=0, lt=1, description="fraction of largest magnitudes dropped")
    rescale: Literal["l1", "none"] | StrictBool = Field("none", description="kept values to the delta's L1 norm "
                                                  "(l1 or true) or unscaled (none or false)")
    normalize: bool = Field(False, description="disjoint weighted mean (true) or disjoint sum (false)")
    _d = field_validator("density")(check_density)
    _r = field_validator("rescale", mode="before")(rescale_choice)

    @model_validator(mode="after")
    def _fits(self):
        if any(d + self.gamma > 1 for d in densities(self.density)):
            raise ValueError("density + gamma must be <= 1")
        return self


def breadcrumbs_rescaled(p: BreadcrumbsTiesParams, t):
    """The breadcrumbs selection, times ‖δ‖₁ / ‖δ̂‖₁ with ``rescale: l1``."""
    select = breadcrumbs(p, t)
    if p.rescale != "l1":
        return select
    factor = l1_rescale(select.at, t.chunks)
    return ChunkSelection(lambda c, j: select.at(c, j) * factor, fresh=True)


METHOD = MergeMethod("breadcrumbs-ties", BreadcrumbsTiesParams, order=14,
                     recipe=DeltaRecipe(breadcrumbs_rescaled, sign_consensus))
