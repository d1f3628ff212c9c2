"""``slerp``: spherical interpolation of two models per tensor, as mergekit's slerp."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from weightflow.dsl.lang.spec import ModelRef
from weightflow.ops.lib.merging import (
    MergeCommon,
    open_models,
    stream_merge,
    tensor_pass,
)
from weightflow.ops.lib.params import PerTensor, check_range
from weightflow.ops.merge_methods import MergeMethod

DOT_THRESHOLD = 0.9995  # nearly parallel tensors are interpolated linearly
EPS = 1e-8


class SlerpParams(MergeCommon):
    """Spherical interpolation from models[0] (t = 0) to models[1] (t = 1) per tensor; linear
    interpolation where the two tensors are nearly parallel."""

    method: Literal["slerp"]
    models: list[ModelRef] = Field(min_length=2, max_length=2, description="the two models")
    t: PerTensor = Field(description="interpolation factor in [0, 1], or per-tensor rules")

    @field_validator("t")
    @classmethod
    def _t_range(cls, t):
        return check_range(t, 0.0, 1.0, "t")


def run(inputs, p: SlerpParams, ctx) -> dict:
    import torch

    from weightflow.ops.lib.params import resolve

    arts = inputs["models"]
    a, b = open_models(arts)
    coef: dict[str, tuple[float, float]] = {}
    parallel: list[str] = []

    def before(name):
        """Pass 1: norms and the dot product of the two whole tensors -> (s0, s1)."""
        dot = na = nb = 0.0
        for x, y in tensor_pass([a, b], name):
            dot += float((x * y).sum())
            na += float((x * x).sum())
            nb += float((y * y).sum())
        t = resolve(p.t, name)
        na, nb = math.sqrt(na), math.sqrt(nb)
        cos = dot / ((na if na > EPS else 1.0) * (nb if nb > EPS else 1.0))
        if abs(cos) > DOT_THRESHOLD:
            parallel.append(name)
            coef[name] = (1 - t, t)
        else:
            theta = math.acos(max(-1.0, min(1.0, cos)))
            s = math.sin(theta)
            coef[name] = (math.sin(theta - theta * t) / s, math.sin(theta * t) / s)

    def compute(name, lo, hi):
        s0, s1 = coef[name]
        return a.get(name, lo, hi).to(torch.float32) * s0 + b.get(name, lo, hi).to(torch.float32) * s1

    n = stream_merge(ctx, a, arts[0].path, compute, p.dtype or ctx.dtype, before=before)
    ctx.info["lerp_fallback_tensors"] = len(parallel)
    return {"tensors": n}


METHOD = MergeMethod("slerp", SlerpParams, run=run, order=1)
