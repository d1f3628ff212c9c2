"""For classifiers, argmax of the logits against the label (an index, or a name from the
model's ``label2id``; ``labels`` restricts the prediction to some classes, e.g. one job's of
a shared head); for causal LMs, multiple choice: each of ``choices_field`` is scored as the
continuation ``target_delimiter + choice`` of the text, as lm-eval does (``acc``, and
``acc_norm`` with log-likelihoods divided by the choice's length in characters).  A
question's context runs once; its choices are scored from the context's key/value cache.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.lib.data import read_records, require_fields
from weightflow.ops.metrics import Metric, MetricParams


class AccuracyMetric(MetricParams):
    """Classification accuracy, or multiple-choice accuracy for causal LMs."""

    data: DataPath = Field(description="records (.jsonl/.json/.csv/.parquet)")
    text_field: str = Field("text", description="the input text (classifier) or question/context (LM)")
    label_field: str = Field("label", description="the gold label: an index, or a label/choice name")
    choices_field: str = Field("choices", description="causal LMs: the list of answer choices")
    labels: list[str | int] | None = Field(None, min_length=2, description="classifiers: predict among these "
                                           "labels only (names or ids), e.g. one job's labels of a shared head")
    target_delimiter: str = Field(" ", description="causal LMs: put between context and each choice")
    max_length: int | None = Field(None, ge=2, description="truncate inputs to this many tokens "
                                   "(default: the model's maximum)")
    limit: int | None = Field(None, ge=1, description="only the first N examples")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")


def preflight(m: AccuracyMetric, env) -> None:
    rows = read_records(env.data_path(m.data), limit=200)
    fields = [m.label_field] + ([] if "input_ids" in rows[0] else [m.text_field])
    require_fields(env.data_path(m.data), rows, fields)


def _encode_pair(tok, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """lm-eval's split of context + continuation into tokens (trailing spaces move right)."""
    if context == "":
        return [prefix], tok(continuation, add_special_tokens=False)["input_ids"]
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    return ctx_ids, whole[len(ctx_ids):]


def _allowed_labels(path: Path, labels, label2id: dict, n: int, examples) -> list[int]:
    """The class ids a classifier's prediction is taken among: all, or the metric's ``labels``
    (a multi-job head scored one job at a time).  Every gold label must be among them."""
    if labels is None:
        return list(range(n))
    ids = []
    for v in labels:
        if isinstance(v, str) and v not in label2id:
            raise OpError(f"accuracy: label {v!r} in 'labels' is not one of the model's labels "
                          f"({', '.join(map(repr, sorted(label2id)))})")
        i = int(label2id[v]) if isinstance(v, str) else v
        if not 0 <= i < n:
            raise OpError(f"accuracy: label {v!r} is outside the model's {n} labels")
        ids.append(i)
    for k, (_, g) in enumerate(examples, 1):
        if g not in ids:
            raise OpError(f"{path}: example {k}: its label (id {g}) is not among the metric's labels {labels}")
    return ids


def accuracy(subject, m: AccuracyMetric, ctx) -> tuple[dict, dict]:
    import torch

    from weightflow.ops.lib import models
    from weightflow.ops.metrics._scoring import (
        check_ids,
        gold,
        max_length,
        prefix_token,
        require_causal,
        score_window_groups,
    )

    path = ctx.data_path(m.data)
    rows = read_records(path, m.limit)
    model = subject.model
    if models.is_classifier(model):
        tok = subject.tokenizer
        L = m.max_length or models.max_positions(model) or 512
        vocab = model.get_input_embeddings().num_embeddings
        label2id = {str(k): v for k, v in (model.config.label2id or {}).items()}
        examples = []
        for i, row in enumerate(rows, 1):
            if "input_ids" in row:
                ids = check_ids(path, i, row["input_ids"], vocab)[:L]
            else:
                ids = subject.need_tokenizer("accuracy on text")(
                    str(row[m.text_field]), truncation=True, max_length=L)["input_ids"]
            g = gold(path, i, row[m.label_field], None, label2id)
            if not 0 <= g < model.config.num_labels:
                raise OpError(f"{path}: example {i}: label {g} is outside the model's "
                              f"{model.config.num_labels} labels")
            examples.append((ids, g))
        allowed = _allowed_labels(path, m.labels, label2id, model.config.num_labels, examples)
        pad = models.pad_id(model, tok)
        correct = 0
        for lo in range(0, len(examples), m.batch_size):
            chunk = examples[lo:lo + m.batch_size]
            width = max(len(e[0]) for e in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, (x, _) in enumerate(chunk):
                ids[r, :len(x)] = torch.tensor(x)
                attn[r, :len(x)] = 1
            logits = model(input_ids=ids.to(subject.device), attention_mask=attn.to(subject.device)).logits
            pred = [allowed[j] for j in logits[:, allowed].argmax(-1).tolist()]
            correct += sum(p == g for p, (_, g) in zip(pred, chunk, strict=True))
        return {"acc": correct / len(examples), "acc_norm": None, "n": len(examples)}, {}
    require_causal(subject, "accuracy (multiple choice)")
    tok = subject.need_tokenizer("multiple-choice accuracy")
    prefix = prefix_token(subject)
    L = max_length(subject, m.max_length)
    groups, golds, lengths = [], [], []
    for i, row in enumerate(rows, 1):
        choices = row.get(m.choices_field)
        if not isinstance(choices, list) or len(choices) < 2:
            raise OpError(f"{path}: example {i}: '{m.choices_field}' must be a list of at least two "
                          "choices (causal LMs are scored by multiple choice)")
        choices = [str(c) for c in choices]
        g = gold(path, i, row[m.label_field], choices, None)
        if not 0 <= g < len(choices):
            raise OpError(f"{path}: example {i}: label {g} is not a choice index")
        windows = []
        for c in choices:
            ctx_ids, cont = _encode_pair(tok, str(row[m.text_field]), m.target_delimiter + c, prefix)
            seq = (ctx_ids + cont)[-(L + 1):]
            windows.append((seq[:-1], seq[1:], len(cont)))
        groups.append(windows)
        golds.append(g)
        lengths.append([float(len(c)) for c in choices])
    # the choices of a question share its context: scored from one run of it (its KV cache)
    group_lls = score_window_groups(subject.model, groups, m.batch_size, models.pad_id(subject.model, tok),
                                    subject.device)
    acc = acc_norm = 0
    for ll, g, lens in zip(group_lls, golds, lengths, strict=True):
        acc += int(max(range(len(ll)), key=lambda j: ll[j]) == g)
        acc_norm += int(max(range(len(ll)), key=lambda j: ll[j] / lens[j]) == g)
    n = len(golds)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}, {}


METRIC = Metric(
    name="accuracy", params=AccuracyMetric, compute=accuracy, doc=__doc__, preflight=preflight,
    columns=(("acc", "higher", True), ("acc_norm", "higher", True), ("n", None, False)),
)
