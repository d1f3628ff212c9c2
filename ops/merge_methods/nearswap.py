"""``nearswap``: take the other model's value where it is near the base's, as mergekit defines it.

Per element, w = clamp(t / max(|a − b|, 1e-6), 0, 1) and the merge is w·b + (1 − w)·a,
a the base and b the other model: elements that differ by less than ``t`` become b's,
larger differences keep a proportionally more of the base.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import FiniteFloat, ModelRef
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.merge_methods import MergeMethod


class NearswapParams(MergeCommon):
    """w·other + (1 − w)·base per element, w = clamp(t / |base − other|, 0, 1) (NearSwap)."""

    method: Literal["nearswap"]
    base: ModelRef = Field(description="step producing the model whose values are kept where far")
    models: list[ModelRef] = Field(min_length=1, max_length=1, description="the one other model")
    t: FiniteFloat = Field(gt=0, description="similarity threshold: differences below it take the other's value")


def run(inputs, p: NearswapParams, ctx) -> dict:
    import torch

    base, other = open_models([inputs["base"], inputs["models"][0]])

    def compute(name, lo, hi):
        a = base.get(name, lo, hi).to(torch.float32)
        b = other.get(name, lo, hi).to(torch.float32)
        w = (p.t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return w * b + (1 - w) * a

    return {"tensors": stream_merge(ctx, base, inputs["base"].path, compute, p.dtype or ctx.dtype)}


METHOD = MergeMethod("nearswap", NearswapParams, run=run, order=4)
