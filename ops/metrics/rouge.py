"""ROUGE-L recall of greedy answers: each question is answered greedily (``max_new_tokens``,
through the chat template with ``chat_template``) and the answer is compared with the gold
``answer``: LCS(gold, generated) / |gold| over words, as TOFU and open-unlearning report it
(``rouge_l_f1`` also given).  Words are rouge-score's default tokens: lower-cased, every run
of characters other than a-z and 0-9 a separator, no stemming (rouge-score's
``use_stemmer=False``; TOFU stems, which raises scores slightly).  The answers are kept in
the details.  Causal LMs.
"""

from __future__ import annotations

import re

from pydantic import Field

from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.metrics import Metric
from weightflow.ops.metrics._qa import QAText, preflight_qa

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


class RougeMetric(QAText):
    """ROUGE-L recall of greedy answers against the gold answers."""

    data: DataPath = Field(description="QA records (question and answer)")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per answer (greedy)")


def words(text: str) -> list[str]:
    """rouge-score's default tokenisation (no stemming)."""
    return [w for w in _NON_ALNUM.split(text.lower()) if w]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(|a|·|b|), one row)."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def rouge_l(gold: str, generated: str) -> tuple[float, float]:
    """(recall, F1) of ROUGE-L between a gold and a generated text."""
    g, h = words(gold), words(generated)
    lcs = lcs_length(g, h)
    if not g or not h or lcs == 0:
        return 0.0, 0.0
    recall, precision = lcs / len(g), lcs / len(h)
    return recall, 2 * precision * recall / (precision + recall)


def generated_rouge(subject, m: QAText, rows: list[dict], max_new_tokens: int) -> tuple[list[float], list[dict]]:
    """ROUGE-L recall of each record's greedy answer, and the answers."""
    from weightflow.ops.metrics._scoring import generate_greedy, require_causal

    require_causal(subject, "rouge")
    questions = [str(r[m.question_field]) for r in rows]
    answers = generate_greedy(subject, questions, max_new_tokens, m.batch_size, m.chat_template)
    recalls, kept = [], []
    for q, r, a in zip(questions, rows, answers, strict=True):
        rec, f1 = rouge_l(str(r[m.answer_field]), a)
        recalls.append(rec)
        kept.append({"question": q, "answer": a, "gold": str(r[m.answer_field]), "rouge_l_recall": rec,
                     "rouge_l_f1": f1})
    return recalls, kept


def rouge(subject, m: RougeMetric, ctx) -> tuple[dict, dict]:
    from weightflow.ops.metrics._qa import qa_records

    rows = qa_records(ctx.data_path(m.data), m, (m.answer_field,))
    recalls, answers = generated_rouge(subject, m, rows, m.max_new_tokens)
    n = len(recalls)
    return ({"rouge_l_recall": sum(recalls) / n, "rouge_l_f1": sum(a["rouge_l_f1"] for a in answers) / n, "n": n},
            {"answers": answers})


METRIC = Metric(
    name="rouge", params=RougeMetric, compute=rouge, doc=__doc__,
    preflight=lambda m, env: preflight_qa(m, env, (m.data,), (m.answer_field,)),
    columns=(("rouge_l_recall", None, True), ("rouge_l_f1", None, False), ("n", None, False)),
)
