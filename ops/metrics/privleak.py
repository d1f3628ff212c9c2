"""MUSE's privacy leakage: how far the evaluated model's membership-inference AUC on ``forget``
vs ``holdout`` records is from that of a ``reference`` model trained without the forget set
(exact unlearning's gold standard), relative to the reference's:
PrivLeak = (AUC_model − AUC_reference) / AUC_reference · 100, in percent, with the ``attack``
of ``mia`` (MUSE uses Min-K% Prob).  0 is ideal; positive: the forget set is still
recognisable (under-unlearning); negative: it is recognisably *absent*, which leaks too
(over-unlearning).  Both AUCs are reported.  Causal LMs.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import DataPath, ModelRef
from weightflow.ops.metrics import Metric
from weightflow.ops.metrics.loss import ScoredText, preflight_files
from weightflow.ops.metrics.mia import Attack


class PrivLeakMetric(ScoredText):
    """Relative MIA AUC against a retain-only reference model (MUSE's PrivLeak)."""

    forget: DataPath = Field(description="records the model saw before unlearning (members)")
    holdout: DataPath = Field(description="records of the same distribution never trained on")
    reference: ModelRef = Field(description="step producing the model trained without the forget set")
    attack: Attack = Field("min-k", description="the membership-inference attack (see mia)")
    k: float = Field(0.4, gt=0, le=1, description="Min-K% fraction of lowest-scoring tokens averaged")

    @model_validator(mode="after")
    def _fields(self):
        self.check_fields()
        return self

    @property
    def attacks(self) -> list[str]:
        return [self.attack]


def privleak(subject, m: PrivLeakMetric, ctx) -> tuple[dict, dict]:
    from weightflow.ops.metrics._qa import on_reference
    from weightflow.ops.metrics.mia import mia_aucs

    ours, nf, nh = mia_aucs(subject, m, ctx, "privleak")
    paths = [ctx.data_path(m.forget), ctx.data_path(m.holdout)]
    (theirs, _, _), ref_digest = on_reference(subject, m, paths, lambda ref: mia_aucs(ref, m, ctx, "privleak"))
    a, r = ours[m.attack], theirs[m.attack]
    return ({"privleak": (a - r) / r * 100 if r > 0 else None, "auc": a, "reference_auc": r,
             "n_forget": nf, "n_holdout": nh}, {"reference_digest": ref_digest})


METRIC = Metric(
    name="privleak", params=PrivLeakMetric, compute=privleak, doc=__doc__,
    preflight=lambda m, env: preflight_files(m, env, (m.forget, m.holdout)),
    columns=(("privleak", None, True), ("auc", None, False), ("reference_auc", None, False),
             ("n_forget", None, False), ("n_holdout", None, False)),
)
