"""``evaluate``: score one or more models on a list of metrics; the result is a Report.

``models`` names one step or a list of them; ``metrics`` is a list of one-key mappings,
``{METRIC: {PARAMS}}`` (``METRIC`` alone where the params are all defaults).  The metrics
(one module each in ops/metrics/; this list and the parameters below are generated from them):
"""

from __future__ import annotations

import difflib
import textwrap
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, field_validator

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import Kind, ModelRef, OpParams, OpSpec, SeedParam
from weightflow.ops.metrics import METRICS, Metric, MetricParams

REPORT_FORMAT = 1


def _item(metric: Metric) -> type:
    """The one-key mapping ``{name: params}`` as a params model.  Its ``__name__`` is the
    metric's name, so ``weightflow ops`` shows ``list[accuracy | delta_norm | ...]``; its
    qualified name (the JSON Schema definition's name) is unique."""
    ns = {"__annotations__": {metric.field: metric.params}, "__doc__": metric.params.__doc__,
          "__qualname__": f"{metric.params.__name__}Item", "__module__": metric.params.__module__}
    if metric.field != metric.name:
        ns[metric.field] = Field(alias=metric.name)
    return type(metric.name, (OpParams,), ns)


ITEMS = {name: _item(metric) for name, metric in METRICS.items()}
_BY_FIELD = {metric.field: name for name, metric in METRICS.items()}


def _normalise(v):
    """``sparsity`` / ``{sparsity: null}`` -> ``{sparsity: {}}``; exactly one known key
    (``lm_eval`` is read as ``lm-eval``)."""
    if isinstance(v, str):
        v = {v: {}}
    if not isinstance(v, dict) or len(v) != 1:
        raise ValueError("each metric is a mapping with one key, the metric's name, e.g. "
                         "{perplexity: {data: heldout.txt}}; metrics: " + ", ".join(METRICS))
    (name, params), = v.items()
    if name not in METRICS and isinstance(name, str):
        name = _BY_FIELD.get(name, name)
    if name not in METRICS:
        close = difflib.get_close_matches(str(name), list(METRICS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown metric '{name}'{hint}; metrics: {', '.join(METRICS)}")
    return {name: {} if params is None else params}


def _tag(v) -> str:
    if isinstance(v, dict):
        return next(iter(v))
    return next(k for k, cls in ITEMS.items() if isinstance(v, cls))


MetricItem = Annotated[
    # a union built at runtime from a tuple: `X | Y` cannot spell it
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in ITEMS.items())],  # noqa: UP007
    Discriminator(_tag),
    BeforeValidator(_normalise),
]


def metric_of(item) -> tuple[Metric, MetricParams]:
    """(the metric, its params) of one ``metrics`` entry."""
    metric = METRICS[_tag(item)]
    return metric, getattr(item, metric.field)


class EvaluateParams(SeedParam):
    """Which models, which metrics."""

    models: list[ModelRef] = Field(min_length=1, description="the steps whose models are scored "
                                   "(one step or a list)")
    metrics: list[MetricItem] = Field(min_length=1, description="one-key mappings: " + ", ".join(METRICS))
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the models run")
    seed: int | None = Field(None, ge=0, description="seed for lm-eval's few-shot sampling "
                             "(default: the pipeline's)")

    @field_validator("models", mode="before")
    @classmethod
    def _one_or_list(cls, v):
        return [v] if isinstance(v, str) else v


def labels(params: EvaluateParams) -> list[str]:
    """Each metric's column-group name: its label, else its name (plus its data file's stem
    when the same metric appears more than once without a label)."""
    names = [metric_of(item) for item in params.metrics]
    count: dict[str, int] = {}
    for metric, m in names:
        if not m.label:
            count[metric.name] = count.get(metric.name, 0) + 1
    out, used = [], set()
    for i, (metric, m) in enumerate(names):
        if m.label:
            label = m.label
        elif count[metric.name] > 1:
            data = metric.stem_file(m)
            label = f"{metric.name}:{Path(data).stem}" if data else f"{metric.name}:{i + 1}"
        else:
            label = metric.name
        while label in used:
            label = f"{label}:{i + 1}"
        used.add(label)
        out.append(label)
    return out


# -- external inputs and preflight (torch-free) -------------------------------------------

def fingerprint(params: EvaluateParams, env) -> dict | None:
    """What the metrics' own fingerprints say (lm-eval: its version and task files)."""
    uses: dict[str, list] = {}
    for item in params.metrics:
        metric, m = metric_of(item)
        if metric.fingerprint is not None:
            uses.setdefault(metric.name, []).append(m)
    out = None
    for name, items in uses.items():
        fp = METRICS[name].fingerprint(items, env)
        if fp is not None:
            out = {**(out or {}), **fp}
    return out


