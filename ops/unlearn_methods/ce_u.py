"""``ce-u``, cross-entropy unlearning (Yang et al. 2025, "CE-U: Cross Entropy Unlearning";
as open-unlearning's CEU): at each forget token the target is the model's own
distribution with the true token removed, q_t = softmax(sg(z_t) with z_t[y_t] = −∞), and
L_forget = mean_t CE(q_t, π_θ(·|x_<t)); its gradient p − q pushes the true token's
probability down and spreads it over the others in proportion, bounded where gradient
ascent's is not.  The first ``ignore_first_n_answer_tokens`` target tokens of each example
are left out (the paper's footnote; counted from the first position with a label, so for
plain text the first target token is kept).  No retain term (``retain``, when given, is
only measured)."""

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    ForgetBatch,
    Param,
    UnlearnMethod,
)


def forget_loss(batch: ForgetBatch, opts: dict):
    import torch
    import torch.nn.functional as F

    from weightflow.ops.lib.training import IGNORE

    if batch.task == "causal-lm":
        labels = batch.labels
        has_label = labels != IGNORE
        skipped = has_label & (has_label.cumsum(-1) <= opts["ignore_first_n_answer_tokens"])
        labels = labels.masked_fill(skipped, IGNORE)[:, 1:]
        mask = labels != IGNORE
        logits, labels = batch.logits[:, :-1][mask], labels[mask]
    else:
        logits, labels = batch.logits, batch.labels
    if labels.numel() == 0:  # every target skipped: nothing to unlearn in this batch
        return batch.logits.sum() * 0.0
    target = logits.detach().scatter(-1, labels[:, None], float("-inf"))
    return F.cross_entropy(logits, torch.softmax(target, -1))


METHOD = UnlearnMethod(
    name="ce-u", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT,
            "ignore_first_n_answer_tokens": Param(1, "target tokens left out at the start of each example",
                                                  ge=0, annotation=int)},
    needs_retain="optional", forget_loss=forget_loss)
