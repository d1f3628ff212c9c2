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
from weightflow.dsl.lang.spec import (
    DataFile,
    Kind,
    OpParams,
    OpSpec,
    ScorableRef,
    SeedParam,
    StepRef,
    field_markers,
    iter_values,
)
from weightflow.ops.metrics import METRICS, Metric, MetricParams

REPORT_FORMAT = 1
# What a score key covers (see ``score_material``); bump when that changes, so that scores
# cached under the old meaning are not reused.
SCORE_KEY_FORMAT = 1
# The platform class whose results hold on every platform (engine/repro.py).
PORTABLE_PLATFORM = "cpu-strict"


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

    models: list[ScorableRef] = Field(min_length=1, description="the steps whose models (or composites) are "
                                      "scored (one step or a list)")
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


# -- one cached score per (model, metric recipe) ------------------------------------------

def _set_path(doc, path: tuple, value) -> None:
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


def score_material(metric: Metric, m: MetricParams, index: int, inputs, params: EvaluateParams,
                   ctx) -> dict:
    """Everything but the model that determines a model's values for one metric, as a step
    key's material is for a step (engine/keys.py; ``Scores.key`` adds the model's digest):
    the metric, its version and evaluate's; the metric's params with defaults filled, every
    step they name replaced by its output's digest and every data file by its content's
    (names and paths are not content); what its fingerprint says (lm-eval: its version and
    task files); and the evaluate-wide settings that reach ``compute`` (device, seed).  Not
    the label, nor the metric's place in the list, nor the other metrics and models:
    changing those reuses the score.  ``index`` is the metric's place, to find its refs in
    ``inputs``."""
    doc = m.model_dump(mode="json", by_alias=True)
    doc.pop("label", None)
    prefix = ("metrics", index, metric.name)
    for path, value, marker in field_markers(m):
        for sub, item in iter_values(value):
            if isinstance(marker, StepRef):
                _set_path(doc, path + sub, {"input": inputs.at(prefix + path + sub).digest})
            elif isinstance(marker, DataFile):
                _set_path(doc, path + sub, {"file": ctx.file_digest(ctx.data_path(item))})
    material = {"format": SCORE_KEY_FORMAT, "op": OP.name, "op_version": OP.version,
                "metric": metric.name, "metric_version": metric.version, "params": doc,
                "device": params.device, "seed": ctx.seed}
    external = metric.fingerprint([m], ctx) if metric.fingerprint is not None else None
    if external:
        material["external"] = external
    return material


class Scores:
    """The scores of this run already in the store, and the store for the new ones.

    A score is reused only when it was computed where its numbers hold for this run too:
    in strict mode on CPU (``cpu-strict``: the same bytes on every CPU), or on the same
    platform class as this run; otherwise it is recomputed (and replaced).  Nothing is read
    when the step is forced, and nothing at all happens without a store (a RunContext made
    outside the runner).  The store checks each entry's integrity (``Store.read_score``);
    this checks that it holds what evaluate wrote.
    """

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.store = ctx.store if ctx.store is not None and ctx.platform else None
        self._failed_write = False

    def key(self, material: dict | None, model_digest: str) -> str | None:
        """The key of the score of the model ``model_digest`` under ``score_material``."""
        if self.store is None or material is None:
            return None
        from weightflow.dsl.engine.keys import step_key

        return step_key({**material, "model": model_digest})

    def get(self, key: str | None) -> dict | None:
        if self.store is None or key is None or self.ctx.fresh:
            return None
        score = self.store.read_score(key, warn=self.ctx.warn)
        if score is None:
            return None
        if not (isinstance(score.get("values"), dict) and isinstance(score.get("details"), dict)
                and isinstance(score.get("platform"), str)):
            self.ctx.warn(f"score entry {key[:12]} does not hold a score; recomputing it")
            return None
        if score["platform"] not in (PORTABLE_PLATFORM, self.ctx.platform):
            return None  # computed on another platform class: recompute it here
        return score

    def put(self, key: str | None, model_digest: str, metric: Metric, values: dict, details: dict,
            seconds: float) -> None:
        """Store one computed score (before evaluate changes ``details``); a store that cannot
        be written costs the reuse, never the step."""
        if self.store is None or key is None or self._failed_write:
            return
        import time

        score = {"model": model_digest, "metric": metric.name, "platform": self.ctx.platform,
                 "values": values, "details": details, "step": self.ctx.step,
                 "seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.store.write_score(key, score)
        except OSError as exc:  # a read-only or full store: say it once, go on without
            self._failed_write = True
            self.ctx.warn(f"cannot cache its scores in the store ({exc}); they are recomputed next time")
        except (TypeError, ValueError) as exc:  # a value JSON cannot hold: this one is not cached
            self.ctx.warn(f"cannot cache the {metric.name} score of {model_digest[:12]} ({exc})")


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
    """Run every metric on every model -- except the (model, metric) pairs whose score is in
    the store already (``Scores``); write report.json; log the table.  The report is the
    same, byte for byte, whichever scores were reused."""
    import json
    import time

    import torch

    from weightflow.dsl.format.text import text_table
    from weightflow.ops.metrics._scoring import Subject

    if params.device == "cuda" and not torch.cuda.is_available():
        raise OpError("device: cuda, but no CUDA device is available")
    arts = inputs["models"]
    names = labels(params)
    kinds = [metric_of(item) for item in params.metrics]
    scores = Scores(ctx)
    materials = [score_material(metric, m, j, inputs, params, ctx) if scores.store else None
                 for j, (metric, m) in enumerate(kinds)]
    keys = [[scores.key(material, art.digest) for material in materials] for art in arts]
    found = [[scores.get(key) for key in row] for row in keys]
    total = len(arts) * len(kinds)
    todo = sum(score is None for row in found for score in row)
    ctx.log(f"{ctx.step}: scoring {todo} of {total} (model, metric) pairs; {total - todo} cached")
    ctx.info["scores"] = {"computed": todo, "cached": total - todo}
    results: list[list[dict]] = []
    better_seen: dict[int, dict] = {}
    with ctx.progress(todo, "evaluate", unit="metric") as bar, torch.inference_mode():
        for i, art in enumerate(arts):
            subject = Subject(art=art, device=params.device, inputs=inputs)  # loads the model on first use
            row = []
            for j, (metric, m) in enumerate(kinds):
                score = found[i][j]
                if score is not None:
                    values, details = score["values"], score["details"]
                else:
                    subject.metric_index, subject.metric_name = j, metric.name
                    if art.kind == Kind.COMPOSITE and not metric.scores_composites:
                        raise OpError(f"metric '{metric.name}' reads a model's weights, and step '{art.step}' is a "
                                      "Composite (a rule over several models): score it with metrics that need "
                                      "only forward passes or generation")
                    bar.set_postfix_str(f"{art.step}: {names[j]}")
                    started = time.perf_counter()
                    values, details = metric.compute(subject, m, ctx)
                    scores.put(keys[i][j], art.digest, metric, values, details, time.perf_counter() - started)
                    bar.update(1)
                if metric.columns is None:
                    better_seen.setdefault(j, {}).update(details.pop("better", {}))
                row.append({"values": values, **({"details": details} if details else {})})
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
