"""Inline SVG for the HTML report: bar charts, sweep curves and heat maps, the pipeline DAG.

Hand-written SVG rather than a plotting library: the page must open offline, forever,
with no scripts or external assets, and the front end must not import numpy or
matplotlib.  Every function returns one ``<svg>`` element as a string (well-formed XML,
so the page stays XHTML-compatible); text is escaped here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from weightflow.dsl.format.text import fmt
from weightflow.dsl.present.table import arrow, fmt_param, is_number

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f"]
BASELINE = "#a0a0a0"   # bars of loaded models: the reference, not a result
CHANCE = "#d62728"
KIND_FILL = {"Model": "#e8f0fa", "Delta": "#fdf0e2", "Report": "#e9f5e6", "Stats": "#f3ecf6"}
KIND_STROKE = {"Model": "#4e79a7", "Delta": "#f28e2b", "Report": "#59a14f", "Stats": "#b07aa1"}
CHAR_W = 7.2  # a generous glyph width of 12px system-ui text, for laying out labels


def e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _open(width: float, height: float, caption: str, cls: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="{cls}" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{e(caption)}">'
            f'<title>{e(caption)}</title>')


def _text_w(text: str) -> float:
    return CHAR_W * len(text)


# -- bar chart ---------------------------------------------------------------------------------

def bar_chart(title: str, names: Sequence[str], values: Sequence[Any], better: str | None = None,
              baseline: Sequence[bool] = (), chance: float | None = None, best: int | None = None,
              groups: Sequence[str] = ()) -> str:
    """Horizontal bars, one per model, the value beside each; baseline bars grey, the others
    coloured by ``groups`` (a sweep family or an op: bars of one kind share a colour), the
    best value bold, the chance level a dashed red line.  A log scale when positive values span
    orders of magnitude (a broken model's perplexity beside a good one's); never for
    fractions, where zero and linear bars read better."""
    nums = [v for v in values if is_number(v)]
    row_h, pad, bar_w = 22, 8, 300
    label_w = max(60.0, _text_w(max(names, key=len)) + 14)
    height = pad * 2 + 22 + row_h * len(names) + (14 if chance is not None else 0)
    width = label_w + bar_w + 80
    positive = [v for v in nums if v > 0]
    log = bool(positive) and len(positive) == len(nums) and max(positive) >= 10 and \
        max(positive) / min(positive) > 50
    if log:
        lo = math.floor(math.log10(min(positive)))
        hi = math.log10(max(positive))

        def scale(v: float) -> float:
            return (math.log10(v) - lo) / (hi - lo) if hi > lo else 1.0
    else:
        top = max([abs(v) for v in nums] + [chance or 0.0, 0.0])

        def scale(v: float) -> float:
            return abs(v) / top if top else 0.0
    caption = title + arrow(better) + (" (log scale)" if log else "")
    parts = [_open(width, height, caption, "chart bar"),
             f'<text x="{pad}" y="{pad + 12}" class="t">{e(caption)}</text>']
    top_y = pad + 22
    colour_of: dict[str, int] = {}
    for i, (name, v) in enumerate(zip(names, values, strict=True)):
        y = top_y + i * row_h
        base = i < len(baseline) and baseline[i]
        muted = ' class="muted"' if base else ""
        parts.append(f'<text x="{label_w - 6:.1f}" y="{y + 15}" text-anchor="end"{muted}>{e(name)}</text>')
        ok = is_number(v)
        w = max(1.0, scale(v) * bar_w) if ok else 0.0
        if ok:
            fill = BASELINE if base else PALETTE[colour_of.setdefault(groups[i] if i < len(groups) else name,
                                                                      len(colour_of)) % len(PALETTE)]
            parts.append(f'<rect x="{label_w:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{fill}">'
                         f'<title>{e(name)}: {e(fmt(v))}{" (baseline)" if base else ""}</title></rect>')
        weight = ' font-weight="700"' if best == i else ""
        parts.append(f'<text x="{label_w + w + 5:.1f}" y="{y + 15}"{weight}>{e(fmt(v))}</text>')
    if chance is not None and not log:
        x = label_w + scale(chance) * bar_w
        bottom = top_y + row_h * len(names)
        parts.append(f'<line x1="{x:.1f}" y1="{top_y - 2}" x2="{x:.1f}" y2="{bottom + 2}" stroke="{CHANCE}" '
                     f'stroke-width="1.5" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" style="fill:{CHANCE}" '
                     f'class="small">chance {e(fmt(chance))}</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- sweep curve -----------------------------------------------------------------------------

def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def _y_range(values: list[float]) -> tuple[float, float]:
    """The y axis of a curve: every value inside, with a margin; a flat curve gets a band."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    margin = 0.08 * (hi - lo)
    return lo - margin, hi + margin


