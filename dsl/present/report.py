"""Rendering Reports (``evaluate``'s output) for people: a terminal table, Markdown, HTML.

``weightflow report PIPELINE`` collects the cached output of every Report step of a
pipeline and renders each as one wide table -- models as rows (step, op, the parameters
that differ between them, the recorded run time), metric values as columns (↑/↓ for the
better direction), baselines and chance level marked -- in the terminal, in Markdown
(written to a file) and in one self-contained HTML page with the pipeline's DAG, a bar
chart per column worth charting and a curve or heat map per sweep family (``table``,
``html``, ``svg`` beside this module).  A report stores models by content digest; names
come from the pipeline as it is now and keys from its lock file, so a renamed step is
shown under its new name once the pipeline was rerun.  Torch-free.

``locked_steps`` is how every view (``show``, ``report``, ``export``, ``status``) finds a
step's output: the lock file names its key and the store holds (or lacks) its entry.
Views never fingerprint inputs (no hashing of model files, no hub calls): what would
run is ``weightflow plan``'s business.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from weightflow.dsl.format.text import fmt
from weightflow.dsl.lang.diagnostics import WeightflowError
from weightflow.dsl.lang.spec import Kind, field_markers
from weightflow.dsl.present import table
from weightflow.dsl.present.table import arrow

if TYPE_CHECKING:
    from weightflow.dsl.store.content import Entry
    from weightflow.dsl.store.lockfile import LockEntry

# -- collecting ---------------------------------------------------------------------------

# The states of a step as the views see it.
CACHED = "cached"          # locked, and the lock's entry is in the store
MISSING = "missing"        # locked, but the store has no entry for the lock's key
CORRUPTED = "corrupted"    # locked, but the entry's content no longer has its digest
NOT_LOCKED = "not locked"  # not in the lock file: the pipeline has not run it yet

REASONS = {CACHED: "", MISSING: "locked but missing from the store",
           CORRUPTED: "its stored output is corrupted and was discarded",
           NOT_LOCKED: "not in the lock file"}


@dataclass(frozen=True)
class LockedStep:
    """A step of the pipeline as its lock file and the store know it."""

    name: str
    op: str                    # the op the pipeline names now
    locked: LockEntry | None   # None when the lock file lacks the step
    entry: Entry | None        # the store's entry for the lock's key, or None
    corrupted: bool = False

    @property
    def state(self) -> str:
        if self.locked is None:
            return NOT_LOCKED
        if self.entry is not None:
            return CACHED
        return CORRUPTED if self.corrupted else MISSING

    @property
    def reason(self) -> str:
        return REASONS[self.state]

    @property
    def key(self) -> str | None:
        return self.locked.key if self.locked else None

    @property
    def digest(self) -> str | None:
        return self.locked.digest if self.locked else None

    @property
    def op_changed(self) -> bool:
        """The lock's entry was made by another op than the pipeline names now."""
        return self.locked is not None and self.locked.op != self.op


def locked_steps(pipeline, store, names=None, touch: bool = False, verify: bool = False,
                 warn: Callable[[str], None] | None = None) -> dict[str, LockedStep]:
    """The pipeline's steps (or only ``names``), in pipeline order, each with its lock
    entry and, when the store has it, the store entry of the lock's key.

    Reads the lock file and the store only: no input is fingerprinted, no network is
    used and no key is recomputed, so the answer describes the last run (the lock may be
    stale relative to the YAML; ``weightflow plan`` says what would run).  ``touch``
    counts the looked-up entries as used (for ``gc``); ``verify`` checks each entry's
    content against its digest (re-hashing as ``verify:``/``WEIGHTFLOW_VERIFY`` say) and
    discards a corrupted one, as ``run`` would.
    """
    from weightflow.dsl.store import lockfile

    lock = lockfile.read(pipeline.lock_path)
    wanted = set(pipeline.steps if names is None else names)
    deep = True if getattr(pipeline, "verify", None) == "always" else None
    out = {}
    for name, step in pipeline.steps.items():
        if name not in wanted:
            continue
        locked = lock.get(name)
        entry = store.lookup(locked.key, warn=warn, touch=touch) if locked else None
        corrupted = False
        if entry is not None and verify and not store.verify(entry, deep=deep):
            if warn:
                warn(f"the stored output of step '{name}' (key {entry.key[:12]}, object "
                     f"{entry.digest[:12]}) is corrupted: its content no longer matches its "
                     "digest; discarding it (rerun the pipeline to recompute it)")
            store.discard(entry)
            entry, corrupted = None, True
        out[name] = LockedStep(name, step.op.name, locked, entry, corrupted)
    return out


