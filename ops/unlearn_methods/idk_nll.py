"""``idk-nll`` (TOFU's "IDK" baseline, Maini et al. 2024): fine-tune the model to answer
each forget prompt with a refusal instead of its answer: L_forget = NLL(y_idk | x_f)
(token mean), y_idk one of the 100 templates of TOFU's idontknow list, fixed per row by
the step's seed; plus the retain term.  Needs question/answer data (or pre-tokenized rows
and the model's tokenizer)."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    RETAIN_WEIGHT,
    ForgetBatch,
    UnlearnMethod,
)
from weightflow.ops.unlearn_methods.idk_dpo import alternate


def forget_loss(batch: ForgetBatch, opts: dict):
    return batch.alt_nll_sum.sum() / batch.alt_n_tok.sum().clamp(min=1)


METHOD = UnlearnMethod(
    name="idk-nll", doc=__doc__, params={"forget_weight": FORGET_WEIGHT, "retain_weight": RETAIN_WEIGHT},
    tasks=("causal-lm",), alternate=alternate, forget_loss=forget_loss)
