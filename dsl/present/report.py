"""Rendering Reports (``evaluate``'s output) for people: a terminal table, Markdown, HTML.

``weightflow report PIPELINE`` collects the cached output of every Report step of a
pipeline and renders them all: Markdown (printed, and written to a file) and one
self-contained HTML page with a bar chart per metric column, models side by side
(inline SVG, no scripts, no external assets).  A report stores models by content
digest; names come from the pipeline as it is now and keys from its lock file, so a
renamed step is shown under its new name once the pipeline was rerun.  Torch-free.

``locked_steps`` is how every view (``show``, ``report``, ``export``, ``status``) finds a
step's output: the lock file names its key and the store holds (or lacks) its entry.
Views never fingerprint inputs (no hashing of model files, no hub calls): what would
run is ``weightflow plan``'s business.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from weightflow.dsl.format.text import fmt
from weightflow.dsl.lang.diagnostics import WeightflowError
from weightflow.dsl.lang.spec import Kind

if TYPE_CHECKING:
    from weightflow.dsl.store.content import Entry
    from weightflow.dsl.store.lockfile import LockEntry

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]


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


def collect(pipeline, store, warn: Callable[[str], None] | None = None) -> list[dict]:
    """Every Report step of ``pipeline``, in order: its report (when the lock names an
    entry the store holds) and its models' current step names, locked keys and digests.
    Reads the lock file and the store only (see ``locked_steps``)."""
    from weightflow.dsl.store import lockfile

    names = [n for n, step in pipeline.steps.items() if step.op.output == Kind.REPORT]
    reports = locked_steps(pipeline, store, names, touch=True, verify=True, warn=warn)
    lock = lockfile.read(pipeline.lock_path)
    out = []
    for name in names:
        s = reports[name]
        doc = {"step": name, "op": s.op, "status": s.state, "key": s.key, "digest": s.digest,
               "reason": s.reason, "report": None, "models": []}
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
            else:  # not evaluate's layout: name the models by digest
                doc["models"] = [{"step": (r.get("digest") or "?")[:12], "key": None, "digest": r.get("digest")}
                                 for r in rep_models]
        out.append(doc)
    return out


# -- numbers ------------------------------------------------------------------------------

def _arrow(better) -> str:
    return {"lower": " ↓", "higher": " ↑"}.get(better or "", "")


def _tables(report: dict, names: list[str]):
    """(label, metric, header, rows) per metric of a report."""
    results = report.get("results") or []
    for j, metric in enumerate(report.get("metrics") or []):
        cols = metric.get("columns") or []
        header = ["model"] + [c["name"] + _arrow(c.get("better")) for c in cols]
        rows = []
        for i, name in enumerate(names):
            values = results[i][j].get("values", {}) if i < len(results) and j < len(results[i]) else {}
            rows.append([name] + [fmt(values.get(c["name"])) for c in cols])
        yield metric.get("label", metric.get("metric", f"metric {j + 1}")), metric.get("metric", ""), header, rows


def text_table(report: dict, names: list[str], title: str = "") -> str:
    """The report as plain-text tables (one per metric), for the terminal."""
    lines = [title] if title else []
    for label, kind, header, rows in _tables(report, names):
        widths = [max(len(r[k]) for r in rows + [header]) for k in range(len(header))]
        lines.append(f"  {label}" + (f" ({kind})" if kind and kind != label else ""))
        for r in [header] + rows:
            lines.append("    " + "  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                                           for k, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(pipeline_name: str, reports: list[dict]) -> str:
    out = [f"# {pipeline_name}: evaluation report", ""]
    for doc in reports:
        out.append(f"## {doc['step']}")
        out.append("")
        if doc["report"] is None:
            out += [f"_not computed yet ({doc['reason'] or doc['status']}); run the pipeline first._", ""]
            continue
        names = [m["step"] for m in doc["models"]]
        for label, kind, header, rows in _tables(doc["report"], names):
            out.append(f"### {label}" + (f" ({kind})" if kind and kind != label else ""))
            out.append("")
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
            for r in rows:
                out.append("| " + " | ".join(_md_cell(c) for c in r) + " |")
            out.append("")
        out.append("Models: " + "; ".join(
            f"`{m['step']}` (key {(m['key'] or '-')[:12]}, digest {(m['digest'] or '-')[:12]})"
            for m in doc["models"]) + f". Report step key {(doc['key'] or '-')[:12]}.")
        out.append("")
    out.append("↓ lower is better, ↑ higher is better.")
    return "\n".join(out) + "\n"


# -- HTML ---------------------------------------------------------------------------------

def _e(text) -> str:
    return html.escape(str(text), quote=True)


def bar_chart(title: str, names: list[str], values: list, better=None) -> str:
    """A horizontal bar chart (inline SVG): one bar per model, its value printed beside it."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    row_h, label_w, bar_w, pad = 22, max(60, 7 * max(len(n) for n in names) + 10), 320, 8
    height = pad * 2 + 20 + row_h * len(names)
    width = label_w + bar_w + 90
    positive = [v for v in nums if v > 0]
    # a log scale when values span orders of magnitude (a broken model's perplexity beside
    # a good one's); never for fractions, where zero and linear bars read better
    log = bool(positive) and len(positive) == len(nums) and max(positive) >= 10 and \
        max(positive) / min(positive) > 50
    if log:
        lo = math.floor(math.log10(min(positive)))
        hi = math.log10(max(positive))

        def scale(v):
            return (math.log10(v) - lo) / (hi - lo) if hi > lo else 1.0
    else:
        top = max([abs(v) for v in nums] + [0])

        def scale(v):
            return abs(v) / top if top else 0.0
    caption = title + _arrow(better) + (" (log scale)" if log else "")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(caption)}">',
             f'<text x="{pad}" y="{pad + 12}" class="t">{_e(caption)}</text>']
    for i, (name, v) in enumerate(zip(names, values, strict=True)):
        y = pad + 20 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(name)}</text>')
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        w = max(1.0, scale(v) * bar_w) if ok else 0.0
        if ok:
            parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" '
                         f'fill="{PALETTE[i % len(PALETTE)]}"><title>{_e(name)}: {_e(fmt(v))}</title></rect>')
        parts.append(f'<text x="{label_w + w + 5:.1f}" y="{y + 15}">{_e(fmt(v))}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ddd;padding:.3em .6em}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f5f5f5}
.charts{display:flex;flex-wrap:wrap;gap:1em}svg{background:#fafafa;border:1px solid #eee}
svg text{font-size:12px;fill:#222}svg text.t{font-weight:600}.muted{color:#777;font-size:.9em}
code{background:#f3f3f3;padding:0 .2em}
"""


def html_page(pipeline_name: str, reports: list[dict]) -> str:
    """The reports as one self-contained, well-formed (XHTML-compatible) HTML page."""
    body = [f"<h1>{_e(pipeline_name)}: evaluation report</h1>"]
    for doc in reports:
        body.append(f"<h2>{_e(doc['step'])}</h2>")
        if doc["report"] is None:
            body.append(f"<p class=\"muted\">not computed yet ({_e(doc['reason'] or doc['status'])}); "
                        "run the pipeline first.</p>")
            continue
        report = doc["report"]
        names = [m["step"] for m in doc["models"]]
        results = report.get("results") or []
        for j, (label, kind, header, rows) in enumerate(_tables(report, names)):
            body.append(f"<h3>{_e(label)}" + (f" <span class=\"muted\">({_e(kind)})</span>"
                                                if kind and kind != label else "") + "</h3>")
            body.append("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) +
                        "</tr></thead><tbody>")
            for r in rows:
                body.append("<tr>" + f"<td>{_e(r[0])}</td>" + "".join(f"<td class=\"n\">{_e(c)}</td>" for c in r[1:])
                            + "</tr>")
            body.append("</tbody></table>")
            charts = []
            for col in report["metrics"][j].get("columns") or []:
                if not col.get("chart"):
                    continue
                vals = [results[i][j].get("values", {}).get(col["name"]) if i < len(results) else None
                        for i in range(len(names))]
                if any(isinstance(v, (int, float)) for v in vals):
                    charts.append(bar_chart(col["name"], names, vals, col.get("better")))
            if charts:
                body.append("<div class=\"charts\">" + "".join(charts) + "</div>")
        body.append("<p class=\"muted\">Models: " + "; ".join(
            f"<code>{_e(m['step'])}</code> (key {_e((m['key'] or '-')[:12])}, digest "
            f"{_e((m['digest'] or '-')[:12])})" for m in doc["models"]) +
            f". Report step key {_e((doc['key'] or '-')[:12])}.</p>")
    body.append("<p class=\"muted\">↓ lower is better, ↑ higher is better.</p>")
    return ("<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\"><head>"
            "<meta charset=\"utf-8\"/><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
            f"<title>{_e(pipeline_name)}: evaluation report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


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
    page = html_page(name, reports)
    out_dir = Path(out_dir) if out_dir is not None else pipeline.base_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out_dir / f"{pipeline.path.stem}.report.md",
             "html": out_dir / f"{pipeline.path.stem}.report.html"}
    files["markdown"].write_text(md, encoding="utf-8")
    files["html"].write_text(page, encoding="utf-8")
    return {"markdown": md, "html": page, "files": {k: str(v) for k, v in files.items()},
            "reports": reports}
