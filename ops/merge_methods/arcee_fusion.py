"""``arcee_fusion``: Arcee Fusion, as mergekit's ``arcee_fusion``: take the other model's value
only where it matters.

Per tensor of the base B and the other model M, the importance of each element is
|M − B| · KL(softmax(M) ‖ softmax(B)), the KL taken along the last dimension (per row;
a 1-D tensor is one row), with p = softmax(M) + 1e-8 and q = softmax(B) + 1e-8:
KL = Σ p·log(p/q).  The threshold is dynamic, an outlier fence over the tensor's
importances, τ = median + 1.5·(Q₃ − Q₁) (quartiles at sorted positions
⌊q·(n − 1)⌋), and the merge is B + (M − B)·[importance ≥ τ]: only the changes that
stand out are fused.  The quartiles are exact over the whole tensor (mergekit samples
10⁶ elements at random with replacement above that size, so it only differs from this
on tensors of more than 10⁶ elements, where its own output is random).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import ModelRef
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.merge_methods import MergeMethod
from weightflow.ops.merge_methods._task_vectors import order_statistics

SOFTMAX_EPS = 1e-8
FENCE = 1.5           # Tukey's outlier fence: median + 1.5 · IQR


class ArceeFusionParams(MergeCommon):
    """base + (other − base) where |other − base| · KL(softmax(other) ‖ softmax(base)) is at
    least median + 1.5·IQR of the tensor's importances (Arcee Fusion)."""

    method: Literal["arcee_fusion"]
    base: ModelRef = Field(description="step producing the model fused into")
    models: list[ModelRef] = Field(min_length=1, max_length=1, description="the one other model")


def importance(other, base):
    """|M − B| · Σ_last p·log(p/q), p = softmax(M) + ε, q = softmax(B) + ε."""
    import torch

    p = torch.softmax(other, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def fence(chunks, n: int) -> float:
    """median + 1.5·(Q₃ − Q₁) of the ``n`` importances ``chunks()`` yields, in float32."""
    import torch

    q1, median, q3 = (torch.tensor(v, dtype=torch.float32)
                      for v in order_statistics(chunks, [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]))
    return float(median + FENCE * (q3 - q1))


def run(inputs, p: ArceeFusionParams, ctx) -> dict:
    import math

    import torch

    from weightflow.ops.lib.tensors import row_ranges

    base, other = open_models([inputs["base"], inputs["models"][0]])
    state: dict = {}

    def rows(name, lo, hi):
        return other.get(name, lo, hi).to(torch.float32), base.get(name, lo, hi).to(torch.float32)

    def before(name):
        state.clear()
        shape = base.info[name].shape
        n = math.prod(shape)
        if n == 0:
            return
        if len(shape) < 2:  # the KL runs along the whole vector: score it whole
            whole = importance(*rows(name, None, None))
            state["importance"] = whole
            state["threshold"] = fence(lambda: iter([whole]), n)
        else:
            state["threshold"] = fence(lambda: (importance(*rows(name, lo, hi)) for lo, hi in row_ranges(shape)), n)

    def compute(name, lo, hi):
        m, b = rows(name, lo, hi)
        if "threshold" not in state:
            return b
        score = state.get("importance")
        if score is None:
            score = importance(m, b)
        elif lo is not None:
            score = score[lo:hi]
        return b + (m - b) * (score >= state["threshold"]).to(torch.float32)

    return {"tensors": stream_merge(ctx, base, inputs["base"].path, compute, p.dtype or ctx.dtype, before=before)}


METHOD = MergeMethod("arcee_fusion", ArceeFusionParams, run=run, order=8)
