"""One wide table per Report: models as rows, metrics as columns -- the table people read.

``build(doc)`` turns one collected report (``report.collect``'s dicts) into a ``Table``:
a row per scored model (its step name, op, the parameters that differ between rows and
its recorded run time), a column per charted metric value (the details -- example counts,
token counts -- stay in the per-metric tables), the direction each column is better in,
baselines (rows of ``load`` steps) and a chance row (accuracy over k labels: 1/k) marked,
and which columns are worth a chart.  Sweep members, steps named ``base@k=v,k2=v2``
(``matrix:``/``foreach:`` families), are grouped into ``Family`` objects with their
parameter values parsed, so the renderers can draw a curve or a heat map and name the best
member.  ``text`` and ``markdown`` render a Table (and a family as a small pivot table);
``html``/``svg`` draw it.  Pure data in, text out: no store, no torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from weightflow.dsl.format.text import fmt

# metric name -> the value columns whose chance level is 1/k for k labels
CHANCE_COLUMNS = {"accuracy": ("acc", "acc_norm")}
# a column of fractions (every value in [0, 1]) whose values spread less than this is not
# charted: a 1.7e-05 "sparsity_all" bar beside zeros says nothing a reader can see
NEGLIGIBLE_SPREAD = 0.005
MAX_PARAM_COLUMNS = 8
_INT = re.compile(r"^[+-]?\d+$")


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): something a chart can place."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def arrow(better: str | None) -> str:
    return {"lower": " ↓", "higher": " ↑"}.get(better or "", "")


# -- sweep members -------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A member name's value: an int or a float where it reads as one, else the text."""
    if _INT.match(text):
        return int(text)
    try:
        v = float(text)
    except ValueError:
        return text
    return v if math.isfinite(v) else text


def parse_member(name: str) -> tuple[str, dict[str, Any]] | None:
    """``merged@lambda=0.5,density=0.2`` -> ('merged', {'lambda': 0.5, 'density': 0.2});
    None for a name that is not a sweep member (no ``@``, or not ``k=v`` pairs)."""
    base, sep, rest = name.partition("@")
    if not sep or not base or not rest:
        return None
    values: dict[str, Any] = {}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or key.strip() in values:
            return None
        values[key.strip()] = parse_value(value.strip())
    return base, values


# -- the table -------------------------------------------------------------------------------

@dataclass
class Column:
    """One metric value shown as a column of the wide table."""

    metric_index: int          # index into the report's metrics
    label: str                 # the metric's label (its column group)
    metric: str                # the metric's name (accuracy, perplexity, ...)
    name: str                  # the value's name in the report (acc, token_perplexity, ...)
    better: str | None         # "lower", "higher" or None
    chance: float | None = None
    charted: bool = True
    why_not_charted: str = ""

    @property
    def title(self) -> str:
        """The header without the arrow: the value name alone when it says the label."""
        if self.name == self.label or self.name.startswith(self.label + "_"):
            return self.name
        return f"{self.label}: {self.name}"

    @property
    def header(self) -> str:
        return self.title + arrow(self.better)


@dataclass
class Row:
    """One scored model."""

    name: str
    op: str
    params: dict[str, Any]
    values: list[Any]          # one per Column
    seconds: float | None = None
    digest: str | None = None
    member: tuple[str, dict[str, Any]] | None = None  # (family, values) for a sweep member

    @property
    def swept(self) -> dict[str, Any]:
        """A sweep member's parameter values from its name ({} for other rows)."""
        return self.member[1] if self.member else {}

    @property
    def baseline(self) -> bool:
        """A model loaded as it is (not made by the pipeline): what the others are read against."""
        return self.op == "load"


@dataclass
class Family:
    """Sweep members sharing a base name: ``merged@*``."""

    name: str
    keys: list[str]            # the swept parameters, in the order the names give them
    rows: list[int]            # indices into Table.rows

    @property
    def label(self) -> str:
        return f"{self.name}@*"

    def axis(self, table: Table, key: str) -> list[Any]:
        """The distinct values of ``key`` among the members, numbers sorted, else as they come."""
        seen = list(dict.fromkeys(table.rows[i].swept.get(key) for i in self.rows if table.rows[i].member))
        if all(is_number(v) for v in seen):
            return sorted(seen)
        return seen

    def best(self, table: Table, col: int) -> int | None:
        """The row index of the best member for column ``col`` (by its direction), or None."""
        better = table.columns[col].better
        scored = [(table.rows[i].values[col], i) for i in self.rows if is_number(table.rows[i].values[col])]
        if better not in ("lower", "higher") or not scored:
            return None
        return (min(scored) if better == "lower" else max(scored))[1]