def lock_only_steps(pipeline) -> list[str]:
    """Steps the lock file names that the pipeline no longer has (renamed or removed)."""
    from weightflow.dsl.store import lockfile

    return [n for n in lockfile.read(pipeline.lock_path) if n not in pipeline.steps]


def step_params(step) -> dict:
    """A step's parameters as the report's table compares them: scalars and short lists of
    scalars, without references to other steps or data files (their content is in the key,
    not in a name a reader compares)."""
    refs = {path[0] for path, _, _ in field_markers(step.params) if path}
    out = {}
    for k, v in step.params_json().items():
        if k in refs or v is None:
            continue
        if isinstance(v, (str, int, float, bool)) or (
                isinstance(v, list) and len(v) <= 6 and all(isinstance(x, (str, int, float, bool)) for x in v)):
            out[k] = v
    return out


def _num_labels(entry: Entry | None) -> int | None:
    """The labels of a classifier's head (its config's id2label), for the chance level."""
    if entry is None:
        return None
    try:
        config = json.loads((entry.path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs):
        return None
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) else config.get("num_labels")


def _model_info(pipeline, store, name: str, locked: LockEntry | None, warn) -> dict:
    """A scored model's row: its op, parameters, recorded run time and number of labels."""
    step = pipeline.steps.get(name)
    entry = store.lookup(locked.key, warn=warn, touch=False) if locked else None
    seconds = entry.manifest.get("seconds") if entry else None
    return {"op": step.op.name if step else None, "params": step_params(step) if step else {},
            "seconds": seconds if isinstance(seconds, (int, float)) else None, "num_labels": _num_labels(entry)}


def collect(pipeline, store, warn: Callable[[str], None] | None = None,
            only: list[str] | None = None) -> list[dict]:
    """Every Report step of ``pipeline`` (or those in ``only``), in order: its report (when
    the lock names an entry the store holds) and its models' current step names, ops,
    parameters, locked keys, digests and recorded run times.  Reads the lock file and the
    store only (see ``locked_steps``)."""
    from weightflow.dsl.store import lockfile

    names = [n for n, step in pipeline.steps.items()
             if step.output == Kind.REPORT and (only is None or n in only)]
    reports = locked_steps(pipeline, store, names, touch=True, verify=True, warn=warn)
    lock = lockfile.read(pipeline.lock_path)
    out = []
    for name in names:
        s = reports[name]
        doc = {"step": name, "op": s.op, "status": s.state, "key": s.key, "digest": s.digest,
               "reason": s.reason, "report": None, "models": [],
               "seconds": s.entry.manifest.get("seconds") if s.entry else None}
        sources = [e.source for e in pipeline.steps[name].inputs if e.field and e.field[0] == "models"]
        doc["models"] = [{"step": m, "key": lock[m].key if m in lock else None,
                          "digest": lock[m].digest if m in lock else None} for m in sources]
        if s.entry is not None:
            try:
                doc["report"] = json.loads((s.entry.path / "report.json").read_text())
            except (OSError, ValueError) as exc:
                raise WeightflowError(f"step '{name}': cannot read its report: {exc}") from None
            rep_models = doc["report"].get("models") or []
            if len(rep_models) == len(doc["models"]):
                for m, r in zip(doc["models"], rep_models, strict=True):
                    if m["digest"] and r.get("digest") and m["digest"] != r["digest"]:
                        m["note"] = "digest differs from the report's"
                    m.update(_model_info(pipeline, store, m["step"], lock.get(m["step"]), warn))
            else:  # not evaluate's layout: name the models by digest
                doc["models"] = [{"step": (r.get("digest") or "?")[:12], "key": None, "digest": r.get("digest")}
                                 for r in rep_models]
        out.append(doc)
    return out


# -- numbers ------------------------------------------------------------------------------

def _tables(report: dict, names: list[str]):
    """(label, metric, header, rows) per metric of a report: every value, counts too."""
    results = report.get("results") or []
    for j, metric in enumerate(report.get("metrics") or []):
        cols = metric.get("columns") or []
        header = ["model"] + [c["name"] + arrow(c.get("better")) for c in cols]
        rows = []
        for i, name in enumerate(names):
            values = results[i][j].get("values", {}) if i < len(results) and j < len(results[i]) else {}
            rows.append([name] + [fmt(values.get(c["name"])) for c in cols])
        yield metric.get("label", metric.get("metric", f"metric {j + 1}")), metric.get("metric", ""), header, rows


