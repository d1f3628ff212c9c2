"""TOFU's model utility: the harmonic mean of three numbers on each of the ``data`` QA files
(retained facts; TOFU also uses real-author and world-fact questions): the normalised answer
probability P(a|q)^(1/|a|) (with ``normalize_probability``, divided by the sum over the answer
and its perturbed answers, as TOFU does for its real-author and world-fact sets), the ROUGE-L
recall of the greedy answer (see ``rouge``) and the truth score mean max(0, 1 − R) (see
``truth_ratio``).  A harmonic mean is low when any one of them is low.  The means of the three
components over the files are reported too.  Causal LMs.
"""

from __future__ import annotations

from pydantic import Field

from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.metrics import Metric
from weightflow.ops.metrics._qa import QAText, preflight_qa


class ModelUtilityMetric(QAText):
    """TOFU's model utility: harmonic mean of probability, ROUGE-L and truth score."""

    data: list[DataPath] = Field(min_length=1, description="QA files with paraphrased and perturbed answers "
                                 "(retained facts, and any general-knowledge sets)")
    paraphrased_field: str = Field("paraphrased_answer", description="field holding the paraphrased true answer")
    perturbed_field: str = Field("perturbed_answer", description="field holding the list of wrong answers")
    normalize_probability: bool = Field(False, description="divide P(a|q)^(1/|a|) by its sum with the perturbed "
                                        "answers' (TOFU's real-author and world-fact sets)")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per answer (greedy), for ROUGE-L")


def harmonic_mean(values: list[float]) -> float:
    """n / Σ 1/x; 0 when any value is 0."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def model_utility(subject, m: ModelUtilityMetric, ctx) -> tuple[dict, dict]:
    from weightflow.ops.metrics._qa import answer_probs, qa_records, truth_ratios
    from weightflow.ops.metrics.rouge import generated_rouge

    parts: dict[str, dict[str, float]] = {}
    for i, f in enumerate(m.data):
        path = ctx.data_path(f)
        rows = qa_records(path, m, (m.answer_field, m.paraphrased_field, m.perturbed_field))
        probs = answer_probs(subject, m, rows, m.answer_field)
        if m.normalize_probability:
            wrong = [answer_probs(subject, m, [{**r, "_x": x} for x in r[m.perturbed_field]], "_x") for r in rows]
            probs = [p / (p + sum(w)) for p, w in zip(probs, wrong, strict=True)]
        recalls, _ = generated_rouge(subject, m, rows, m.max_new_tokens)
        ratios = truth_ratios(subject, m, rows, m.paraphrased_field, m.perturbed_field, path)
        parts[f"data[{i}]"] = {"probability": sum(probs) / len(probs), "rouge_l_recall": sum(recalls) / len(recalls),
                    "truth_score": sum(max(0.0, 1.0 - r) for r in ratios) / len(ratios)}
    numbers = [v for p in parts.values() for v in p.values()]
    mean = {k: sum(p[k] for p in parts.values()) / len(parts) for k in ("probability", "rouge_l_recall", "truth_score")}
    values = {"model_utility": harmonic_mean(numbers), **mean}
    return values, {"per_file": parts}


METRIC = Metric(
    name="model_utility", params=ModelUtilityMetric, compute=model_utility, doc=__doc__,
    preflight=lambda m, env: preflight_qa(m, env, tuple(m.data),
                                          (m.answer_field, m.paraphrased_field, m.perturbed_field)),
    columns=(("model_utility", "higher", True), ("probability", "higher", False),
             ("rouge_l_recall", "higher", False), ("truth_score", "higher", False)),
)
