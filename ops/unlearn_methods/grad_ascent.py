"""``grad-ascent``: L_forget = −NLL(forget) (token mean); no retain term (``retain``,
when given, is only measured)."""

from weightflow.ops.unlearn_methods import FORGET_WEIGHT, ForgetBatch, UnlearnMethod


def forget_loss(batch: ForgetBatch, opts: dict):
    return -batch.mean_nll()


METHOD = UnlearnMethod(name="grad-ascent", doc=__doc__, params={"forget_weight": FORGET_WEIGHT},
                       needs_retain="optional", forget_loss=forget_loss)