def text_report(pipeline_name: str, reports: list[dict]) -> str:
    """Every report as its wide table, for the terminal."""
    out = [f"{pipeline_name}: evaluation report"]
    for doc in reports:
        out.append("")
        if doc["report"] is None:
            out.append(f"{doc['step']}: not computed yet ({doc['reason'] or doc['status']}); run the pipeline first.")
            continue
        out.append(table.text(table.build(doc), title=f"{doc['step']}:"))
    return "\n".join(out) + "\n"


def markdown(pipeline_name: str, reports: list[dict]) -> str:
    """Every report as its wide table (families as pivot tables), then every value per metric."""
    out = [f"# {pipeline_name}: evaluation report", ""]
    for doc in reports:
        out.append(f"## {doc['step']}")
        out.append("")
        if doc["report"] is None:
            out += [f"_not computed yet ({doc['reason'] or doc['status']}); run the pipeline first._", ""]
            continue
        out += table.markdown(table.build(doc))
        out += ["### Every value, per metric", ""]
        names = [m["step"] for m in doc["models"]]
        for label, kind, header, rows in _tables(doc["report"], names):
            out.append(f"#### {label}" + (f" ({kind})" if kind and kind != label else ""))
            out.append("")
            out += table.md_grid(header, rows, ["l"] + ["r"] * (len(header) - 1))
            out.append("")
        seconds = doc.get("seconds")
        out.append("Models: " + "; ".join(
            f"`{m['step']}` (key {(m['key'] or '-')[:12]}, digest {(m['digest'] or '-')[:12]})"
            for m in doc["models"]) + f". Report step key {(doc['key'] or '-')[:12]}"
            + (f", scored in {table.fmt_seconds(seconds)}" if seconds is not None else "") + ".")
        out.append("")
    return "\n".join(out) + "\n"


def html_page(pipeline_name: str, reports: list[dict], dag: dict | None = None, description: str = "") -> str:
    """The reports as one self-contained, well-formed (XHTML-compatible) HTML page."""
    from weightflow.dsl.present import html

    return html.page(pipeline_name, reports, dag, description)


def dag_of(pipeline, store=None) -> dict:
    """The pipeline's steps and edges for the page's drawing, with the recorded run time
    of every step the store holds (their sum: what the whole pipeline cost to compute)."""
    from weightflow.dsl.lang import graph

    order = graph.topo_order(pipeline)
    nodes = [(n, pipeline.steps[n].op.name, pipeline.steps[n].output.value) for n in order]
    edges = list(dict.fromkeys((e.source, n) for n in order for e in pipeline.steps[n].inputs))
    total = None
    if store is not None:
        times = [s.entry.manifest.get("seconds") for s in locked_steps(pipeline, store).values() if s.entry]
        nums = [t for t in times if isinstance(t, (int, float))]
        total = sum(nums) if nums else None
    return {"nodes": nodes, "edges": edges, "seconds": total}


def render(pipeline, store, out_dir: Path | None = None,
           warn: Callable[[str], None] | None = None) -> dict:
    """Collect, render and write ``<stem>.report.md`` / ``.report.html``; returns what was done."""
    reports = collect(pipeline, store, warn)
    if not reports:
        raise WeightflowError(f"{pipeline.path.name} has no evaluate step (no step produces a Report)")
    if all(r["report"] is None for r in reports):
        raise WeightflowError(f"no report of {pipeline.path.name} is computed yet; run "
                              f"`weightflow run {pipeline.path.name}` first")
    name = pipeline.name or pipeline.path.stem
    md = markdown(name, reports)
    page = html_page(name, reports, dag_of(pipeline, store), pipeline.description or "")
    out_dir = Path(out_dir) if out_dir is not None else pipeline.base_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out_dir / f"{pipeline.path.stem}.report.md",
             "html": out_dir / f"{pipeline.path.stem}.report.html"}
    files["markdown"].write_text(md, encoding="utf-8")
    files["html"].write_text(page, encoding="utf-8")
    return {"markdown": md, "html": page, "text": text_report(name, reports),
            "files": {k: str(v) for k, v in files.items()}, "reports": reports}