def line_chart(title: str, xlabel: str, xs: Sequence[Any], ys: Sequence[Any], better: str | None = None,
               best: int | None = None, references: Sequence[tuple[str, float]] = (),
               chance: float | None = None) -> str:
    """A metric against one swept parameter: points joined in x order, the best point
    ringed and labelled, reference models (baselines) and chance as dashed lines.
    Numeric x values are placed on a linear axis, others evenly in the order given."""
    width, height = 420, 260
    left, right, top, bottom = 58, 110, 30, 42
    pw, ph = width - left - right, height - top - bottom
    numeric_x = all(is_number(x) for x in xs)
    pts = [(x, y, i) for i, (x, y) in enumerate(zip(xs, ys, strict=True)) if is_number(y)]
    refs = [(n, v) for n, v in references if is_number(v)]
    ylo, yhi = _y_range([y for _, y, _ in pts] + [v for _, v in refs] + ([chance] if chance is not None else []))
    if numeric_x:
        xlo, xhi = min(xs), max(xs)
        if xhi == xlo:
            xlo, xhi = xlo - 1, xhi + 1

        def px(x: Any, i: int) -> float:
            return left + (x - xlo) / (xhi - xlo) * pw
    else:
        def px(x: Any, i: int) -> float:
            return left + (i + 0.5) / max(1, len(xs)) * pw

    def py(y: float) -> float:
        return top + (1 - (y - ylo) / (yhi - ylo)) * ph

    caption = title + arrow(better)
    parts = [_open(width, height, f"{caption} against {xlabel}", "chart curve"),
             f'<text x="8" y="18" class="t">{e(caption)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#ccc"/>']
    for t in _ticks(ylo, yhi):
        y = py(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end" class="small">{e(fmt(float(t)))}</text>')
    xticks = [(x, i) for i, x in enumerate(xs)]
    for x, i in xticks:
        parts.append(f'<text x="{px(x, i):.1f}" y="{top + ph + 15}" text-anchor="middle" class="small">'
                     f'{e(_tick(x))}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">{e(xlabel)}</text>')
    lines = [(name, v, BASELINE, "5 3") for name, v in refs] + \
        ([("chance", chance, CHANCE, "2 3")] if chance is not None else [])
    for n, (name, v, colour, dash) in enumerate(lines):
        y = py(v)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="{colour}" '
                     f'stroke-dasharray="{dash}"/><text x="{left + pw + 4}" y="{y + 4 + 11 * (n % 2):.1f}" '
                     f'class="small" style="fill:{colour}">{e(name)}</text>')
    line = sorted(pts, key=lambda p: (p[0] if numeric_x else p[2]))
    if len(line) > 1:
        d = " ".join(f"{'M' if k == 0 else 'L'}{px(x, i):.1f},{py(y):.1f}" for k, (x, y, i) in enumerate(line))
        parts.append(f'<path d="{d}" fill="none" stroke="{PALETTE[0]}" stroke-width="2"/>')
    for x, y, i in pts:
        parts.append(f'<circle cx="{px(x, i):.1f}" cy="{py(y):.1f}" r="3.5" fill="{PALETTE[0]}">'
                     f'<title>{e(xlabel)}={e(x)}: {e(fmt(y))}</title></circle>')
        if i == best:
            parts.append(f'<circle cx="{px(x, i):.1f}" cy="{py(y):.1f}" r="7" fill="none" stroke="{PALETTE[3]}" '
                         f'stroke-width="2" class="best"/><text x="{px(x, i):.1f}" y="{py(y) - 10:.1f}" '
                         f'text-anchor="middle" class="small" font-weight="700">best {e(fmt(y))}</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- heat map ------------------------------------------------------------------------------

def _mix(a: str, b: str, t: float) -> str:
    ca = [int(a[k:k + 2], 16) for k in (1, 3, 5)]
    cb = [int(b[k:k + 2], 16) for k in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb, strict=True))


