"""Mean token loss (causal LMs; cross-entropy for classifiers); with ``forget:`` /
``retain:`` instead of ``data``, the forget and retain loss that unlearning is judged by.
``prompt_field`` + ``response_field`` score the response only (``chat_template``: the prompt
as the user turn of the tokenizer's chat template), as finetune/unlearn train on them.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.lib.data import read_records, require_fields
from weightflow.ops.metrics import Metric, MetricParams


class ScoredText(MetricParams):
    """How records are encoded and scored: shared by every metric built on per-example loss
    (``_scoring.example_losses``), so they encode data as ``loss`` does."""

    text_field: str = Field("text", description="field holding the text")
    prompt_field: str | None = Field(None, description="prompt field (no loss on it); needs response_field")
    response_field: str | None = Field(None, description="response field (the loss is on it only)")
    chat_template: bool = Field(False, description="format prompt/response with the tokenizer's chat "
                                "template (prompt as the user turn), as finetune/unlearn do")
    label_field: str = Field("label", description="classifiers: the gold label")
    max_length: int = Field(512, ge=2, description="tokens per example, truncated beyond")
    limit: int | None = Field(None, ge=1, description="only the first N examples of each file")
    batch_size: int = Field(8, ge=1, description="examples per forward pass")

    def check_fields(self) -> None:
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("'prompt_field' and 'response_field' go together")
        if self.chat_template and self.prompt_field is None:
            raise ValueError("'chat_template' needs 'prompt_field' and 'response_field'")


def preflight_files(m: ScoredText, env, files) -> None:
    """Each of ``files`` (params' values; None skipped) has the fields ``m`` reads."""
    for f in files:
        if f is None:
            continue
        rows = read_records(env.data_path(f), limit=200)
        if "input_ids" in rows[0]:
            continue
        fields = [m.prompt_field, m.response_field] if m.prompt_field else [m.text_field]
        require_fields(env.data_path(f), rows, fields)


class LossMetric(ScoredText):
    """Mean token loss; with forget/retain data, the unlearning measures."""

    data: DataPath | None = Field(None, description="records to score")
    forget: DataPath | None = Field(None, description="forget set (reports forget_loss)")
    retain: DataPath | None = Field(None, description="retain set (reports retain_loss)")

    @model_validator(mode="after")
    def _which(self):
        if self.data is None and self.forget is None and self.retain is None:
            raise ValueError("loss needs 'data', or 'forget' and/or 'retain'")
        if self.data is not None and (self.forget is not None or self.retain is not None):
            raise ValueError("give 'data', or 'forget'/'retain', not both")
        self.check_fields()
        return self


def _mean_loss(subject, m: LossMetric, path) -> tuple[float, int]:
    import torch.nn.functional as F

    from weightflow.ops.lib import models
    from weightflow.ops.metrics._scoring import causal_lls, classifier_batches

    if models.is_classifier(subject.model):
        total, n = 0.0, 0
        for logits, labels in classifier_batches(subject, m, path):
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            n += len(labels)
        return total / n, n
    lls, counts = causal_lls(subject, m, path, "loss")
    return -sum(lls) / sum(counts), sum(counts)


def loss(subject, m: LossMetric, ctx) -> tuple[dict, dict]:
    values: dict = {"loss": None, "forget_loss": None, "retain_loss": None}
    tokens = 0
    for key, f in (("loss", m.data), ("forget_loss", m.forget), ("retain_loss", m.retain)):
        if f is not None:
            values[key], n = _mean_loss(subject, m, ctx.data_path(f))
            tokens += n
    values["tokens"] = tokens
    return values, {}


METRIC = Metric(
    name="loss", params=LossMetric, compute=loss, doc=__doc__,
    preflight=lambda m, env: preflight_files(m, env, (m.data, m.forget, m.retain)),
    columns=(("loss", "lower", True), ("forget_loss", "higher", True), ("retain_loss", "lower", True),
             ("tokens", None, False)),
    # the stem that tells unlabelled loss metrics apart: retain alone gives 'loss:N'
    label_file=lambda m: m.data or m.forget,
)