def preflight(params: EvaluateParams, env) -> None:
    """Data files have the fields their metrics read, before any step runs."""
    for item in params.metrics:
        metric, m = metric_of(item)
        if metric.preflight is not None:
            metric.preflight(m, env)


# -- running (torch inside) ---------------------------------------------------------------

def _architecture(art) -> str | None:
    """The model class named in the checkpoint's config (every Model op writes one)."""
    import json

    try:
        archs = json.loads((art.path / "config.json").read_text()).get("architectures") or [None]
    except (OSError, ValueError):
        archs = art.meta.get("architectures") or [None]
    return archs[0]


def _finite(obj):
    """NaN and infinities (a broken model's loss) become None: JSON has neither."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _columns(metric: Metric, j: int, results: list[list[dict]], better: dict) -> list[dict]:
    if metric.columns is None:  # named by compute, in order of appearance
        cols: list[dict] = []
        for row in results:
            for c in row[j]["values"]:
                if c not in [x["name"] for x in cols]:
                    cols.append({"name": c, "better": better.get(c), "chart": True})
        return cols
    present = {c for row in results for c, v in row[j]["values"].items() if v is not None}
    return [{"name": c, "better": b, "chart": chart} for c, b, chart in metric.columns if c in present]


def run(inputs, params: EvaluateParams, ctx) -> dict:
    """Run every metric on every model; write report.json; log the table."""
    import json

    import torch

    from weightflow.dsl.format.text import text_table
    from weightflow.ops.metrics._scoring import Subject

    if params.device == "cuda" and not torch.cuda.is_available():
        raise OpError("device: cuda, but no CUDA device is available")
    arts = inputs["models"]
    names = labels(params)
    kinds = [metric_of(item) for item in params.metrics]
    results: list[list[dict]] = []
    better_seen: dict[int, dict] = {}
    with ctx.progress(len(arts) * len(kinds), "evaluate", unit="metric") as bar, torch.inference_mode():
        for art in arts:
            subject = Subject(art=art, device=params.device, inputs=inputs)
            row = []
            for j, (metric, m) in enumerate(kinds):
                subject.metric_index, subject.metric_name = j, metric.name
                bar.set_postfix_str(f"{art.step}: {names[j]}")
                values, details = metric.compute(subject, m, ctx)
                if metric.columns is None:
                    better_seen.setdefault(j, {}).update(details.pop("better", {}))
                row.append({"values": values, **({"details": details} if details else {})})
                bar.update(1)
            subject.release()
            results.append(row)
    metrics = []
    for j, (metric, m) in enumerate(kinds):
        # file paths and step names are not content (the key has their digests instead)
        params_doc = m.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=set(metric.not_in_report))
        metrics.append({"label": names[j], "metric": metric.name,
                        "columns": _columns(metric, j, results, better_seen.get(j, {})), "params": params_doc})
    report = {
        "format": REPORT_FORMAT,
        "models": [{"digest": a.digest, "architecture": _architecture(a)} for a in arts],
        "metrics": metrics,
        "results": results,
    }
    report = _finite(report)
    (ctx.out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False) + "\n")
    ctx.info["models"] = [{"step": a.step, "digest": a.digest} for a in arts]
    ctx.log(text_table(report, [a.step for a in arts], title=f"{ctx.step}:"))
    return {"models": len(arts), "metrics": names}


# -- the op's documentation, generated from the metrics -----------------------------------

def _metric_list() -> str:
    out = []
    for name, metric in METRICS.items():
        text = " ".join(textwrap.dedent(metric.doc).split())
        out.append(textwrap.fill(f"- ``{name}``: {text}", width=90, subsequent_indent="  ",
                                 break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


def _metric_reference() -> str:
    """Each metric's parameters, generated from the params models (for ``weightflow ops``)."""
    lines = ["", "Metric parameters (every metric also takes ``label``):", ""]
    for name, metric in METRICS.items():
        parts = []
        for field_name, info in metric.params.model_fields.items():
            if field_name == "label":
                continue
            key = info.alias or field_name
            if info.is_required():
                parts.append(f"``{key}`` (required)")
            else:
                default = info.get_default(call_default_factory=True)
                parts.append(f"``{key}``" + (f" = {default!r}" if default is not None and not isinstance(
                    default, list) else ""))
        lines.append(f"- ``{name}``: " + (", ".join(parts) if parts else "no parameters"))
    return "\n".join(lines)


DOC = f"""{__doc__}
{_metric_list()}

Every metric takes an optional ``label`` (its column group in the report).  The Report
(``report.json``) holds models × metrics by model digest; ``weightflow report PIPELINE``
renders every Report of a pipeline as Markdown and HTML with bar charts.
{_metric_reference()}"""

OP = OpSpec[EvaluateParams](name="evaluate", version=1, output=Kind.REPORT, params=EvaluateParams,
                            run=run, doc=DOC, fingerprint=fingerprint, preflight=preflight)