def heat_map(title: str, ylabel: str, xlabel: str, ys: Sequence[Any], xs: Sequence[Any],
             cells: dict[tuple[Any, Any], Any], better: str | None = None,
             best: tuple[Any, Any] | None = None) -> str:
    """A metric over two swept parameters: one cell per member, darker is better (by the
    metric's direction; by value where it has none), the value printed in each cell and
    the best one outlined."""
    cw, ch = 64, 30
    label = max([_text_w(_tick(y)) for y in ys] + [_text_w(ylabel) * 0.6, 30])
    left, top = label + 26, 40
    width = left + cw * len(xs) + 20
    height = top + ch * len(ys) + 40
    nums = [v for v in cells.values() if is_number(v)]
    lo, hi = (min(nums), max(nums)) if nums else (0.0, 1.0)
    caption = title + arrow(better)
    parts = [_open(width, height, f"{caption} over {ylabel} and {xlabel}", "chart heat"),
             f'<text x="8" y="18" class="t">{e(caption)}</text>',
             f'<text x="{left + cw * len(xs) / 2:.1f}" y="{height - 6}" text-anchor="middle">{e(xlabel)}</text>',
             f'<text x="12" y="{top + ch * len(ys) / 2:.1f}" text-anchor="middle" '
             f'transform="rotate(-90 12 {top + ch * len(ys) / 2:.1f})">{e(ylabel)}</text>']
    for c, x in enumerate(xs):
        parts.append(f'<text x="{left + c * cw + cw / 2:.1f}" y="{top - 6}" text-anchor="middle" class="small">'
                     f'{e(_tick(x))}</text>')
    for r, y in enumerate(ys):
        parts.append(f'<text x="{left - 6:.1f}" y="{top + r * ch + ch / 2 + 4:.1f}" text-anchor="end" '
                     f'class="small">{e(_tick(y))}</text>')
        for c, x in enumerate(xs):
            v = cells.get((y, x))
            cx, cy = left + c * cw, top + r * ch
            if not is_number(v):
                parts.append(f'<rect x="{cx:.1f}" y="{cy}" width="{cw}" height="{ch}" fill="#f4f4f4" stroke="#fff"/>')
                continue
            t = (float(v) - lo) / (hi - lo) if hi > lo else 1.0  # type: ignore[arg-type]
            t = 1 - t if better == "lower" else t
            fill = _mix("#f1f6fb", "#08519c", 0.1 + 0.9 * t)
            ink = "#fff" if t > 0.55 else "#222"
            parts.append(f'<rect x="{cx:.1f}" y="{cy}" width="{cw}" height="{ch}" fill="{fill}" stroke="#fff">'
                         f'<title>{e(ylabel)}={e(y)}, {e(xlabel)}={e(x)}: {e(fmt(v))}</title></rect>'
                         f'<text x="{cx + cw / 2:.1f}" y="{cy + ch / 2 + 4:.1f}" text-anchor="middle" '
                         f'class="small" style="fill:{ink}">{e(fmt(v))}</text>')
            if best == (y, x):
                parts.append(f'<rect x="{cx + 1.5:.1f}" y="{cy + 1.5}" width="{cw - 3}" height="{ch - 3}" '
                             f'fill="none" stroke="{PALETTE[3]}" stroke-width="3" class="best"/>')
    parts.append("</svg>")
    return "".join(parts)


