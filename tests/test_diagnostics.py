"""Every malformed pipeline is reported at its YAML line and column, naming the step,
with a message that says what is wrong (and, where it can, what was meant)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from weightflow.dsl.lang import registry
from weightflow.dsl.lang.diagnostics import Diagnostic, PipelineError
from weightflow.dsl.lang.pipeline import Pipeline, _tags, load_pipeline, parse_text

LLAMA = ("{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
         "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 256}")

VALID = f"""\
weightflow: 1
vars: {{w: 0.5}}
steps:
  base: {{op: load, config: {LLAMA}}}
  ft: {{op: load, source: ./models/ft}}
  d: {{op: extract-delta, model: ft, base: base}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [d], weights: ["${{vars.w}}"]}}
outputs: {{merged: ./out/merged}}
"""


def parse(text: str, tmp_path: Path | None = None) -> Pipeline:
    where = (tmp_path or Path("/nonexistent")) / "p.yaml"
    return parse_text(textwrap.dedent(text), where, display="p.yaml")


def errors_of(text: str) -> list[Diagnostic]:
    with pytest.raises(PipelineError) as info:
        parse(text)
    diags = info.value.diagnostics
    assert diags, "PipelineError without diagnostics"
    return diags


def test_the_valid_example_parses():
    p = parse(VALID)
    assert list(p.steps) == ["base", "ft", "d", "merged"]
    assert p.steps["merged"].params.weights == [0.5]
    assert [e.source for e in p.steps["merged"].inputs] == ["base", "d"]


# Each case: (id, pipeline text, line, col or None, step or None, [fragments of the message]).
# The one diagnostic the file produces must sit at (line, col), name the step, and say
# every fragment.
CASES = [
    ("yaml-unclosed-flow-mapping", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m
          ft: {op: load, source: ./n}
        """, 4, 5, None, ["YAML syntax error", "flow mapping started at line 3, column 9",
                          "expected ',' or '}'"]),
    ("yaml-unclosed-bracket", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m: {op: merge, method: linear, models: [base
        outputs: {m: ./out}
        """, 5, 8, None, ["YAML syntax error", "flow sequence", "expected ',' or ']'"]),
    ("yaml-bad-indentation", """\
        weightflow: 1
        steps:
          base:
            op: load
           source: ./m
        """, 5, 4, None, ["YAML syntax error", "block mapping"]),
    ("tab-indentation", "weightflow: 1\nsteps:\n\tbase: {op: load, source: ./m}\n",
     3, 1, None, ["YAML syntax error", "'\\t'", "indent with spaces"]),
    ("duplicate-top-level-key", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
        weightflow: 1
        """, 4, 1, None, ["duplicate key 'weightflow'", "first defined on line 1"]),
    ("duplicate-key-in-step", """\
        weightflow: 1
        steps:
          base:
            op: load
            source: ./m
            source: ./n
        """, 6, 5, "base", ["duplicate key 'source'", "first defined on line 5"]),
    ("duplicate-step-name", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          base: {op: load, source: ./n}
        """, 4, 3, "base", ["duplicate key 'base'", "first defined on line 3"]),
    ("unknown-top-level-key", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
        ouputs: {base: ./out}
        """, 4, 1, None, ["unknown top-level key 'ouputs'", "did you mean 'outputs'?",
                          "expected one of: weightflow"]),
    ("missing-weightflow", """\
        name: x
        steps:
          base: {op: load, source: ./m}
        """, 1, 1, None, ["missing required top-level key 'weightflow'", "weightflow: 1"]),
    ("wrong-version", """\
        weightflow: 2
        steps:
          base: {op: load, source: ./m}
        """, 1, 13, None, ["unsupported DSL version 2", "reads weightflow: 1"]),
    ("version-as-string", """\
        weightflow: "1"
        steps:
          base: {op: load, source: ./m}
        """, 1, 13, None, ["unsupported DSL version '1'", "without quotes"]),
    ("unknown-op", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m: {op: marge, method: linear, models: [base]}
        """, 4, 11, "m", ["unknown op 'marge'", "did you mean 'merge'?",
                          "known ops: {OPS}"]),
    ("missing-op", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          ft:
            source: ./n
        """, 4, 3, "ft", ["missing 'op:'", "known ops: {OPS}"]),
    ("unknown-parameter", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m:
            op: merge
            method: linear
            models: [base]
            wieghts: [1.0]
        """, 8, 5, "m", ["unknown parameter 'wieghts' for op 'merge'", "did you mean 'weights'?",
                         "expected one of:", "normalize"]),
    ("misspelt-required-parameter", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          d: {op: extract-delta, modle: base, base: base}
        """, 4, 26, "d", ["unknown parameter 'modle'", "did you mean 'model'?"]),
    ("missing-required-parameter", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          d: {op: extract-delta, model: base}
        """, 4, 3, "d", ["missing required parameter 'base'", "op 'extract-delta'"]),
    ("missing-merge-method", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m: {op: merge, models: [base]}
        """, 4, 3, "m", ["missing required parameter 'method'", "expected one of: {METHODS}"]),
    ("wrong-type-bool", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m:
            op: merge
            method: linear
            models: [base]
            normalize: maybe
        """, 8, 16, "m", ["parameter 'normalize'", "expected true or false", "'maybe'"]),
    ("bool-where-integer-expected", """\
        weightflow: 1
        steps:
          base: {op: load, config: {model_type: llama}, init_seed: true}
        """, 3, 60, "base", ["parameter 'init_seed'", "expected an integer", "boolean"]),
    ("wrong-type-list-of-strings", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m: {op: merge, method: linear, models: [base], weights: x}
        """, 4, 59, "m", ["parameter 'weights'", "valid list", "(got 'x')"]),
    ("out-of-range-init-seed", """\
        weightflow: 1
        steps:
          base:
            op: load
            config: {model_type: llama}
            init_seed: -1
        """, 6, 16, "base", ["parameter 'init_seed'", "greater than or equal to 0", "(got -1)"]),
    ("out-of-range-num-labels", """\
        weightflow: 1
        steps:
          cls:
            op: load
            source: ./m
            task: sequence-classification
            num_labels: 0
        """, 7, 17, "cls", ["parameter 'num_labels'", "greater than or equal to 1", "(got 0)"]),
    ("weights-length-mismatch", """\
        weightflow: 1
        steps:
          a: {op: load, source: ./a}
          b: {op: load, source: ./b}
          m:
            op: merge
            method: linear
            models: [a, b]
            weights: [1.0]
        """, 9, 14, "m", ["parameter 'weights'", "expected 2 weights", "one per entry of 'models'",
                          "got 1"]),
    ("unknown-merge-method", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m: {op: merge, method: lienar, models: [base]}
        """, 4, 26, "m", ["unknown method 'lienar'", "did you mean 'linear'?",
                          "expected one of: {METHODS}"]),
    ("load-source-and-config", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m, config: {model_type: llama}}
        """, 3, 3, "base", ["invalid parameters for op 'load'", "exactly one of 'source'",
                            "'config'"]),
    ("reference-to-missing-step", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          ft: {op: load, source: ./n}
          d: {op: extract-delta, model: ft, base: bsae}
        """, 5, 43, "d", ["'base' refers to unknown step 'bsae'", "did you mean 'base'?"]),
    ("model-where-delta-expected", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m:
            op: merge
            method: task-arithmetic
            base: base
            deltas: [base]
        """, 8, 14, "m", ["type mismatch", "'deltas[0]' expects a Delta",
                          "step 'base' (op 'load') produces a Model"]),
    ("delta-where-model-expected", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          ft: {op: load, source: ./n}
          d: {op: extract-delta, model: ft, base: base}
          m: {op: merge, method: linear, models: [base, d]}
        """, 6, 49, "m", ["type mismatch", "'models[1]' expects a Model",
                          "step 'd' (op 'extract-delta') produces a Delta"]),
    ("delta-as-task-arithmetic-base", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          ft: {op: load, source: ./n}
          d: {op: extract-delta, model: ft, base: base}
          m: {op: merge, method: task-arithmetic, base: d, deltas: [d]}
        """, 6, 49, "m", ["type mismatch", "'base' expects a Model", "produces a Delta"]),
    ("cycle", """\
        weightflow: 1
        steps:
          a: {op: merge, method: linear, models: [b]}
          b: {op: merge, method: linear, models: [a]}
        """, 3, 3, "a", ["cycle: a -> b -> a"]),
    ("self-reference", """\
        weightflow: 1
        steps:
          a: {op: merge, method: linear, models: [a]}
        """, 3, 43, "a", ["'models[0]' refers to the step itself"]),
    ("unknown-variable", """\
        weightflow: 1
        vars: {weight: 0.5}
        steps:
          base: {op: load, source: ./m}
          m: {op: merge, method: linear, models: [base], weights: ["${vars.wieght}"]}
        """, 5, 60, "m", ["unknown variable '${vars.wieght}'", "did you mean 'weight'?",
                          "known vars: weight"]),
    ("interpolation-not-vars", """\
        weightflow: 1
        steps:
          base: {op: load, source: "${env.HOME}/m"}
        """, 3, 28, "base", ["cannot interpolate '${env.HOME}'", "only ${vars.NAME}"]),
    ("invalid-step-name", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          bad name!: {op: load, source: ./n}
        """, 4, 3, "bad name!", ["invalid step name 'bad name!'", "letters, digits"]),
    ("python-tag-refused", """\
        weightflow: 1
        steps:
          base: !!python/object/apply:os.system ["echo pwned"]
        """, 3, 9, None, ["could not determine a constructor", "python/object/apply:os.system",
                          "tags such as !!python/... are refused"]),
    ("empty-file", "", 1, 1, None, ["pipeline file is empty", "weightflow: 1"]),
    ("comments-only-file", "# nothing here yet\n", 1, 1, None, ["pipeline file is empty"]),
    ("document-not-a-mapping", "- load\n- merge\n", 1, 1, None,
     ["a pipeline must be a mapping of top-level keys", "got list"]),
    ("steps-not-a-mapping", """\
        weightflow: 1
        steps: [base, merged]
        """, 2, 8, None, ["'steps' must be a mapping of step name -> step", "['base', 'merged']"]),
    ("steps-empty", """\
        weightflow: 1
        steps:
        """, 2, 1, None, ["'steps' is empty"]),
    ("step-not-a-mapping", """\
        weightflow: 1
        steps:
          base: ./models/base
        """, 3, 9, "base", ["a step must be a mapping with 'op:'", "'./models/base'"]),
    ("output-names-unknown-step", """\
        weightflow: 1
        steps:
          merged: {op: load, source: ./m}
        outputs:
          mergd: ./out
        """, 5, 3, None, ["output names unknown step 'mergd'", "did you mean 'merged'?",
                          "known steps: merged"]),
    ("infinite-weight", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m: {op: merge, method: linear, models: [base], weights: [.inf]}
        """, 4, 60, "m", ["parameter 'weights[0]'", "finite number", "(got inf)"]),
    ("nan-lambda", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          ft: {op: load, source: ./n}
          d: {op: extract-delta, model: ft, base: base}
          m: {op: merge, method: task-arithmetic, base: base, deltas: [d], lambda: .nan}
        """, 6, 76, "m", ["parameter 'lambda'", "finite number"]),
    ("bad-top-level-dtype", """\
        weightflow: 1
        dtype: float64
        steps:
          base: {op: load, source: ./m}
        """, 2, 8, None, ["'dtype' must be one of float32, float16, bfloat16", "got 'float64'"]),
    ("bad-step-dtype", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m, dtype: fp16}
        """, 3, 40, "base", ["parameter 'dtype'", "must be one of float32, float16, bfloat16",
                             "got 'fp16'"]),
    ("negative-seed", """\
        weightflow: 1
        seed: -3
        steps:
          base: {op: load, source: ./m}
        """, 2, 7, None, ["'seed' must be a non-negative integer", "got -3"]),
    ("integer-too-large", """\
        weightflow: 1
        steps:
          base: {op: load, config: {model_type: llama}, init_seed: 0xffffffffffffffffffffffff}
        """, 3, 60, "base", ["parameter 'init_seed'", "integer too large", "64 bits"]),
    ("nul-in-output-dir", """\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
        outputs: {base: "./out\\0x"}
        """, 4, 17, "base", ["output directory contains a NUL character"]),
    ("impossible-date", """\
        weightflow: 1
        description: x
        name: 2024-13-45
        steps:
          base: {op: load, source: ./m}
        """, 3, 7, None, ["cannot read value '2024-13-45'", "month must be in 1..12"]),
    ("control-character", "weightflow: 1\nname: a\x07b\nsteps:\n  base: {op: load, source: ./m}\n",
     2, 8, None, ["unacceptable character #x0007"]),
]


@pytest.mark.parametrize("text,line,col,step,fragments",
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_malformed_pipeline(text, line, col, step, fragments):
    # other ops and merge methods may be registered: the lists come from the registry
    known = {"OPS": ", ".join(registry.all_ops()), "METHODS": ", ".join(_tags(registry.get("merge")))}
    assert "merge" in known["OPS"] and "linear" in known["METHODS"] and "task-arithmetic" in known["METHODS"]
    fragments = [f.replace("{OPS}", known["OPS"]).replace("{METHODS}", known["METHODS"]) for f in fragments]
    diags = errors_of(text)
    assert len(diags) == 1, "\n".join(d.format() for d in diags)
    d = diags[0]
    assert d.file == "p.yaml"
    assert (d.line, d.col) == (line, col), d.format()
    assert d.step == step, d.format()
    for fragment in fragments:
        assert fragment in d.message, f"{fragment!r} not in {d.format()!r}"
    assert "Traceback" not in d.message
    # the formatted line is what the user sees
    where = f"p.yaml:{line}:{col}:"
    assert d.format().startswith(where + (f" step '{step}':" if step else " "))


def test_enough_distinct_cases():
    texts = {textwrap.dedent(c[1]) for c in CASES}
    assert len(texts) == len(CASES) >= 24


def test_format_with_and_without_step():
    assert Diagnostic("f.yaml", 3, 5, "boom", "s").format() == "f.yaml:3:5: step 's': boom"
    assert Diagnostic("f.yaml", 1, 1, "boom").format() == "f.yaml:1:1: boom"


def test_three_independent_errors_reported_at_once():
    diags = errors_of("""\
        weightflow: 1
        stpes: {}
        steps:
          base: {op: load, source: ./m}
          m: {op: marge, method: linear, models: [base]}
          d: {op: extract-delta, model: base, base: nope}
        """)
    got = [(d.line, d.step, d.message.split(" (")[0].split(";")[0]) for d in diags]
    assert got == [
        (2, None, "unknown top-level key 'stpes'"),
        (5, "m", "unknown op 'marge'"),
        (6, "d", "'base' refers to unknown step 'nope'"),
    ], got


def test_misspelt_steps_key():
    diags = errors_of("""\
        weightflow: 1
        stpes:
          base: {op: load, source: ./m}
        """)
    assert [(d.line, d.col, d.step) for d in diags] == [(1, 1, None), (2, 1, None)]
    assert "missing required top-level key 'steps'" in diags[0].message
    assert "unknown top-level key 'stpes' (did you mean 'steps'?)" in diags[1].message


def test_wrong_type_in_each_list_item():
    diags = errors_of("""\
        weightflow: 1
        steps:
          a: {op: load, source: ./a}
          b: {op: load, source: ./b}
          m: {op: merge, method: linear, models: [a, b], weights: [a, b]}
        """)
    assert [(d.line, d.col, d.step) for d in diags] == [(5, 60, "m"), (5, 63, "m")]
    assert "parameter 'weights[0]'" in diags[0].message and "(got 'a')" in diags[0].message
    assert "parameter 'weights[1]'" in diags[1].message and "(got 'b')" in diags[1].message
    assert all("valid number" in d.message for d in diags)


def test_unknown_variable_is_not_also_reported_as_a_bad_number():
    # the raw '${vars.x}' text would fail float validation too; one error is enough
    diags = errors_of("""\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          m: {op: merge, method: linear, models: [base, base], weights: ["${vars.x}", oops]}
        """)
    messages = sorted(d.message for d in diags)
    assert len(diags) == 2, messages
    assert "unknown variable '${vars.x}'" in messages[1]
    assert "weights[1]" in messages[0] and "'oops'" in messages[0]


def test_duplicate_in_merged_anchor_is_not_a_false_positive():
    # The anchor merges and overrides 'dtype' itself; a merge of it (in 'steps') is
    # flattened before the anchor's own mapping is built (PyYAML builds breadth-first),
    # which must not make its merged and explicit 'dtype' look like a duplicate.
    p = parse("""\
        weightflow: 1
        vars:
          inner:
            x: &a {<<: {dtype: float32}, dtype: float16}
        steps:
          base: {<<: *a, op: load, source: ./m}
        """)
    assert p.steps["base"].params.dtype == "float16"
    assert p.vars["inner"]["x"] == {"dtype": "float16"}


def test_override_after_merge_key_is_located_at_the_override():
    diags = errors_of("""\
        weightflow: 1
        defaults: &d {op: load, dtype: float16}
        steps:
          base:
            <<: *d
            source: ./m
            dtype: fp16
        """)
    by_line = {d.line: d for d in diags}
    assert 2 in by_line and "unknown top-level key 'defaults'" in by_line[2].message
    assert 7 in by_line, [d.format() for d in diags]
    assert by_line[7].step == "base" and by_line[7].col == 12
    assert "got 'fp16'" in by_line[7].message


def test_anchors_aliases_and_merge_keys_work():
    p = parse(f"""\
        weightflow: 1
        vars: {{w: &w 0.25}}
        steps:
          base: &load_defaults
            op: load
            config: {LLAMA}
            dtype: bfloat16
            init_seed: 1
          other:
            <<: *load_defaults
            init_seed: 2
          both: &pair {{op: merge, method: linear, models: [base, other], weights: [*w, 0.75]}}
          again:
            <<: *pair
            normalize: false
        outputs: {{again: ./out}}
        """)
    assert p.steps["other"].params.init_seed == 2
    assert p.steps["other"].params.dtype == "bfloat16"
    assert p.steps["other"].params.config["model_type"] == "llama"
    assert p.steps["both"].params.weights == [0.25, 0.75]
    assert p.steps["again"].params.normalize is False
    assert p.steps["again"].params.models == ["base", "other"]
    assert {e.source for e in p.steps["again"].inputs} == {"base", "other"}


def test_alias_bomb_is_refused_quickly():
    lines = ["weightflow: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("steps: {base: {op: load, source: ./m}}")
    diags = errors_of("\n".join(lines) + "\n")
    assert len(diags) == 1 and "expands" in diags[0].message and "aliases" in diags[0].message


@pytest.mark.parametrize("text,line,col", [
    ("weightflow: 1\nsteps: &s\n  a: {op: load, source: ./m}\n  b: *s\n", 4, 3),
    ("weightflow: 1\nvars: &v {w: [1, *v]}\nsteps:\n  a: {op: load, source: ./m}\n", 2, 14),
])
def test_recursive_alias_is_refused(text, line, col):
    diags = errors_of(text)
    assert [(d.line, d.col) for d in diags] == [(line, col)]
    assert "refers to a node that contains it" in diags[0].message


def test_load_pipeline_missing_file(tmp_path):
    with pytest.raises(PipelineError) as info:
        load_pipeline(tmp_path / "nope.yaml")
    (d,) = info.value.diagnostics
    assert (d.line, d.col) == (1, 1) and "pipeline file not found" in d.message


def test_load_pipeline_reports_the_path_as_given(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("weightflow: 1\nsteps:\n  base: {op: lod, source: ./m}\n")
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    (d,) = info.value.diagnostics
    assert d.file == str(path) and (d.line, d.col, d.step) == (3, 14, "base")
    assert "did you mean 'load'?" in d.message


def test_cli_validate_exits_2_with_located_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(textwrap.dedent("""\
        weightflow: 1
        steps:
          base: {op: load, source: ./m}
          d: {op: extract-delta, model: base, base: missing}
          m:
            op: merge
            method: linear
            models: [base]
            wieghts: [1]
        """))
    r = subprocess.run([sys.executable, "-m", "weightflow", "validate", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{path}:")]
    assert any(ln.startswith(f"{path}:4:45: step 'd': 'base' refers to unknown step 'missing'")
               for ln in lines), r.stderr
    assert any(ln.startswith(f"{path}:9:5: step 'm': unknown parameter 'wieghts'")
               for ln in lines), r.stderr


def test_cli_validate_yaml_error_and_python_tag(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("weightflow: 1\nsteps:\n  base: !!python/object/apply:os.system ['touch pwned']\n")
    r = subprocess.run([sys.executable, "-m", "weightflow", "validate", str(path)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{path}:3:9: YAML syntax error" in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_cli_validate_ok(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(VALID)
    r = subprocess.run([sys.executable, "-m", "weightflow", "validate", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ok (4 steps)" in r.stdout


# -- union-typed parameters (one value, several accepted shapes) ----------------

@pytest.fixture
def union_op():
    from pydantic import BaseModel, ConfigDict

    from weightflow.dsl.lang.spec import FiniteFloat, Kind, OpParams, OpSpec

    class Rule(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pattern: str
        value: FiniteFloat

    class Params(OpParams):
        model: str
        scale: FiniteFloat | list[Rule] = 1.0
        factors: list[FiniteFloat | list[Rule]] = []
        flag: bool = False

    registry.register(OpSpec(name="test-union", version=1, output=Kind.MODEL, params=Params,
                             run=lambda *a: {}, doc="union-typed params, for diagnostics tests"))
    yield
    registry.unregister("test-union")


@pytest.mark.parametrize("params,line_col,fragments", [
    # a scalar that fits no member: only the scalar member's complaint, once
    ("scale: abc", (3, 40), ["parameter 'scale'", "valid number", "(got 'abc')"]),
    (r"factors: [1, .inf]", (3, 46), ["parameter 'factors[1]'", "finite number", "(got inf)"]),
    # a list: only the list member's complaint, at the rule's own field
    ("scale: [{pattern: '*', value: x}]", (3, 63),
     ["parameter 'scale[0].value'", "valid number", "(got 'x')"]),
    # a mapping fits neither member: one combined message
    ("scale: {pattern: '*', value: 1}", (3, 40), ["parameter 'scale'", "valid number or a valid list"]),
    ("scale: [{patern: '*', value: 1}]", (3, 42), ["unknown parameter 'scale[0].patern'", "did you mean 'pattern'?"]),
    ("factors: [true]", (3, 43), ["parameter 'factors[0]'", "expected a number, got a boolean (true)"]),
    ("flag: 1", (3, 39), ["parameter 'flag'", "expected true or false, got 1"]),
])
def test_union_parameter_errors_are_reported_once(union_op, params, line_col, fragments):
    text = f"weightflow: 1\nsteps:\n  u: {{op: test-union, model: m, {params}}}\n"
    with pytest.raises(PipelineError) as info:
        parse_text(text, Path("/nonexistent/p.yaml"), display="p.yaml")
    diags = [d for d in info.value.diagnostics if "refers to" not in d.message]
    assert len(diags) == 1, [d.format() for d in diags]
    (d,) = diags
    assert (d.line, d.col) == line_col and d.step == "u", d.format()
    for fragment in fragments:
        assert fragment in d.message, d.format()


def test_union_parameter_valid_shapes(union_op):
    text = ("weightflow: 1\nsteps:\n  m: {op: load, source: ./m}\n"
            "  u: {op: test-union, model: m, scale: [{pattern: '*', value: 2}], factors: [1, 0.5]}\n")
    p = parse_text(text, Path("/nonexistent/p.yaml"))
    assert p.steps["u"].params.scale[0].value == 2.0
    assert p.steps["u"].params.factors == [1.0, 0.5]
