"""``simnpo`` (Fan et al. 2024): reference-free and length-normalised,
L_forget = −(2/β)·mean log σ(−(β/|y|)·log π_θ(y) − γ); plus the retain term.
The defaults are open-unlearning's (its TOFU recipe also sets forget_weight 0.125)."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    RETAIN_WEIGHT,
    ForgetBatch,
    Param,
    UnlearnMethod,
)


def forget_loss(batch: ForgetBatch, opts: dict):
    import torch.nn.functional as F

    beta, gamma = opts["beta"], opts["gamma"]  # −(β/|y|)·log π_θ(y) − γ = β·nll/|y| − γ
    return -(2.0 / beta) * F.logsigmoid(beta * batch.nll_sum / batch.n_tok.clamp(min=1) - gamma).mean()


METHOD = UnlearnMethod(
    name="simnpo", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT, "retain_weight": RETAIN_WEIGHT,
            "beta": Param(4.5, "inverse temperature β", gt=0),
            "gamma": Param(0.0, "reward margin γ")},
    forget_loss=forget_loss)
