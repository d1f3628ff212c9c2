"""``grad-diff``: L_forget = −NLL(forget) (token mean), plus the retain term."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    RETAIN_WEIGHT,
    ForgetBatch,
    UnlearnMethod,
)


def forget_loss(batch: ForgetBatch, opts: dict):
    return -batch.mean_nll()


METHOD = UnlearnMethod(name="grad-diff", doc=__doc__,
                       params={"forget_weight": FORGET_WEIGHT, "retain_weight": RETAIN_WEIGHT},
                       forget_loss=forget_loss)