@dataclass
class Table:
    step: str
    columns: list[Column]
    rows: list[Row]
    param_names: list[str]
    families: list[Family] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def chance_row(self) -> list[float | None] | None:
        """Chance level per column, or None when no column has one."""
        if not any(c.chance is not None for c in self.columns):
            return None
        return [c.chance for c in self.columns]

    def best(self, col: int) -> int | None:
        """The row with the best value of ``col`` (by direction), among more than one model."""
        better = self.columns[col].better
        scored = [(r.values[col], i) for i, r in enumerate(self.rows) if is_number(r.values[col])]
        if better not in ("lower", "higher") or len(scored) < 2 or len({v for v, _ in scored}) < 2:
            return None
        return (min(scored) if better == "lower" else max(scored))[1]

    def baseline_values(self, col: int) -> list[tuple[str, float]]:
        return [(r.name, r.values[col]) for r in self.rows if r.baseline and is_number(r.values[col])]


def _chance(metric: dict, column: str, models: list[dict]) -> float | None:
    """1/k for an accuracy column of classifiers: k is the metric's ``labels`` (a job's
    subset of a shared head) or, without it, every model's number of labels (when they agree)."""
    if column not in CHANCE_COLUMNS.get(metric.get("metric", ""), ()):
        return None
    labels = (metric.get("params") or {}).get("labels")
    if isinstance(labels, list) and len(labels) >= 2:
        return 1 / len(labels)
    ks = {m.get("num_labels") for m in models}
    if len(ks) == 1 and isinstance(k := ks.pop(), int) and k >= 2:
        return 1 / k
    return None


def _chart_verdict(values: list[Any], declared: bool) -> str:
    """Why a column gets no chart ('' when it does)."""
    if not declared:
        return "a count, not a score"
    nums = [v for v in values if is_number(v)]
    if len(nums) < 2:
        return "fewer than two models have it"
    lo, hi = min(nums), max(nums)
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300):
        return f"{fmt(nums[0])} for every model"
    if lo >= 0 and hi <= 1 and hi - lo < NEGLIGIBLE_SPREAD:
        return f"spread {fmt(hi - lo)}: negligible"
    return ""


def _cell_key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def differing_params(rows: list[dict[str, Any]], first: list[str] | None = None) -> list[str]:
    """Parameter names that at least two rows have and whose values are not all equal
    (``first`` -- a family's swept keys -- lead, whatever their spread)."""
    names: list[str] = list(first or [])
    for params in rows:
        for k in params:
            if k not in names:
                names.append(k)
    out = []
    for k in names:
        have = [p[k] for p in rows if k in p]
        if (first and k in first) or (len(have) >= 2 and len({_cell_key(v) for v in have}) > 1):
            out.append(k)
    return out


def build(doc: dict) -> Table:
    """The wide table of one collected report (``doc["report"]`` must be set)."""
    report = doc["report"] or {}
    metrics = report.get("metrics") or []
    results = report.get("results") or []
    models = doc.get("models") or []
    columns: list[Column] = []
    for j, metric in enumerate(metrics):
        for c in metric.get("columns") or []:
            columns.append(Column(j, metric.get("label") or metric.get("metric") or f"metric {j + 1}",
                                  metric.get("metric", ""), c["name"], _direction(metric, c),
                                  _chance(metric, c["name"], models), bool(c.get("chart", True))))
    rows = []
    for i, m in enumerate(models):
        name = m.get("step") or f"model {i + 1}"
        vals = []
        for c in columns:
            cell = results[i][c.metric_index] if i < len(results) and c.metric_index < len(results[i]) else {}
            vals.append((cell.get("values") or {}).get(c.name))
        rows.append(Row(name=name, op=m.get("op") or "", params=dict(m.get("params") or {}), values=vals,
                        seconds=m.get("seconds"), digest=m.get("digest"), member=parse_member(name)))
    for k, c in enumerate(columns):
        c.why_not_charted = _chart_verdict([r.values[k] for r in rows], c.charted)
        c.charted = not c.why_not_charted
    # the details (counts) stay in the per-metric tables: the wide table shows scores
    keep = [k for k, c in enumerate(columns) if c.why_not_charted != "a count, not a score"]
    table_cols = [columns[k] for k in keep]
    for r in rows:
        r.values = [r.values[k] for k in keep]
    families = _families(rows)
    swept = list(dict.fromkeys(k for f in families for k in f.keys))
    for r in rows:  # a member's swept values are its parameters too (names win over spellings)
        if r.member:
            r.params = {**{k: v for k, v in r.params.items() if k not in r.swept}, **r.swept}
    names = differing_params([r.params for r in rows], swept)
    table = Table(doc["step"], table_cols, rows, names[:MAX_PARAM_COLUMNS], families)
    if len(names) > MAX_PARAM_COLUMNS:
        table.notes.append("other parameters that differ: " + ", ".join(names[MAX_PARAM_COLUMNS:]))
    return table


