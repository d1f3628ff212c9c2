"""``della-linear``: mergekit's ``della_linear``: DELLA's MAGPRUNE selection, then a weighted sum.

Each delta keeps each element with a probability ranked by magnitude within its row,
from density − epsilon (smallest) to density + epsilon (largest) (the ``della``
selection, same masks), rescaled to the delta's L1 norm by default (mergekit's
``rescale: true``), then base + λ·Σ wᵢ·δ̂ᵢ, divided by Σ wᵢ with ``normalize: true``
(left as is where |Σ wᵢ| < 1e-8).  ``della`` with ``sign_consensus: false`` is the same
merge with weightflow's defaults (rescale by each element's own keep probability).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.lang.spec import FiniteFloat, SeedParam
from weightflow.ops.lib.merging import (
    ChunkSelection,
    DeltaMergeParams,
    DeltaRecipe,
    check_density,
    della,
    densities,
    no_consensus,
)
from weightflow.ops.lib.params import PerDelta, resolve
from weightflow.ops.merge_methods import MergeMethod
from weightflow.ops.merge_methods._task_vectors import RescaleOrBool, rescale_choice

WEIGHT_SUM_FLOOR = 1e-8  # mergekit's normalize leaves the sum undivided below this


class DellaLinearParams(DeltaMergeParams, SeedParam):
    """DELLA's MAGPRUNE (keep probabilities density ± epsilon ranked by magnitude per row, L1
    rescale) on each delta, then base + lambda · Σ wᵢ·δ̂ᵢ (divided by Σ wᵢ with `normalize`)."""

    method: Literal["della-linear"]
    density: PerDelta = Field(description="mean keep probability, in (0, 1]; or one per delta")
    epsilon: FiniteFloat = Field(0.15, ge=0, description="spread of keep probabilities: density ± epsilon")
    seed: int | None = Field(None, ge=0, description="mask seed (default: the pipeline's)")
    rescale: RescaleOrBool = Field("l1", description="kept values to the delta's L1 norm (l1 or true, "
                                   "mergekit's default), each over its own keep probability (dare), or "
                                   "unscaled (none or false)")
    normalize: bool = Field(False, description="divide the weighted sum by the sum of the weights")
    _d = field_validator("density")(check_density)
    _r = field_validator("rescale", mode="before")(rescale_choice)

    @model_validator(mode="after")
    def _bounds(self):
        if any(d - self.epsilon <= 0 or d + self.epsilon > 1 for d in densities(self.density)):
            raise ValueError("della-linear needs 0 < density - epsilon and density + epsilon <= 1")
        return self


def della_normalized(p: DellaLinearParams, t):
    """The della selection, divided by Σ wᵢ for this tensor when ``normalize``."""
    select = della(p, t)
    if not p.normalize:
        return select
    weights = p.weights if p.weights is not None else [1.0] * len(p.deltas)
    total = sum(resolve(w, t.name) for w in weights)
    if abs(total) < WEIGHT_SUM_FLOOR:
        return select
    return ChunkSelection(lambda c, j: select.at(c, j) / total, fresh=True)


METHOD = MergeMethod("della-linear", DellaLinearParams, recipe=DeltaRecipe(della_normalized, no_consensus),
                     order=15)
