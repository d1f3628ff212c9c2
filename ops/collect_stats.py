"""``collect-stats``: calibration statistics of a model on data, kept as a Stats artifact.

The data-aware merges need something computed from data through each fine-tuned model;
as its own cached step it is computed once, and a sweep over a merge's parameters (RegMean's
``alpha``, Fisher's ``epsilon``) reuses it.

- ``kind: gram`` (for ``merge method: regmean``): for every linear layer whose weight is
  stored, the mean Gram matrix of its inputs, G = XᵀX / n over every real token of the data
  (padding left out), stored under the weight's name, [in, in], float32 (summed in float64).
- ``kind: fisher`` (for ``merge method: fisher``): the diagonal Fisher information of every
  stored parameter, F = (1/N) Σₙ E_y[(∂ log p(y | xₙ)/∂θ)²], from per-example gradients
  (one example per backward pass), stored under the parameter's name with its shape.
  ``fisher_labels`` says where y comes from: ``expected`` (default; classifiers) takes the
  exact expectation over the model's own predicted distribution, Σ_y p(y|x)·(∂ log p(y|x))²,
  which is the Fisher information proper; ``sampled`` draws one y ~ p(y|x) from the seed (a
  causal LM: one token per position); ``empirical`` uses the data's labels (a causal LM: the
  text's own next tokens), the "empirical Fisher".

Data: one example per record of ``data`` (.jsonl/.json/.csv/.parquet with ``text_field``, a
.txt file one example a line, or pre-tokenized ``input_ids``), the first ``samples`` of them,
each truncated to ``max_length`` tokens; labels (``label_field``, names or ids) are read only
for ``fisher_labels: empirical`` on a classifier.  The artifact is ``stats.safetensors`` plus
its metadata (``weightflow.json``: the statistic, the model's digest, example and token
counts); ``weightflow export`` writes those files as they are.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import DataPath, Kind, ModelRef, OpSpec, SeedParam


class CollectStatsParams(SeedParam):
    """Which model, which statistic, on which data."""

    model: ModelRef = Field(description="step producing the model the data goes through")
    kind: Literal["gram", "fisher"] = Field(description="gram: input Gram matrix of every linear layer "
                                            "(regmean); fisher: diagonal Fisher information of every "
                                            "parameter (fisher)")
    data: DataPath = Field(description="examples (.jsonl/.json/.csv/.parquet/.txt, text or input_ids)")
    task: Literal["auto", "sequence-classification", "causal-lm"] = Field(
        "auto", description="what the model is (default: from its architecture); fisher needs one of the two")
    samples: int | None = Field(256, ge=1, description="use the first N examples (null: all)")
    max_length: int = Field(128, ge=2, description="truncate each example to this many tokens")
    batch_size: int = Field(8, ge=1, description="examples per forward pass (gram; fisher takes one "
                            "example per backward pass)")
    text_field: str = Field("text", description="field holding the text")
    label_field: str = Field("label", description="field holding the label (fisher_labels: empirical, "
                             "classifiers)")
    fisher_labels: Literal["expected", "empirical", "sampled"] = Field(
        "expected", description="fisher: expectation over the model's predictions (classifiers), labels "
        "drawn from them (sampled), or the data's own labels (empirical)")
    seed: int | None = Field(None, ge=0, description="seed for fisher_labels: sampled (default: the "
                             "pipeline's)")

    @model_validator(mode="after")
    def _fisher_only(self):
        if self.kind == "gram" and "fisher_labels" in self.model_fields_set:
            raise ValueError("'fisher_labels' applies to kind: fisher; a Gram matrix needs no labels")
        return self


def preflight(params: CollectStatsParams, env) -> None:
    """The data file reads and has the text (or input_ids) field, before anything runs."""
    from weightflow.ops.lib.data import read_records, require_fields

    path = env.data_path(params.data)
    rows = read_records(path, limit=200)
    fields = [] if "input_ids" in rows[0] else [params.text_field]
    if params.kind == "fisher" and params.fisher_labels == "empirical" and params.task == "sequence-classification":
        fields.append(params.label_field)
    require_fields(path, rows, fields)


def run(inputs, params: CollectStatsParams, ctx) -> dict:
    import time

    import torch

    from weightflow.ops.lib import models
    from weightflow.ops.lib import stats as S
    from weightflow.ops.lib.tensors import Checkpoint, TensorInfo, st_dtype_of, tensor_buffer
    from weightflow.ops.lib.training import deterministic

    art = inputs["model"]
    started = time.perf_counter()
    with deterministic(ctx.seed, "cpu"):
        model = models.load_model(art.path, "cpu")
        kind_of_model = ("sequence-classification" if models.is_classifier(model)
                         else "causal-lm" if models.is_causal_lm(model) else "other")
        if params.task != "auto" and params.task != kind_of_model:
            raise OpError(f"task: {params.task}, but step '{art.step}' holds a {type(model).__name__}")
        if params.kind == "fisher" and kind_of_model == "other":
            raise OpError(f"a Fisher diagonal needs a classifier or a causal LM (a likelihood); step "
                          f"'{art.step}' holds a {type(model).__name__}")
        tok = models.load_tokenizer(art.path)
        with_labels = params.kind == "fisher" and params.fisher_labels == "empirical" and \
            kind_of_model == "sequence-classification"
        examples = S.read_examples(ctx.data_path(params.data), model, tok, text_field=params.text_field,
                                   label_field=params.label_field, samples=params.samples,
                                   max_length=params.max_length, with_labels=with_labels)
        ckpt = Checkpoint(art.path, label=f"model '{art.step}'")
        stored = set(ckpt.names())
        ckpt.close()
        meta: dict = {"stats": params.kind, "model": art.digest, "task": kind_of_model,
                      "examples": len(examples), "tokens": sum(len(e.ids) for e in examples)}
        if params.kind == "gram":
            n_batches = -(-len(examples) // params.batch_size)
            with ctx.progress(n_batches, "gram matrices", unit="batch") as bar:
                grams = S.collect_grams(model, examples, params.batch_size, models.pad_id(model, tok), stored,
                                        tick=lambda: bar.update(1))
            tensors = grams.mean
            meta["rows"] = grams.count
            meta["transposed"] = grams.transposed
        else:
            with ctx.progress(len(examples), "fisher diagonals", unit="example") as bar:
                tensors = S.collect_fisher(model, examples, params.fisher_labels, ctx.seed, stored,
                                           tick=lambda: bar.update(1))
            meta["fisher_labels"] = params.fisher_labels
    plan = [TensorInfo(n, st_dtype_of("float32"), tuple(t.shape)) for n, t in tensors.items()]
    writer = ctx.tensor_writer(plan, prefix=S.STATS_PREFIX)
    for n, t in tensors.items():
        writer.append(n, tensor_buffer(t.to(torch.float32)))
    writer.close()
    ctx.info["collect_seconds"] = round(time.perf_counter() - started, 3)
    return meta


OP = OpSpec[CollectStatsParams](name="collect-stats", version=1, output=Kind.STATS, params=CollectStatsParams,
                                run=run, doc=__doc__, preflight=preflight)