def _direction(metric: dict, column: dict) -> str | None:
    """The column's direction as the report recorded it, else as the metric declares it."""
    if column.get("better") in ("lower", "higher"):
        return column["better"]
    if "better" in column:
        return None
    try:  # an older report without the field: the declaration (torch-free to import)
        from weightflow.ops.metrics import METRICS
    except ImportError:
        return None
    decl = METRICS.get(metric.get("metric", ""))
    for name, better, _ in (decl.columns or ()) if decl else ():
        if name == column.get("name"):
            return better
    return None


def _families(rows: list[Row]) -> list[Family]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.member:
            groups.setdefault(r.member[0], []).append(i)
    out = []
    for name, idx in groups.items():
        if len(idx) < 2:
            continue
        keys = list(dict.fromkeys(k for i in idx for k in rows[i].swept))
        out.append(Family(name, keys, idx))
    return out


# -- rendering as text ------------------------------------------------------------------------

def fmt_seconds(s: float | None) -> str:
    if not is_number(s):
        return "–"
    s = float(s)  # type: ignore[arg-type]
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.0f} s"
    minutes, sec = divmod(round(s), 60)
    if minutes < 120:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_param(v: Any, width: int = 28) -> str:
    if v is None:
        return ""
    # a parameter as written (0.3, 1e-05, 1000), not as a score is rounded
    if isinstance(v, bool):
        text = str(v).lower()
    elif isinstance(v, (list, dict)):
        text = json.dumps(v)
    else:
        text = repr(v) if isinstance(v, float) else str(v)
    return text if len(text) <= width else text[:width - 1] + "…"


