"""Membership inference by loss: how well a model's per-example loss tells its ``forget``
records (members) from ``holdout`` records (non-members, from the same distribution).  The
attack score of an example is minus its loss (mean token NLL for causal LMs, cross-entropy
for classifiers; encoded and scored exactly as ``loss`` does), so a lower loss says
"member"; ``auc`` is P(score of a member > score of a non-member) + ½·P(tie), counted
exactly over every pair (the Mann-Whitney statistic).  Neither direction is better: after
training on the forget set it is near 1, and unlearning aims at ~0.5 (indistinguishable
from unseen data), while well below 0.5 gives the forgetting away too.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.metrics import Metric
from weightflow.ops.metrics._ranking import auc
from weightflow.ops.metrics.loss import ScoredText, preflight_files


class MiaLossMetric(ScoredText):
    """Loss-based membership-inference AUC of forget (members) vs holdout (non-members)."""

    forget: DataPath = Field(description="records the model saw (members)")
    holdout: DataPath = Field(description="records of the same distribution it did not see")

    @model_validator(mode="after")
    def _fields(self):
        self.check_fields()
        return self


def mia_loss(subject, m: MiaLossMetric, ctx) -> tuple[dict, dict]:
    from weightflow.ops.metrics._scoring import example_losses

    forget = example_losses(subject, m, ctx.data_path(m.forget), "mia_loss")
    holdout = example_losses(subject, m, ctx.data_path(m.holdout), "mia_loss")
    values = {"auc": auc([-x for x in forget], [-x for x in holdout]),
              "n_forget": len(forget), "n_holdout": len(holdout)}
    return values, {"forget_loss": sum(forget) / len(forget), "holdout_loss": sum(holdout) / len(holdout)}


METRIC = Metric(
    name="mia_loss", params=MiaLossMetric, compute=mia_loss, doc=__doc__,
    preflight=lambda m, env: preflight_files(m, env, (m.forget, m.holdout)),
    columns=(("auc", None, True), ("n_forget", None, False), ("n_holdout", None, False)),
)
