"""``idk-dpo`` (TOFU's and open-unlearning's IdkDPO): ``dpo`` whose preferred answer y_a to
each forget prompt is a refusal ("I don't know"), one of the 100 templates of TOFU's
idontknow list, fixed per row by the step's seed:
L_forget = −(2/β)·mean log σ(β·(r(y_idk) − r(y_f))), r(y) = log π_θ(y) − log π_ref(y);
plus the retain term.  Needs question/answer data (or pre-tokenized rows and the model's
tokenizer, for the template)."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    RETAIN_WEIGHT,
    Param,
    UnlearnMethod,
    _idk,
)
from weightflow.ops.unlearn_methods.dpo import preference_loss


def alternate(index: int, row: dict, opts: dict, seed: int) -> str:
    return _idk.pick(seed, index)


METHOD = UnlearnMethod(
    name="idk-dpo", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT, "retain_weight": RETAIN_WEIGHT,
            "beta": Param(0.1, "inverse temperature β", gt=0)},
    tasks=("causal-lm",), needs_reference=True, alternate=alternate, forget_loss=preference_loss)
