"""Numbers and report tables as plain text: one formatting for evaluate's log (ops) and the
Markdown/HTML report (``weightflow.dsl.present.report``), torch-free so both may import it."""

from __future__ import annotations

import math


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e6 or a < 1e-3:
            return f"{v:.3e}"
        if a >= 100:
            return f"{v:,.1f}"
        return f"{v:.4f}" if a < 10 else f"{v:.3f}"
    return str(v)


def text_table(report: dict, names: list[str], title: str = "") -> str:
    """One table per metric: a row per model, a column per value (↓/↑: lower/higher is better)."""
    lines = [title] if title else []
    for j, metric in enumerate(report["metrics"]):
        cols = metric["columns"]
        header = ["model"] + [c["name"] + {"lower": " ↓", "higher": " ↑"}.get(c["better"] or "", "") for c in cols]
        rows = [[name] + [fmt(report["results"][i][j]["values"].get(c["name"])) for c in cols]
                for i, name in enumerate(names)]
        widths = [max(len(r[k]) for r in rows + [header]) for k in range(len(header))]
        label, kind = metric["label"], metric["metric"]
        lines.append(f"  {label}" + (f" ({kind})" if kind != label else ""))
        for r in [header] + rows:
            lines.append("    " + "  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                                           for k, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    return "\n".join(lines)
