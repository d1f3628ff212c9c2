"""TOFU's forget quality: the p-value of the two-sample Kolmogorov-Smirnov test between the
truth ratios (see ``truth_ratio``) of the evaluated model and of a ``reference`` model trained
on the retained data only (exact unlearning's gold standard), on the same forget records.
High (near 1): the two distributions cannot be told apart, as if the forget set had never
been seen; TOFU calls forgetting effective above 0.05.  ``ks_statistic`` is the test's D, the
largest gap between the two empirical CDFs.  The p-value is scipy's ``ks_2samp`` (exact for
small samples, as TOFU computes it).  Causal LMs.
"""

from __future__ import annotations

from pydantic import Field

from weightflow.dsl.lang.spec import DataPath, ModelRef
from weightflow.ops.metrics import Metric
from weightflow.ops.metrics._qa import QAText, preflight_qa


class ForgetQualityMetric(QAText):
    """KS-test p-value of truth ratios against a retain-only reference model."""

    forget: DataPath = Field(description="forget QA records with paraphrased and perturbed answers")
    reference: ModelRef = Field(description="step producing the model trained without the forget set")
    paraphrased_field: str = Field("paraphrased_answer", description="field holding the paraphrased true answer")
    perturbed_field: str = Field("perturbed_answer", description="field holding the list of wrong answers")


def ks_test(a: list[float], b: list[float]) -> tuple[float, float]:
    """(D, p-value) of the two-sample KS test, two-sided, as scipy computes it."""
    from scipy.stats import ks_2samp

    res = ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue)


def forget_quality(subject, m: ForgetQualityMetric, ctx) -> tuple[dict, dict]:
    from weightflow.ops.metrics._qa import on_reference
    from weightflow.ops.metrics.truth_ratio import record_ratios

    path = ctx.data_path(m.forget)
    ours = record_ratios(subject, m, path)
    theirs, ref_digest = on_reference(subject, m, [path], lambda ref: record_ratios(ref, m, path))
    d, p = ks_test(ours, theirs)
    return ({"forget_quality": p, "ks_statistic": d, "n": len(ours)},
            {"ratios": ours, "reference_ratios": list(theirs), "reference_digest": ref_digest})


METRIC = Metric(
    name="forget_quality", params=ForgetQualityMetric, compute=forget_quality, doc=__doc__,
    preflight=lambda m, env: preflight_qa(m, env, (m.forget,), (m.paraphrased_field, m.perturbed_field)),
    columns=(("forget_quality", "higher", True), ("ks_statistic", "lower", False), ("n", None, False)),
)
