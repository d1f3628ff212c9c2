"""``satimp`` (Yang et al. 2025, "Exploring criteria of loss reweighting to enhance LLM
unlearning"; as open-unlearning's SatImp): gradient ascent with per-token weights that
combine saturation and importance, p_t = π_θ(y_t) held constant in the gradient:
w_t = sg(p_t^β1·(1 − p_t)^β2) and L_forget = −mean_t w_t·(−log p_t), the mean over every
target token of the batch; plus the retain term.  Defaults are open-unlearning's SatImp
config (its gamma 0.1 and alpha 1 are ``forget_weight`` and ``retain_weight``)."""

from weightflow.ops.unlearn_methods import (
    RETAIN_WEIGHT,
    ForgetBatch,
    Param,
    UnlearnMethod,
)


def forget_loss(batch: ForgetBatch, opts: dict):
    nll, mask = batch.token_nll()  # −log p_t per target position
    p = (-nll).exp().detach()
    weight = p ** opts["beta1"] * (1 - p) ** opts["beta2"]
    return -(weight * nll)[mask].mean()


METHOD = UnlearnMethod(
    name="satimp", doc=__doc__,
    params={"forget_weight": Param(0.1, "weight of L_forget", ge=0), "retain_weight": RETAIN_WEIGHT,
            "beta1": Param(5.0, "exponent β1 of the saturation weight p^β1", ge=0),
            "beta2": Param(1.0, "exponent β2 of the importance weight (1 − p)^β2", ge=0)},
    forget_loss=forget_loss)
