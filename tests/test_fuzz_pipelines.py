"""Property tests: whatever the text of a pipeline file, the front end answers with a
``Pipeline`` or a ``PipelineError`` whose diagnostics point inside the file -- never
another exception (which the CLI would show as a traceback)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from weightflow.dsl.lang.diagnostics import PipelineError
from weightflow.dsl.lang.pipeline import Pipeline, parse_text

VALID = """\
weightflow: 1
name: fuzz
seed: 3
dtype: float32
vars: {w: 0.5, lam: 1.0}
steps:
  base:
    op: load
    config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
             num_key_value_heads: 2, vocab_size: 256}
    init_seed: 0
  ft: {op: load, source: ./models/ft, dtype: bfloat16}
  ft2: &ftdef {op: load, source: ./models/ft2}
  ft3:
    <<: *ftdef
    source: ./models/ft3
  d: {op: extract-delta, model: ft, base: base, exclude: ["*.bias"]}
  d2: {op: extract-delta, model: ft2, base: base}
  avg:
    op: merge
    method: linear
    models: [ft, ft2, ft3]
    weights: [1, 2, 3]
    normalize: true
  merged:
    op: merge
    method: task-arithmetic
    base: base
    deltas: [d, d2]
    weights: ["${vars.w}", -0.5]
    lambda: "${vars.lam}"
outputs:
  merged: ./out/merged
  avg: ./out/avg
