"""``weightflow show`` for people: a step's output summarised in a screenful.

The manifest's ``info`` (what an op recorded about its run) used to be printed as one JSON
line cut at 500 characters, mid-object.  Here each part people look for gets a readable
form: a training curve as a sparkline plus a small table of sampled steps, validation and
before/after losses as tables, a report's metrics as the report's wide table, a model's
sparsity per layer (from ``tensor_stats``), and anything else as short ``key: value`` lines
that say where the rest is (``--json`` stays the complete, unchanged document).
Torch-free; pure functions of what ``show`` already read.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from weightflow.dsl.format.text import fmt
from weightflow.dsl.present.table import is_number, text_grid

SPARK = "▁▂▃▄▅▆▇█"
CURVE_ROWS = 8
# a transformer block's index in a tensor name (as the sparsity metric reads it)
BLOCK = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")
# info keys printed by show itself elsewhere, or in their own section here
HANDLED = {"training_curve", "summary", "validation", "losses", "models", "initialised", "dropped"}


def sparkline(values: list[Any], width: int = 40) -> str:
    """Values as one line of block characters (lowest ▁, highest █), resampled to ``width``;
    a missing value is a space."""
    if len(values) > width:  # the mean of each bucket: the shape, not one noisy point
        buckets = [values[math.floor(i * len(values) / width):math.floor((i + 1) * len(values) / width)]
                   for i in range(width)]
        values = [sum(n) / len(n) if (n := [v for v in b if is_number(v)]) else None for b in buckets]
    nums = [v for v in values if is_number(v)]
    if not nums:
        return ""
    lo, hi = min(nums), max(nums)
    span = hi - lo
    return "".join(" " if not is_number(v) else SPARK[round((v - lo) / span * (len(SPARK) - 1)) if span else 3]
                   for v in values)


def _sample(n: int, k: int = CURVE_ROWS) -> list[int]:
    """``k`` indices spread over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _records_table(rows: list[dict], first: str = "step") -> list[str]:
    """Records (dicts of numbers) as a small right-aligned table."""
    keys = [first] if any(first in r for r in rows) else []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and (is_number(v) or v is None)]
    cells = [[("" if r.get(k) is None else str(r[k]) if k == first else fmt(r[k])) for k in keys] for r in rows]
    return text_grid(keys, cells, ["r"] * len(keys), indent="    ")


def curve_lines(curve: list[dict]) -> list[str]:
    """The training curve: a sparkline per logged loss, then sampled steps as a table."""
    if not curve:
        return []
    out = [f"training curve ({len(curve)} logged step{'s' if len(curve) != 1 else ''}, "
           f"steps {curve[0].get('step', 1)}–{curve[-1].get('step', len(curve))})"]
    losses = [k for k in dict.fromkeys(k for r in curve for k in r) if "loss" in k or k == "nll"]
    for k in losses:
        vals = [r.get(k) for r in curve]
        nums = [v for v in vals if v is not None and is_number(v)]
        if nums:
            out.append(f"  {k:<14} {sparkline(vals)}  {fmt(nums[0])} → {fmt(nums[-1])} "
                       f"(min {fmt(min(nums))})")
    out += _records_table([curve[i] for i in _sample(len(curve))])
    return out


def _scalar(v: Any, width: int = 80) -> str:
    text = fmt(v) if is_number(v) else (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
    more = "… (whole value: --json)"
    return text if len(text) <= width else text[:width - len(more)] + more


def info_lines(info: dict) -> list[str]:
    """An op's recorded ``info``, readable: summary, losses, validation, curve, the rest."""
    out: list[str] = []
    summary = info.get("summary")
    if isinstance(summary, dict):
        out.append("summary")
        for k, v in summary.items():
            if isinstance(v, dict) and all(is_number(x) or x is None for x in v.values()):
                v = ", ".join(f"{a} {fmt(b)}" for a, b in v.items())
            out.append(f"  {k:<16} {_scalar(v)}")
    losses = info.get("losses")
    if isinstance(losses, dict) and all(isinstance(v, dict) for v in losses.values()):
        out.append("losses")
        out += _records_table([{"data": k, **v} for k, v in losses.items()], first="data")
    validation = info.get("validation")
    if isinstance(validation, list) and validation and all(isinstance(r, dict) for r in validation):
        out.append("validation")
        out += _records_table(validation)
    curve = info.get("training_curve")
    if isinstance(curve, list) and all(isinstance(r, dict) for r in curve):
        out += curve_lines(curve)
    rest = {k: v for k, v in info.items() if k not in HANDLED}
    if rest:
        out.append("info")
        out += [f"  {k:<16} {_scalar(v)}" for k, v in rest.items()]
    return out


def layer_sparsity(per_tensor: list[dict]) -> list[dict]:
    """Sparsity of the 2-D weights per transformer block (what pruning targets, as the
    ``sparsity`` metric counts them), then of the 2-D weights outside the blocks
    ("other": embeddings, heads), from ``show``'s per-tensor statistics:
    {layer, tensors, parameters, zeros, sparsity} in block order."""
    groups: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for r in per_tensor:
        if "density" not in r or len(r["shape"]) != 2 or not r["name"].endswith(".weight"):
            continue
        m = BLOCK.search(r["name"])
        layer = m.group(1) if m else "other"
        numel = math.prod(r["shape"])
        acc = groups.setdefault(layer, [0.0, 0.0])
        acc[0] += numel
        acc[1] += (1 - r["density"]) * numel
        counts[layer] = counts.get(layer, 0) + 1
    order = sorted((k for k in groups if k != "other"), key=int) + (["other"] if "other" in groups else [])
    return [{"layer": k, "tensors": counts[k], "parameters": int(groups[k][0]), "zeros": round(groups[k][1]),
             "sparsity": groups[k][1] / groups[k][0] if groups[k][0] else 0.0} for k in order]


def sparsity_lines(per_tensor: list[dict]) -> list[str]:
    """A model's sparsity per layer, with a bar each; nothing when no block has zeros (a
    dense model: the overall line said it)."""
    layers = layer_sparsity(per_tensor)
    if not any(r["zeros"] for r in layers if r["layer"] != "other"):
        return []
    rows = [[r["layer"], str(r["tensors"]), f"{r['parameters']:,}", f"{100 * r['sparsity']:.2f}%",
             "█" * round(20 * r["sparsity"])] for r in layers]
    return ["sparsity per layer (2-D weights; 'other': outside the blocks)"] + \
        text_grid(["LAYER", "MATRICES", "PARAMETERS", "ZEROS", "0" + " " * 18 + "1"], rows,
                  ["r", "r", "r", "r", "l"], indent="  ")
