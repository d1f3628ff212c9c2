"""``task-arithmetic``: base + λ·Σ wᵢ·δᵢ (task vectors; a negative weight negates one)."""

from __future__ import annotations

from typing import Literal

from weightflow.ops.lib.merging import (
    DeltaMergeParams,
    DeltaRecipe,
    keep_all,
    no_consensus,
)
from weightflow.ops.merge_methods import MergeMethod


class TaskArithmeticParams(DeltaMergeParams):
    """base + lambda · Σ wᵢ·δᵢ over every element of the deltas (task vectors)."""

    method: Literal["task-arithmetic"]


METHOD = MergeMethod("task-arithmetic", TaskArithmeticParams, recipe=DeltaRecipe(keep_all, no_consensus),
                     order=10)