"""

DISPLAY = "fuzz.yaml"
PATH = Path("/nonexistent-weightflow-fuzz/fuzz.yaml")

# Characters that mean something to YAML, plus some that trip readers up.
SPECIAL = ":-[]{}&*!%\t#|>'\"@`,?~\\$ \n\r\x00\x85\u2028\ufeff\x1b"
NOISE = st.text(alphabet=st.sampled_from(list(SPECIAL) + list("abcxyz019._/<")), min_size=1, max_size=8)
TOKEN = re.compile(r"\$\{[^}]*\}|[A-Za-z0-9_./-]+|\S")


def check(text: str):
    """The property: a Pipeline, or a PipelineError pointing at real places of ``text``."""
    try:
        result = parse_text(text, PATH, display=DISPLAY)
    except PipelineError as exc:
        assert exc.diagnostics, "a PipelineError must carry at least one diagnostic"
        n_lines = len(text.splitlines()) + 1
        for d in exc.diagnostics:
            assert d.file == DISPLAY
            assert isinstance(d.line, int) and isinstance(d.col, int), d
            assert d.line >= 1 and d.col >= 1, d
            assert d.line <= n_lines + 1, (d, n_lines)
            assert d.message and "Traceback" not in d.message
            assert d.step is None or isinstance(d.step, str)
            d.format()
        return exc
    assert isinstance(result, Pipeline)
    assert result.steps, "a valid pipeline has at least one step"
    return result


def test_the_seed_text_is_valid():
    p = check(VALID)
    assert isinstance(p, Pipeline)
    assert p.steps["merged"].params.weights == [0.5, -0.5]
    assert p.steps["ft3"].params.source == "./models/ft3"


# -- text-level mutations -------------------------------------------------------

@st.composite
def mutated_text(draw):  # noqa: C901
    lines = VALID.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            lines = [""]
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(
            ["delete", "duplicate", "swap", "token", "other-token", "insert", "indent",
             "dedent", "truncate", "join"]))
        line = lines[i]
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, line)
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind in ("token", "other-token"):
            spans = [m.span() for m in TOKEN.finditer(line)]
            if not spans:
                continue
            a, b = draw(st.sampled_from(spans))
            new = draw(NOISE) if kind == "token" else draw(st.sampled_from(TOKEN.findall(VALID)))
            lines[i] = line[:a] + new + line[b:]
        elif kind == "insert":
            at = draw(st.integers(0, len(line)))
            lines[i] = line[:at] + draw(NOISE) + line[at:]
        elif kind == "indent":
            lines[i] = " " * draw(st.integers(1, 5)) + line
        elif kind == "dedent":
            k = draw(st.integers(1, 4))
            lines[i] = line[k:] if line[:k].isspace() else line.lstrip(" ")
        elif kind == "truncate":
            text = "".join(lines)
            text = text[:draw(st.integers(0, len(text)))]
            lines = text.splitlines(keepends=True)
        elif kind == "join" and i + 1 < len(lines):
            lines[i:i + 2] = [line.rstrip("\n") + " " + lines[i + 1]]
    return "".join(lines)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_text())
@example("weightflow: 1\nsteps: {1: {op: load, source: ./m}, a: {op: load, source: ./m}}\n")
@example("weightflow: 1\nname: 2001-13-45\nsteps: {a: {op: load, source: ./m}}\n")
@example("weightflow: 1\nseed: " + "9" * 5000 + "\nsteps: {a: {op: load, source: ./m}}\n")
@example("weightflow: 1\x00\nsteps: {}\n")
@example("weightflow: 1\nsteps:\n  a: {op: merge, method: [linear], models: [a]}\n")
@example('weightflow: "\u00b2"\nsteps: {a: {op: load, source: ./m}}\n')
@example("weightflow: 1\nsteps: {a: {op: load, source: ./m, config: {? [1]: 2}}}\n")
@example("weightflow: 1\nsteps: {a: {op: load, source: ./m, <<: 5}}\n")
@example('weightflow: 1\nvars: {0: 1, w: 2}\nsteps: {a: {op: load, source: "${vars.x}"}}\n')
@example("weightflow: 1\nsteps: &s\n  a: {op: load, source: ./m}\n  b: *s\n")
@example("weightflow: 1\nvars: &v {w: [*v]}\nsteps: {a: {op: load, source: ./m}}\n")
@example("weightflow: 1\nseed: 0x" + "f" * 5000 + "\nsteps: {a: {op: load, source: ./m}}\n")
@example("weightflow: 1\nsteps: {a: {op: load, source: ./m, init_seed: -0x" + "f" * 5000 + "}}\n")
@example("weightflow: 1\nvars: {x: 0b" + "1" * 20000 + "}\nsteps: {a: {op: load, source: a${vars.x}}}\n")
@example('weightflow: 1\nsteps: {a: {op: load, source: ./m}}\noutputs: {a: "~x\\0y"}\n')
@example('weightflow: 1\nname: "\\ud800"\nsteps: {a: {op: load, source: ./m}}\n')
@example("weightflow: 1\nsteps: {0: null}\noutputs: {0: null}\n")
@example("[" * 2000)
@example("a: " + "[" * 2000 + "]" * 2000)
def test_mutated_text_never_crashes(text):
    check(text)


# -- data-level mutations ---------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["base", "ft", "d", "merged", "load", "merge", "linear",
                              "task-arithmetic", "${vars.w}", "${vars.nope}", "${x}", "float16",
                              "hf:org/name", "hf:bad name", "", "-1", "1e9"]))
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), inner, max_size=4),
                       max_leaves=12)


def _paths(value, path=(), inside=frozenset()):
    yield path
    if id(value) in inside:
        return  # a recursive structure made by an earlier "share"
    inside = inside | {id(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, path + (k,), inside)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, path + (i,), inside)


def _set(data, path, new):
    if not path:
        return new
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = new
    return data


def _get(data, path):
    for part in path:
        data = data[part]
    return data


def _rename(data, path, new_key):
    """Rename the key at ``path`` (a dict entry) keeping its value and place."""
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    if not isinstance(parent, dict):
        return data
    items = [((new_key if k == path[-1] else k), v) for k, v in parent.items()]
    parent.clear()
    parent.update(items)
    return data


@st.composite
def mutated_data(draw):
    data = yaml.safe_load(VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["value", "value", "rename", "share"]))
        if kind == "share" and path:
            # the same object in two places: safe_dump writes an anchor and an alias,
            # and a recursive one when the other place is inside this one
            other = draw(st.sampled_from(paths))
            data = _set(data, path, _get(data, other))
        elif kind == "rename" and path and isinstance(path[-1], str):
            new_key = draw(st.text(max_size=10) | st.integers(-2, 2) | st.sampled_from(
                ["op", "method", "weights", "models", "deltas", "base", "stpes", "steps"]))
            data = _rename(data, path, new_key)
        else:
            data = _set(data, path, draw(JSONISH))
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_data(), st.booleans())
def test_mutated_data_never_crashes(data, flow):
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=flow)
    result = check(text)
    if isinstance(result, Pipeline):
        # what validated is self-consistent: every edge names a step of the pipeline
        for step in result.steps.values():
            for edge in step.inputs:
                assert edge.source in result.steps
            for value in step.params_json().values():
                if isinstance(value, float):
                    assert math.isfinite(value)
