"""``undial``, self-distillation with adjusted logits (Dong et al. 2024, "UNDIAL"; as
open-unlearning's UNDIAL): the target at each forget token is the frozen input model's
distribution with the logit of the true token y_t lowered by ``beta``,
q_t = softmax(z_ref,t − β·onehot(y_t)), and L_forget = mean_t CE(q_t, π_θ(·|x_<t)) =
−mean_t Σ_v q_t(v)·log π_θ(v|x_<t) over the target tokens (the KL to q_t plus q_t's
entropy, a constant: the same gradient).  The retain term is off by default
(``retain_weight`` 0, open-unlearning's alpha 0).  open-unlearning averages over every
position, prompt and padding too; here only target tokens count."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    ForgetBatch,
    Param,
    UnlearnMethod,
)


def forget_loss(batch: ForgetBatch, opts: dict):
    import torch.nn.functional as F

    from weightflow.ops.lib.training import IGNORE

    if batch.task == "causal-lm":
        student, teacher, labels = batch.logits[:, :-1], batch.ref_logits[:, :-1], batch.labels[:, 1:]
        mask = labels != IGNORE
        student, teacher, labels = student[mask], teacher[mask], labels[mask]
    else:
        student, teacher, labels = batch.logits, batch.ref_logits, batch.labels
    adjusted = teacher.float() - opts["beta"] * F.one_hot(labels, teacher.shape[-1]).to(teacher.dtype)
    return F.cross_entropy(student, F.softmax(adjusted, -1))


METHOD = UnlearnMethod(
    name="undial", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT, "retain_weight": Param(0.0, "weight of L_retain", ge=0),
            "beta": Param(10.0, "amount β the true token's teacher logit is lowered by", gt=0)},
    needs_reference=True, forget_loss=forget_loss)