def grid(table: Table, plain: bool = True) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, alignments) of the wide table as strings; ``plain``: no Markdown marks."""
    header = ["step", "op"] + table.param_names + [c.header for c in table.columns] + ["time"]
    numeric = [all(is_number(r.params[p]) for r in table.rows if r.params.get(p) is not None)
               for p in table.param_names]
    align = ["l", "l"] + ["r" if n else "l" for n in numeric] + ["r"] * len(table.columns) + ["r"]
    out = []
    best = {k: table.best(k) for k in range(len(table.columns))}
    for i, r in enumerate(table.rows):
        name = r.name if plain else f"`{r.name}`"
        op = r.op + (" (baseline)" if r.baseline else "")
        cells = []
        for k, v in enumerate(r.values):
            text = fmt(v)
            if best[k] == i:
                text = f"{text} *" if plain else f"**{text}**"
            cells.append(text)
        out.append([name, op] + [fmt_param(r.params.get(p)) for p in table.param_names] + cells
                   + [fmt_seconds(r.seconds)])
    chance = table.chance_row
    if chance is not None:
        out.append(["chance" if plain else "_chance_", "guess among k labels"] + [""] * len(table.param_names)
                   + [fmt(v) if v is not None else "" for v in chance] + [""])
    return header, out, align


def legend(table: Table, plain: bool = True) -> list[str]:
    """What the marks mean and what is not charted, one sentence each."""
    lines = []
    if any(table.best(k) is not None for k in range(len(table.columns))):
        lines.append(("* marks" if plain else "Bold is") + " the best value of a column (↑ higher is better, "
                     "↓ lower is better).")
    else:
        lines.append("↑ higher is better, ↓ lower is better.")
    if any(r.baseline for r in table.rows):
        lines.append("Baseline: a model loaded as it is (a load step).")
    if table.chance_row is not None:
        lines.append("Chance: accuracy of a uniform guess among the k labels scored (1/k).")
    if any(r.seconds is not None for r in table.rows):
        lines.append("Time: the recorded run time of the step that made the model.")
    skipped = [f"{c.title} ({c.why_not_charted})" for c in table.columns if not c.charted]
    if skipped:
        lines.append("Not charted: " + "; ".join(skipped) + ".")
    return lines + table.notes


def text_grid(header: list[str], rows: list[list[str]], align: list[str], indent: str = "  ") -> list[str]:
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    out = []
    for n, r in enumerate([header, *rows]):
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=True)]
        out.append(indent + "  ".join(cells).rstrip())
        if n == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_grid(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    out = ["| " + " | ".join(md_cell(h) for h in header) + " |",
           "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return out


def family_pivots(table: Table, family: Family, plain: bool = True) -> list[tuple[str, list[str], list[list[str]]]]:
    """A family as small tables: (caption, header, rows).  One parameter: its values down,
    every scored column across; two: one grid per column with a direction (rows: the first
    parameter, columns: the second); more: members down, parameters and columns across.
    The best member is marked (* or bold)."""
    def mark(text: str, on: bool) -> str:
        return text if not on else (f"{text} *" if plain else f"**{text}**")

    cols = [k for k, c in enumerate(table.columns) if c.charted or c.better]
    out = []
    if len(family.keys) == 2:
        k1, k2 = family.keys
        xs, ys = family.axis(table, k2), family.axis(table, k1)
        by = {(table.rows[i].swept.get(k1), table.rows[i].swept.get(k2)): i
              for i in family.rows}
        for k in cols:
            best = family.best(table, k)
            header = [f"{k1} \\ {k2}"] + [fmt_param(x) for x in xs]
            rows = []
            for y in ys:
                cells = []
                for x in xs:
                    i = by.get((y, x))
                    cells.append("" if i is None else mark(fmt(table.rows[i].values[k]), i == best))
                rows.append([fmt_param(y)] + cells)
            out.append((f"{family.label}: {table.columns[k].header}", header, rows))
        return out
    best_of = {k: family.best(table, k) for k in cols}
    header = list(family.keys) + [table.columns[k].header for k in cols]
    order = sorted(family.rows, key=lambda i: [_sort_key(table.rows[i].swept.get(key))
                                               for key in family.keys])
    rows = [[fmt_param(table.rows[i].swept.get(key)) for key in family.keys]
            + [mark(fmt(table.rows[i].values[k]), best_of[k] == i) for k in cols] for i in order]
    out.append((f"{family.label} ({len(family.rows)} members)", header, rows))
    return out


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if is_number(v) else (1, 0, str(v))


def best_members(table: Table, family: Family) -> list[tuple[str, str, str]]:
    """(column title, best member, its value) for every column with a direction."""
    out = []
    for k, c in enumerate(table.columns):
        i = family.best(table, k)
        if i is not None:
            out.append((c.title, table.rows[i].name, fmt(table.rows[i].values[k])))
    return out


def text(table: Table, title: str = "") -> str:
    """The wide table and its families for the terminal."""
    lines = [title] if title else []
    header, rows, align = grid(table)
    lines += text_grid(header, rows, align)
    lines += ["  " + line for line in legend(table)]
    for family in table.families:
        for caption, h, r in family_pivots(table, family):
            lines += ["", f"  {caption}"]
            lines += text_grid(h, r, ["r"] * len(h), indent="    ")
        lines += [f"    best by {col}: {name} ({value})" for col, name, value in best_members(table, family)]
    return "\n".join(lines)


def markdown(table: Table) -> list[str]:
    header, rows, align = grid(table, plain=False)
    lines = md_grid(header, rows, align) + [""] + [" ".join(legend(table, plain=False)), ""]
    for family in table.families:
        names = " × ".join(family.keys)
        lines += [f"### Sweep `{family.label}` ({len(family.rows)} members over {names})", ""]
        for caption, h, r in family_pivots(table, family, plain=False):
            lines += [f"{caption}:", ""] + md_grid(h, r, ["r"] * len(h)) + [""]
        best = best_members(table, family)
        if best:
            lines += ["Best: " + "; ".join(f"by {col}, `{name}` ({value})" for col, name, value in best) + ".", ""]
    return lines
