"""Memorisation of forget answers under teacher forcing, as open-unlearning reports it, for
records scored on their response (prompt/response fields) or whole text:

- ``exact_memorization`` (Tirumala et al. 2022): the fraction of scored tokens whose greedy
  prediction, given the true prefix, is the gold token; the mean over examples;
- ``extraction_strength`` (Carlini et al. 2021): 1 − k/n for the smallest k such that every
  gold token from position k on is the greedy prediction (n scored tokens): 1 if the whole
  answer is reproduced from the prompt alone, 0 if not even the last token is (open-unlearning's
  loop gives 1/n there); the mean.

Lower after unlearning means less of the forget data can be extracted.  Causal LMs.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.metrics import Metric
from weightflow.ops.metrics.loss import ScoredText, preflight_files


class ExtractionMetric(ScoredText):
    """Exact memorisation and extraction strength (teacher-forced greedy matches)."""

    data: DataPath = Field(description="records to test (typically the forget set)")

    @model_validator(mode="after")
    def _fields(self):
        self.check_fields()
        return self


def strength(hits: list[bool]) -> float:
    """1 − k/n for the smallest k with every prediction from k on a hit."""
    k = len(hits)
    while k > 0 and hits[k - 1]:
        k -= 1
    return 1.0 - k / len(hits)


def extraction(subject, m: ExtractionMetric, ctx) -> tuple[dict, dict]:
    from weightflow.ops.metrics.mia import example_tokens

    tokens = example_tokens(subject, m, ctx.data_path(m.data), "extraction")
    em = [sum(t.hit) / len(t.hit) for t in tokens]
    es = [strength(t.hit) for t in tokens]
    return ({"exact_memorization": sum(em) / len(em), "extraction_strength": sum(es) / len(es), "n": len(em)},
            {"per_example": [{"exact_memorization": a, "extraction_strength": b} for a, b in zip(em, es, strict=True)]})


METRIC = Metric(
    name="extraction", params=ExtractionMetric, compute=extraction, doc=__doc__,
    preflight=lambda m, env: preflight_files(m, env, (m.data,)),
    columns=(("exact_memorization", None, True), ("extraction_strength", None, False), ("n", None, False)),
)