def _tick(v: Any) -> str:
    return fmt_param(v, 12)


# -- the pipeline DAG -------------------------------------------------------------------------

def dag(nodes: Sequence[tuple[str, str, str]], edges: Sequence[tuple[str, str]],
        highlight: Sequence[str] = ()) -> str:
    """The step graph laid out left to right by depth (longest path from a source), each
    step a box with its name and op, coloured by what it produces; ``highlight`` (the
    reported steps) drawn bold.  ``nodes``: (name, op, kind) in pipeline order."""
    depth: dict[str, int] = {}
    preds: dict[str, list[str]] = {n: [] for n, _, _ in nodes}
    for a, b in edges:
        if a in preds and b in preds:
            preds[b].append(a)

    def level(n: str, seen: frozenset = frozenset()) -> int:
        if n not in depth:
            depth[n] = 0 if not preds[n] or n in seen else 1 + max(level(p, seen | {n}) for p in preds[n])
        return depth[n]

    layers: dict[int, list[str]] = {}
    for n, _, _ in nodes:
        layers.setdefault(level(n), []).append(n)
    info = {n: (op, kind) for n, op, kind in nodes}
    box_h, gap_y, gap_x, pad = 38, 14, 46, 12
    col_w = {d: max(90.0, max(max(_text_w(n), _text_w(info[n][0]) * 0.9) for n in ns) + 18)
             for d, ns in layers.items()}
    xs, x = {}, float(pad)
    for d in sorted(layers):
        xs[d] = x
        x += col_w[d] + gap_x
    width = x - gap_x + pad
    tallest = max(len(ns) for ns in layers.values()) if layers else 1
    height = pad * 2 + tallest * box_h + (tallest - 1) * gap_y
    pos: dict[str, tuple[float, float, float]] = {}
    for d, ns in layers.items():
        offset = (height - (len(ns) * box_h + (len(ns) - 1) * gap_y)) / 2
        for k, n in enumerate(ns):
            pos[n] = (xs[d], offset + k * (box_h + gap_y), col_w[d])
    parts = [_open(width, height, "pipeline steps and their inputs", "dag"),
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>']
    for a, b in edges:
        if a not in pos or b not in pos:
            continue
        ax, ay, aw = pos[a]
        bx, by, _ = pos[b]
        x1, y1, x2, y2 = ax + aw, ay + box_h / 2, bx, by + box_h / 2
        mid = (x1 + x2) / 2
        parts.append(f'<path d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2 - 1:.1f},{y2:.1f}" '
                     f'fill="none" stroke="#888" stroke-width="1.2" marker-end="url(#arrow)"/>')
    for n, (bx, by, bw) in pos.items():
        op, kind = info[n]
        bold = n in highlight
        weight = ' font-weight="700"' if bold else ""
        parts.append(f'<g class="node"><rect x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" height="{box_h}" rx="5" '
                     f'fill="{KIND_FILL.get(kind, "#f4f4f4")}" stroke="{KIND_STROKE.get(kind, "#888")}" '
                     f'stroke-width="{2.2 if bold else 1.2}"><title>{e(n)}: {e(op)} -> {e(kind)}</title></rect>'
                     f'<text x="{bx + bw / 2:.1f}" y="{by + 16:.1f}" text-anchor="middle"{weight}>{e(n)}</text>'
                     f'<text x="{bx + bw / 2:.1f}" y="{by + 30:.1f}" text-anchor="middle" class="small muted">'
                     f'{e(op)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
