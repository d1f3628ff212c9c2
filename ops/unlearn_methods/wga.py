"""``wga``, Weighted Gradient Ascent (Wang et al. 2025, "Rethinking LLM unlearning
objectives: a gradient perspective"; as open-unlearning's WGA): gradient ascent where
each forget token's NLL is weighted by the model's own probability of that token raised
to ``beta``, held constant in the gradient: L_forget = −mean_t sg(π_θ(y_t)^β)·(−log
π_θ(y_t)), the mean over every target token of the batch; plus the retain term
(open-unlearning's gamma and alpha are ``forget_weight`` and ``retain_weight``).  Tokens
the model already finds unlikely get little push, so ascent stops chasing them."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    RETAIN_WEIGHT,
    ForgetBatch,
    Param,
    UnlearnMethod,
)


def forget_loss(batch: ForgetBatch, opts: dict):
    nll, mask = batch.token_nll()  # −log π_θ(y_t) per target position
    weight = (-nll).exp().detach() ** opts["beta"]  # π_θ(y_t)^β, no gradient through it
    return -(weight * nll)[mask].mean()


METHOD = UnlearnMethod(
    name="wga", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT, "retain_weight": RETAIN_WEIGHT,
            "beta": Param(1.0, "exponent β of the token weights π_θ(y_t)^β", gt=0)},
    forget_loss=forget_loss)
