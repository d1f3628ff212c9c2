"""TOFU's truth ratio on QA records with a ``paraphrased`` true answer and a list of
``perturbed`` wrong ones: R = (Π_ã P(ã|q)^(1/|ã|))^(1/k) / P(â|q)^(1/|â|), per record.  R < 1
means the model prefers the true fact.  Reported: ``truth_ratio``, the mean of R;
``truth_score`` = mean max(0, 1 − R), TOFU's component of model utility on retained data
(higher is better); ``truth_closeness`` = mean min(R, 1/R), how indistinguishable true and
false answers are, the forget-set aggregate open-unlearning reports (1: cannot tell them
apart, as a model that never saw the facts).  Causal LMs.
"""

from __future__ import annotations

from pydantic import Field

from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.metrics import Metric
from weightflow.ops.metrics._qa import QAText, preflight_qa


class TruthRatioMetric(QAText):
    """TOFU's truth ratio of paraphrased vs perturbed answers."""

    data: DataPath = Field(description="QA records with a paraphrased and perturbed answers")
    paraphrased_field: str = Field("paraphrased_answer", description="field holding the paraphrased true answer")
    perturbed_field: str = Field("perturbed_answer", description="field holding the list of wrong answers")


def record_ratios(subject, m, path) -> list[float]:
    from weightflow.ops.metrics._qa import qa_records, truth_ratios

    rows = qa_records(path, m, (m.paraphrased_field, m.perturbed_field))
    return truth_ratios(subject, m, rows, m.paraphrased_field, m.perturbed_field, path)


def truth_ratio(subject, m: TruthRatioMetric, ctx) -> tuple[dict, dict]:
    ratios = record_ratios(subject, m, ctx.data_path(m.data))
    n = len(ratios)
    values = {"truth_ratio": sum(ratios) / n,
              "truth_score": sum(max(0.0, 1.0 - r) for r in ratios) / n,
              "truth_closeness": sum(min(r, 1.0 / r) for r in ratios) / n,
              "n": n}
    return values, {"ratios": ratios}


METRIC = Metric(
    name="truth_ratio", params=TruthRatioMetric, compute=truth_ratio, doc=__doc__,
    preflight=lambda m, env: preflight_qa(m, env, (m.data,), (m.paraphrased_field, m.perturbed_field)),
    columns=(("truth_ratio", None, True), ("truth_score", "higher", False), ("truth_closeness", None, False),
             ("n", None, False)),
)
