"""The HTML report: one self-contained page (no scripts, no external CSS, fonts or images).

For each Report step: the wide table (``table.build``), a bar chart per charted column,
each sweep family as a curve (one swept parameter) or a heat map (two) per scored column
with the best member marked, then the per-metric details and the models' keys.  The
pipeline's DAG is drawn at the top.  The page is well-formed XHTML, so tests (and tools)
can parse it as XML.
"""

from __future__ import annotations

from typing import Any

from weightflow.dsl.format.text import fmt
from weightflow.dsl.present import svg
from weightflow.dsl.present.svg import e
from weightflow.dsl.present.table import Family, Table, arrow, build, fmt_param, fmt_seconds, grid, legend

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1280px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.5em 0 .6em}th,td{border:1px solid #ddd;padding:.25em .55em}
th{background:#f5f5f5;font-weight:600}td{white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.baseline td{background:#f7f7f7;color:#555}tr.chance td{color:#b22;font-style:italic;background:#fff8f8}
table td.best{font-weight:700;background:#e3f1dc}td.p{color:#444}
.charts{display:flex;flex-wrap:wrap;gap:.8em;align-items:flex-start}
svg.chart{background:#fafafa;border:1px solid #eee}svg text{font-size:12px;fill:#222}
svg text.t{font-weight:600}svg text.small{font-size:10.5px}svg .muted,svg text.muted{fill:#777}
.muted{color:#666;font-size:.9em}.legend{color:#555;font-size:.88em;margin:.2em 0 .8em}
code{background:#f3f3f3;padding:0 .2em}details{margin:.8em 0}summary{cursor:pointer;color:#444}
.dag{max-width:100%;height:auto}.scroll{overflow-x:auto;max-width:100%}
"""


def _wide_table(table: Table) -> str:
    header, rows, align = grid(table)
    nparams = len(table.param_names)
    first_metric = 2 + nparams
    out = ["<div class=\"scroll\"><table class=\"wide\"><thead><tr>"
           + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    best = {k: table.best(k) for k in range(len(table.columns))}
    for i, cells in enumerate(rows):
        is_chance = i >= len(table.rows)
        cls = "chance" if is_chance else ("baseline" if table.rows[i].baseline else "")
        tds = []
        for k, text in enumerate(cells):
            col = k - first_metric
            classes = []
            if align[k] == "r":
                classes.append("n")
            if 2 <= k < first_metric:
                classes.append("p")
            if not is_chance and 0 <= col < len(table.columns) and best[col] == i:
                classes.append("best")
                text = text.removesuffix(" *")
            attr = f' class="{" ".join(classes)}"' if classes else ""
            tds.append(f"<td{attr}>{e(text)}</td>")
        tr_attr = f' class="{cls}"' if cls else ""
        out.append(f"<tr{tr_attr}>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _bar_charts(table: Table) -> list[str]:
    names = [r.name for r in table.rows]
    base = [r.baseline for r in table.rows]
    groups = [r.member[0] + "@*" if r.member else r.op for r in table.rows]
    return [svg.bar_chart(c.title, names, [r.values[k] for r in table.rows], c.better, base, c.chance,
                          table.best(k), groups)
            for k, c in enumerate(table.columns) if c.charted]


def _family_charts(table: Table, family: Family) -> list[str]:
    """A curve per column over one swept parameter, a heat map per column over two."""
    cols = [k for k, c in enumerate(table.columns) if c.charted or c.better]
    members = [table.rows[i] for i in family.rows]
    out = []
    if len(family.keys) == 1:
        (key,) = family.keys
        order = sorted(range(len(members)), key=lambda m: family.axis(table, key).index(members[m].swept.get(key)))
        xs = [members[m].swept.get(key) for m in order]
        for k in cols:
            best = family.best(table, k)
            out.append(svg.line_chart(table.columns[k].title, key, xs, [members[m].values[k] for m in order],
                                      table.columns[k].better,
                                      next((n for n, m in enumerate(order) if family.rows[m] == best), None),
                                      table.baseline_values(k), table.columns[k].chance))
    elif len(family.keys) == 2:
        k1, k2 = family.keys
        for k in cols:
            cells = {(r.swept.get(k1), r.swept.get(k2)): r.values[k] for r in members}
            best = family.best(table, k)
            at = None
            if best is not None:
                v = table.rows[best].swept
                at = (v.get(k1), v.get(k2))
            out.append(svg.heat_map(table.columns[k].title, k1, k2, family.axis(table, k1), family.axis(table, k2),
                                    cells, table.columns[k].better, at))
    return out


def _details(doc: dict, footer: str) -> str:
    """The per-metric tables with every value (counts too) and the models' keys, folded away."""
    report = doc["report"]
    names = [m["step"] for m in doc["models"]]
    results = report.get("results") or []
    parts = ["<details><summary>Every value, per metric; keys and digests</summary>"]
    for j, metric in enumerate(report.get("metrics") or []):
        label, kind = metric.get("label", f"metric {j + 1}"), metric.get("metric", "")
        cols = metric.get("columns") or []
        parts.append(f"<h3>{e(label)}" + (f" <span class=\"muted\">({e(kind)})</span>" if kind and kind != label
                                            else "") + "</h3>")
        params = metric.get("params") or {}
        if params:
            parts.append("<p class=\"muted\">" + ", ".join(f"{e(k)}: {e(fmt_param(v, 60))}" for k, v in params.items())
                         + "</p>")
        parts.append("<table><thead><tr><th>model</th>" + "".join(
            f"<th>{e(c['name'] + arrow(c.get('better')))}</th>" for c in cols) + "</tr></thead><tbody>")
        for i, name in enumerate(names):
            vals = results[i][j].get("values", {}) if i < len(results) and j < len(results[i]) else {}
            parts.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td class=\"n\">{e(fmt(vals.get(c['name'])))}</td>"
                                                            for c in cols) + "</tr>")
        parts.append("</tbody></table>")
    parts.append(footer)
    parts.append("</details>")
    return "".join(parts)


def report_section(doc: dict) -> str:
    """One Report step: table, charts, families, details, keys."""
    body = [f"<h2 id=\"{e(doc['step'])}\">{e(doc['step'])}</h2>"]
    if doc["report"] is None:
        body.append(f"<p class=\"muted\">not computed yet ({e(doc['reason'] or doc['status'])}); "
                    "run the pipeline first.</p>")
        return "\n".join(body)
    table = build(doc)
    body.append(_wide_table(table))
    body.append("<p class=\"legend\">" + " ".join(e(line) for line in legend(table, plain=False)).replace(
        "Bold is", "Bold (green) is") + "</p>")
    charts = _bar_charts(table)
    if charts:
        body.append("<div class=\"charts\">" + "".join(charts) + "</div>")
    for family in table.families:
        body.append(f"<h3>Sweep <code>{e(family.label)}</code>: {len(family.rows)} members over "
                    f"{e(' × '.join(family.keys))}</h3>")
        charts = _family_charts(table, family)
        if charts:
            body.append("<div class=\"charts\">" + "".join(charts) + "</div>")
        else:
            body.append("<p class=\"muted\">over more than two parameters: see the table above.</p>")
    seconds = doc.get("seconds")
    keys = ("<p class=\"muted\">Models: " + "; ".join(
        f"<code>{e(m['step'])}</code> (key {e((m['key'] or '-')[:12])}, digest "
        f"{e((m['digest'] or '-')[:12])})" for m in doc["models"]) +
        f". Report step key {e((doc['key'] or '-')[:12])}"
        + (f", scored in {e(fmt_seconds(seconds))}" if seconds is not None else "") + ".</p>")
    body.append(_details(doc, keys))
    return "\n".join(body)


def page(pipeline_name: str, reports: list[dict], dag: dict[str, Any] | None = None,
         description: str = "") -> str:
    """The whole page; ``dag``: {"nodes": [(name, op, kind)], "edges": [(a, b)], "seconds": total}."""
    body = [f"<h1>{e(pipeline_name)}: evaluation report</h1>"]
    if description:
        body.append(f"<p class=\"muted\">{e(description)}</p>")
    if dag and dag.get("nodes"):
        total = dag.get("seconds")
        body.append("<h2>Pipeline</h2>")
        body.append(svg.dag(dag["nodes"], dag["edges"], [r["step"] for r in reports]))
        body.append("<p class=\"muted\">Boxes: blue a model, orange a delta, green a report (bold: reported "
                    "below)." + (f" Recorded run time of every step: {e(fmt_seconds(total))}." if total else "")
                    + "</p>")
    body += [report_section(doc) for doc in reports]
    return ("<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\"><head>"
            "<meta charset=\"utf-8\"/><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
            f"<title>{e(pipeline_name)}: evaluation report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
