"""``dpo``, Direct Preference Optimization (Rafailov et al. 2023) as an unlearning method
(TOFU / open-unlearning's DPO): each forget row's answer y_f is the rejected one and its
``alternate_field`` (another answer to the same prompt) the preferred one y_a, against
the frozen input model π_ref: with r(y) = log π_θ(y) − log π_ref(y),
L_forget = −(2/β)·mean log σ(β·(r(y_a) − r(y_f))) (open-unlearning's scaling 2/β);
plus the retain term.  Needs question/answer data (``prompt_field``/``response_field``;
the alternate is a text) or pre-tokenized rows (the alternate is a list of token ids that
replaces the tokens after the prompt, the leading -100 labels)."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    RETAIN_WEIGHT,
    ForgetBatch,
    Param,
    UnlearnMethod,
)


def preference_loss(batch: ForgetBatch, opts: dict):
    """−(2/β)·mean log σ(β·(r(y_a) − r(y_f))), r(y) = log π_θ(y) − log π_ref(y) = nll_ref − nll_θ."""
    import torch.nn.functional as F

    beta = opts["beta"]
    preferred = batch.alt_ref_nll_sum - batch.alt_nll_sum
    rejected = batch.ref_nll_sum - batch.nll_sum
    return -(2.0 / beta) * F.logsigmoid(beta * (preferred - rejected)).mean()


def alternate(index: int, row: dict, opts: dict, seed: int):
    return row[opts["alternate_field"]]


METHOD = UnlearnMethod(
    name="dpo", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT, "retain_weight": RETAIN_WEIGHT,
            "beta": Param(0.1, "inverse temperature β", gt=0),
            "alternate_field": Param("alternate", "field of each forget row holding its preferred answer",
                                     annotation=str)},
    tasks=("causal-lm",), needs_reference=True, alternate=alternate,
    forget_fields=lambda opts: [opts["alternate_field"]], forget_loss=preference_loss)
