"""Question/answer scoring shared by the TOFU-style metrics (truth_ratio, forget_quality,
rouge, model_utility, extraction): how a QA record is encoded and how an answer is scored.

A QA record holds a question and answers to it: the gold ``answer``, a ``paraphrased``
answer (the same fact in other words) and a list of ``perturbed`` answers (wrong facts in
the same template), as TOFU's records do.  An answer is always scored as the response to
its question, encoded exactly as ``finetune``/``unlearn`` encode prompt/response records
(``_scoring.encode_prompt_response``), so a metric measures the text the model was trained
or unlearned on, token for token.

The normalised answer probability is TOFU's ``P(a|q)^(1/|a|) = exp(−mean token NLL)``: a
geometric mean per token, so answers of different lengths compare.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.lib.data import read_records, require_fields
from weightflow.ops.metrics import MetricParams


class QAText(MetricParams):
    """How QA records are read and encoded."""

    question_field: str = Field("question", description="field holding the question (the prompt)")
    answer_field: str = Field("answer", description="field holding the gold answer")
    chat_template: bool = Field(False, description="the question as the user turn of the tokenizer's chat "
                                "template, as finetune/unlearn do with chat_template: true")
    max_length: int = Field(512, ge=2, description="tokens per question + answer, truncated beyond")
    limit: int | None = Field(None, ge=1, description="only the first N records")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")


def preflight_qa(m: QAText, env, files, fields: tuple[str, ...] = ()) -> None:
    """Each file of ``files`` (None skipped) has the question field and ``fields``."""
    for f in files:
        if f is not None:
            path = env.data_path(f)
            require_fields(path, read_records(path, limit=200), [m.question_field, *fields])


def qa_records(path: Path, m: QAText, fields: tuple[str, ...] = ()) -> list[dict]:
    rows = read_records(path, m.limit)
    require_fields(path, rows, [m.question_field, *fields])
    return rows


def answer_windows(subject, m: QAText, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int], int]]:
    """The (x, y, n) scoring window of each (question, answer): the answer tokens (and EOS)
    scored after the question, cut to ``max_length``."""
    from weightflow.ops.lib import models
    from weightflow.ops.metrics._scoring import encode_prompt_response

    limit = min(m.max_length, models.max_positions(subject.model) or m.max_length)
    windows = []
    for q, a in pairs:
        ids, scored = encode_prompt_response(subject, q, a, m.chat_template)
        ids, scored = ids[:limit], scored[:limit]
        n = sum(scored[1:])
        if n == 0:
            raise OpError(f"question {q[:60]!r}: no answer token fits in max_length {m.max_length}")
        windows.append((ids[:-1], ids[1:], n))
    return windows


def mean_nlls(subject, m: QAText, pairs: list[tuple[str, str]]) -> list[float]:
    """Mean token NLL of each answer given its question (−log P(a|q) / |a|)."""
    from weightflow.ops.lib import models
    from weightflow.ops.metrics._scoring import require_causal, score_windows

    require_causal(subject, subject.metric_name or "QA scoring")
    if not pairs:
        return []
    windows = answer_windows(subject, m, pairs)
    lls = score_windows(subject.model, windows, m.batch_size, models.pad_id(subject.model, subject.tokenizer),
                        subject.device)
    return [-ll / w[2] for ll, w in zip(lls, windows, strict=True)]


def answer_probs(subject, m: QAText, rows: list[dict], field: str) -> list[float]:
    """TOFU's normalised probability ``P(a|q)^(1/|a|)`` of each record's ``field`` answer."""
    return [math.exp(-x) for x in mean_nlls(subject, m, [(str(r[m.question_field]), str(r[field])) for r in rows])]


def truth_ratios(subject, m: QAText, rows: list[dict], paraphrased_field: str, perturbed_field: str,
                 path: Path) -> list[float]:
    """TOFU's truth ratio of each record: the geometric mean over its perturbed (wrong) answers
    of ``P(ã|q)^(1/|ã|)``, divided by the paraphrased answer's ``P(â|q)^(1/|â|)``.  Below 1:
    the model prefers the true fact; about 1: it cannot tell true from false."""
    pairs, owners = [], []
    for i, r in enumerate(rows):
        perturbed = r.get(perturbed_field)
        if not isinstance(perturbed, list) or not perturbed or not all(isinstance(x, str) for x in perturbed):
            raise OpError(f"{path}: record {i + 1}: '{perturbed_field}' must be a non-empty list of strings")
        q = str(r[m.question_field])
        pairs.append((q, str(r[paraphrased_field])))
        owners.append((i, "true"))
        for x in perturbed:
            pairs.append((q, x))
            owners.append((i, "false"))
    nll = mean_nlls(subject, m, pairs)
    true_nll = [0.0] * len(rows)
    false_sum, false_n = [0.0] * len(rows), [0] * len(rows)
    for (i, kind), v in zip(owners, nll, strict=True):
        if kind == "true":
            true_nll[i] = v
        else:
            false_sum[i] += v
            false_n[i] += 1
    # (Π P̃^(1/|ã|))^(1/k) / P̂^(1/|â|) = exp(mean_nll(â) − mean over ã of mean_nll(ã))
    return [math.exp(true_nll[i] - false_sum[i] / false_n[i]) for i in range(len(rows))]


def reference_subject(subject, field: str = "reference"):
    """A ``Subject`` for the model of the step named by the metric's ``field`` param (a
    retain-only model, say), on the same device and with the same inputs."""
    from weightflow.ops.metrics._scoring import Subject

    return Subject(subject.ref(field), subject.device, subject.inputs, subject.metric_index, subject.metric_name)


# What a metric computed on its reference model, by (reference digest, metric params, data
# files, device): forget_quality and privleak score every model of an evaluate step against
# the same retain-only reference, whose truth ratios / attack AUCs are the same each time.
# Computing them once per process (instead of once per scored model, loading the reference
# each time) changes no number: the computation is deterministic for given inputs.
_REFERENCE_RESULTS: dict[tuple, object] = {}
_REFERENCE_RESULTS_MAX = 32


def on_reference(subject, m: MetricParams, paths: list[Path], compute, field: str = "reference"):
    """(``compute(reference subject)``, the reference's digest), computed once per process
    for the same reference model, metric params (all but the label) and data files."""
    import json

    art = subject.ref(field)
    params = {k: v for k, v in m.model_dump(mode="json").items() if k != "label"}
    files = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    key = (art.digest, type(m).__name__, json.dumps(params, sort_keys=True, default=str), files,
           str(subject.device))
    if key not in _REFERENCE_RESULTS:
        ref = reference_subject(subject, field)
        try:
            result = compute(ref)
        finally:
            ref.release()
        if len(_REFERENCE_RESULTS) >= _REFERENCE_RESULTS_MAX:
            _REFERENCE_RESULTS.pop(next(iter(_REFERENCE_RESULTS)))
        _REFERENCE_RESULTS[key] = result
    return _REFERENCE_RESULTS[key], art.digest
