"""Scored as lm-evaluation-harness's ``loglikelihood_rolling`` scores it: each document is
tokenized (no special tokens) and cut into disjoint windows of ``max_length`` (default: the
model's maximum), so every token is scored exactly once; the first window is conditioned on
the prefix token (BOS, else EOS), each later one on the tokens before it (one token, or as
many as fit in the last, partial window).  Reports the aggregates lm-eval reports: token
perplexity exp(−Σll/Σtokens), word perplexity exp(−Σll/Σwords) (words split on whitespace)
and bits per byte −Σll/(Σbytes·ln 2).  A ``.txt`` file is one document;
``.jsonl/.json/.csv/.parquet`` hold one document per record (``text_field``), or
pre-tokenized ``input_ids`` (token perplexity only).  Causal LMs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pydantic import Field

from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.lib.data import read_records, require_fields
from weightflow.ops.metrics import Metric, MetricParams

LN2 = math.log(2)


class PerplexityMetric(MetricParams):
    """Rolling-window perplexity of held-out text (lm-eval's loglikelihood_rolling)."""

    data: DataPath = Field(description=".txt (one document) or records with text_field / input_ids")
    max_length: int | None = Field(None, ge=2, description="window length in tokens (default: the "
                                   "model's maximum)")
    text_field: str = Field("text", description="field holding each document's text")
    limit: int | None = Field(None, ge=1, description="only the first N documents")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")


def preflight(m: PerplexityMetric, env) -> None:
    if Path(m.data).suffix != ".txt":
        rows = read_records(env.data_path(m.data), limit=200)
        if "input_ids" not in rows[0]:
            require_fields(env.data_path(m.data), rows, [m.text_field])


def _exp(x: float) -> float | None:
    """exp(x), or None past float range (a broken model); JSON has no infinity."""
    try:
        return math.exp(x)
    except OverflowError:
        return None


def perplexity(subject, m: PerplexityMetric, ctx) -> tuple[dict, dict]:
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib import models
    from weightflow.ops.metrics._scoring import (
        check_ids,
        max_length,
        prefix_token,
        require_causal,
        rolling_windows,
        score_windows,
    )

    require_causal(subject, "perplexity")
    path = ctx.data_path(m.data)
    vocab = subject.model.get_input_embeddings().num_embeddings
    docs: list[tuple[list[int], str | None]] = []
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        docs.append((None, text))
    else:
        for i, row in enumerate(read_records(path, m.limit), 1):
            if "input_ids" in row:
                docs.append((check_ids(path, i, row["input_ids"], vocab), None))
            else:
                docs.append((None, str(row[m.text_field])))
    tok = subject.tokenizer
    if any(ids is None for ids, _ in docs):
        tok = subject.need_tokenizer(f"perplexity on text ({path.name})")
    L = max_length(subject, m.max_length)
    prefix = prefix_token(subject)
    windows, owner = [], []
    tokens = words = nbytes = 0
    text_known = True
    for d, (ids, text) in enumerate(docs):
        if ids is None:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            words += len(re.split(r"\s+", text))
            nbytes += len(text.encode("utf-8"))
        else:
            text_known = False
        tokens += len(ids)
        for w in rolling_windows(ids, prefix, L):
            windows.append(w)
            owner.append(d)
    if not tokens:
        raise OpError(f"{path}: no tokens to score")
    ll = sum(score_windows(subject.model, windows, m.batch_size, models.pad_id(subject.model, tok),
                           subject.device))
    values = {"token_perplexity": _exp(-ll / tokens), "tokens": tokens,
              "word_perplexity": _exp(-ll / words) if text_known else None,
              "bits_per_byte": -ll / nbytes / LN2 if text_known else None,
              "words": words if text_known else None, "bytes": nbytes if text_known else None}
    return values, {"loglikelihood": ll, "documents": len(docs), "windows": len(windows), "max_length": L}


METRIC = Metric(
    name="perplexity", params=PerplexityMetric, compute=perplexity, doc=__doc__, preflight=preflight,
    columns=(("token_perplexity", "lower", True), ("word_perplexity", "lower", True),
             ("bits_per_byte", "lower", True), ("tokens", None, False), ("words", None, False),
             ("bytes", None, False)),
)
