"""``npo``, Negative Preference Optimization (Zhang et al. 2024):
L_forget = −(2/β)·mean log σ(−β·(log π_θ(y) − log π_ref(y))), π_ref the frozen input
model; plus the retain term."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    RETAIN_WEIGHT,
    ForgetBatch,
    Param,
    UnlearnMethod,
)


def forget_loss(batch: ForgetBatch, opts: dict):
    import torch.nn.functional as F

    beta = opts["beta"]  # −β·(log π_θ − log π_ref) = β·(nll_θ − nll_ref)
    return -(2.0 / beta) * F.logsigmoid(beta * (batch.nll_sum - batch.ref_nll_sum)).mean()


METHOD = UnlearnMethod(
    name="npo", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT, "retain_weight": RETAIN_WEIGHT,
            "beta": Param(0.1, "inverse temperature β", gt=0)},
    needs_reference=True, forget_loss=forget_loss)
