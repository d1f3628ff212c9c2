"""Step families (sweeps): ``matrix:`` / ``foreach:`` make one ordinary step per member, named
``STEP@KEY=VALUE,...``; ``STEP@*`` in a list names them all; errors point at the matrix entry;
plan/status/dag fold a family into one row; the library's ties-sweep runs on tiny models."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import read_model
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from weightflow.dsl.lang.diagnostics import PipelineError
from weightflow.dsl.lang.pipeline import (
    FamilyMember,
    format_member_value,
    member_name,
    parse_member_name,
    parse_text,
)

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ("{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
         "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 256}")
HEAD = f"""\
weightflow: 1
steps:
  base: {{op: load, config: {LLAMA}}}
  a: {{op: load, config: {LLAMA}, init_seed: 1}}
  b: {{op: load, config: {LLAMA}, init_seed: 2}}
  da: {{op: extract-delta, model: a, base: base}}
  db: {{op: extract-delta, model: b, base: base}}
"""
SWEEP = HEAD + """\
  merged:
    op: merge
    method: ties
    base: base
    deltas: [da, db]
    matrix:
      lambda: [0.5, 1.0, 2]
      density: [0.2, 0.5]
  scores:
    op: evaluate
    models: [base, merged@*, a]
    metrics: [sparsity]
"""


def parse(text: str, tmp_path: Path | None = None):
    where = (tmp_path or Path("/nonexistent")) / "p.yaml"
    return parse_text(textwrap.dedent(text), where, display="p.yaml")


def errors_of(text: str):
    with pytest.raises(PipelineError) as info:
        parse(text)
    return info.value.diagnostics


# -- naming and expansion -----------------------------------------------------------

def test_member_value_formatting_is_canonical():
    assert [format_member_value(v) for v in (3, 0.5, 1.0, 1e-05, 0.1 + 0.2, True, None, "ties")] == \
        ["3", "0.5", "1.0", "1e-05", "0.30000000000000004", "true", "null", "ties"]
    name = member_name("merged", {"lambda": 0.5, "density": 2, "method": "ties"})
    assert name == "merged@lambda=0.5,density=2,method=ties"
    assert parse_member_name(name) == ("merged", [("lambda", "0.5"), ("density", "2"), ("method", "ties")])
    assert parse_member_name("merged") is None


def test_matrix_makes_one_step_per_combination_in_written_order():
    p = parse(SWEEP)
    names = [f"merged@lambda={lam},density={d}" for lam in ("0.5", "1.0", "2") for d in ("0.2", "0.5")]
    assert list(p.steps) == ["base", "a", "b", "da", "db", *names, "scores"]
    assert p.families == {"merged": [FamilyMember(n, {"lambda": lam, "density": d}) for n, (lam, d) in
                                     zip(names, [(lam, d) for lam in (0.5, 1.0, 2) for d in (0.2, 0.5)],
                                         strict=True)]}
    m = p.steps["merged@lambda=2,density=0.5"]
    assert (m.params.lambda_, m.params.density, m.params.deltas) == (2.0, 0.5, ["da", "db"])
    assert (m.family, m.matrix) == ("merged", {"lambda": 2, "density": 0.5})
    assert m.line == 8  # the family's line: errors and logs point at it
    assert p.steps["base"].family is None
    # merged@* expands in member order where it is written
    assert p.steps["scores"].params.models == ["base", *names, "a"]
    assert [e.source for e in p.steps["scores"].inputs] == ["base", *names, "a"]
    # each expanded item points at the 'merged@*' it came from; the item after it still at its own
    at = p.positions.value(("steps", "scores", "models", 3))
    last = p.positions.value(("steps", "scores", "models", 7))
    assert (at.line, last.line) == (18, 18) and at.col < last.col


def test_foreach_members_and_matrix_interpolation():
    p = parse(HEAD + """\
  merged:
    op: merge
    method: task-arithmetic
    base: "${matrix.to}"
    deltas: [da, db]
    weights: ["${matrix.w}", 1]
    foreach:
      - {lambda: 0.5, w: 1.0, to: base}
      - {lambda: 1, to: a, w: 2}
""")
    with_a = "merged@lambda=1,to=a,w=2"
    assert [m.name for m in p.families["merged"]] == ["merged@lambda=0.5,w=1.0,to=base", with_a]
    assert p.families["merged"][1].values == {"lambda": 1, "to": "a", "w": 2}
    # a whole-value ${matrix.X} keeps the value's type; the member's own keys stay its params
    assert p.steps[with_a].params.weights == [2, 1] and p.steps[with_a].params.base == "a"
    assert [e.source for e in p.steps[with_a].inputs][0] == "a"


def test_matrix_with_vars_and_interpolated_strings(tmp_path):
    """A matrix list can come from a var (so --var changes the grid); a key the step uses as
    ${matrix.KEY} is a variable of the members (here: which merge each one builds on)."""
    text = HEAD.replace("weightflow: 1\n", "weightflow: 1\nvars: {lambdas: [1.0, 3]}\n") + """\
  merged:
    op: merge
    method: ties
    base: base
    deltas: [da, db]
    matrix: {lambda: "${vars.lambdas}", density: [0.5]}
  ref:
    op: merge
    method: task-arithmetic
    base: "merged@lambda=${matrix.l},density=0.5"
    deltas: [da]
    matrix: {l: [3, 1.0]}
"""
    p = parse_text(text, tmp_path / "p.yaml", display="p.yaml")
    assert [m.name for m in p.families["merged"]] == ["merged@lambda=1.0,density=0.5", "merged@lambda=3,density=0.5"]
    assert [m.name for m in p.families["ref"]] == ["ref@l=3", "ref@l=1.0"]
    assert p.steps["ref@l=1.0"].params.base == "merged@lambda=1.0,density=0.5"
    assert [e.source for e in p.steps["ref@l=3"].inputs][0] == "merged@lambda=3,density=0.5"
    assert p.steps["ref@l=3"].params.lambda_ == 1.0  # 'l' set no parameter
    with pytest.raises(PipelineError) as info:  # a key neither a parameter nor used: an unknown parameter
        parse_text(text.replace("deltas: [da]\n", "deltas: [da]\n    matrix: {l: [1.0], m: [2]}\n")
                   .replace("    matrix: {l: [3, 1.0]}\n", ""), tmp_path / "p.yaml", display="p.yaml")
    assert "unknown parameter 'm' for op 'merge'" in str(info.value)


def test_a_parameter_the_step_also_refers_to_is_still_set():
    p = parse(HEAD + """\
  merged:
    op: merge
    method: task-arithmetic
    base: base
    deltas: [da, db]
    weights: ["${matrix.lambda}", 1]
    matrix: {lambda: [0.5, 2]}
""")
    m = p.steps["merged@lambda=2"]
    assert (m.params.lambda_, m.params.weights) == (2.0, [2.0, 1.0])


def test_a_member_has_the_key_of_the_same_step_written_out(tmp_path, store_dir):
    """Names never enter keys: a member is keyed exactly like an ordinary step with its values,
    so the members share every upstream step (and an equal hand-written step) in the cache."""
    from weightflow.dsl.engine.planner import plan
    from weightflow.dsl.store.content import Store

    text = SWEEP + "  by_hand: {op: merge, method: ties, base: base, deltas: [da, db], lambda: 1.0, density: 0.5}\n"
    p = parse(text, tmp_path)
    statuses = {s.name: s for s in plan(p, Store(store_dir))}
    # nothing is cached, so only keys of steps without inputs are known; compare the materials
    from weightflow.dsl.engine.keys import key_material

    digests = {n: "0" * 64 for n in p.steps}
    member = key_material(p.steps["merged@lambda=1.0,density=0.5"], digests, lambda f: "", None)
    assert member == key_material(p.steps["by_hand"], digests, lambda f: "", None)
    other = key_material(p.steps["merged@lambda=2,density=0.5"], digests, lambda f: "", None)
    assert other != member
    assert statuses["merged@lambda=1.0,density=0.5"].status == "pending"


# -- diagnostics at the matrix entry ----------------------------------------------------

MERGE = HEAD + """\
  merged:
    op: merge
    method: ties
    base: base
    deltas: [da, db]
"""
ERRORS = [
    ("unknown-parameter", MERGE + "    density: 0.2\n    matrix:\n      lamda: [0.5, 1.0]\n",
     15, 7, "merged@*", ["unknown parameter 'lamda'", "did you mean 'lambda'", "in every member"]),
    ("empty-list", MERGE + "    density: 0.2\n    matrix:\n      lambda: []\n",
     15, 15, "merged", ["matrix 'lambda' is an empty list"]),
    ("not-a-list", MERGE + "    density: 0.2\n    matrix:\n      lambda: 0.5\n",
     15, 15, "merged", ["must be a list of values", "[0.5]"]),
    ("empty-matrix", MERGE + "    density: 0.2\n    matrix: {}\n",
     14, 13, "merged", ["non-empty mapping"]),
    ("both", MERGE + "    density: 0.2\n    matrix: {lambda: [1]}\n    foreach: [{lambda: 1}]\n",
     15, 5, "merged", ["either 'matrix:'", "or 'foreach:'"]),
    ("wrong-type-in-some-members", MERGE + "    matrix:\n      lambda: [0.3, fast]\n      density: [0.2, 0.5]\n",
     14, 21, "merged@lambda=fast,density=0.2", ["parameter 'lambda'", "valid number", "in 2 of 4 members"]),
    ("out-of-range", MERGE + "    lambda: 1\n    matrix:\n      density: [0.2, 1.5]\n",
     15, 22, "merged@density=1.5", ["parameter 'density'", "1.5"]),
    ("non-scalar-value", MERGE + "    density: 0.2\n    matrix:\n      weights: [[1, 2]]\n",
     15, 17, "merged", ["must be a number, a string"]),
    ("string-with-separator", MERGE + "    density: 0.2\n    matrix:\n      vocab: ['a,b']\n",
     15, 15, "merged", ["no ',', '='"]),
    ("duplicate-value", MERGE + "    density: 0.2\n    matrix: {lambda: [0.5, 1, \"1\"]}\n",
     14, 31, "merged", ["lists 1 twice", "items 2 and 3"]),
    ("foreach-name-clash", MERGE + "    density: 0.2\n    foreach:\n      - {lambda: 0.5}\n      - {lambda: 0.5}\n",
     16, 9, "merged", ["foreach entry 2 makes the member 'merged@lambda=0.5' again", "entry 1"]),
    ("set-twice", MERGE + "    density: 0.2\n    lambda: 1\n    matrix: {lambda: [0.5]}\n",
     15, 14, "merged", ["'lambda' is set both in the step and in its matrix"]),
    ("op-varies", MERGE + "    density: 0.2\n    matrix: {op: [merge]}\n",
     14, 14, "merged", ["'op' cannot vary"]),
    ("unknown-matrix-key", MERGE + "    density: \"${matrix.dens}\"\n    matrix: {lambda: [1]}\n",
     13, 14, "merged@lambda=1", ["unknown matrix key '${matrix.dens}'"]),
    ("matrix-outside-a-family", HEAD + "  x: {op: extract-delta, model: \"${matrix.m}\", base: base}\n",
     8, 33, "x", ["${matrix.NAME} is only available in a step with 'matrix:'"]),
    ("single-valued-family-ref", MERGE + "    density: 0.2\n    matrix: {lambda: [1, 2]}\n"
     "  d2: {op: extract-delta, model: merged@*, base: base}\n",
     15, 34, "d2", ["'model' takes a single step", "all 2 members", "e.g. 'merged@lambda=1'"]),
    ("family-name-as-ref", MERGE + "    density: 0.2\n    matrix: {lambda: [1, 2]}\n"
     "  d2: {op: extract-delta, model: merged, base: base}\n",
     15, 34, "d2", ["names the step family 'merged' (2 members)"]),
    ("list-field-written-as-one", MERGE + "    density: 0.2\n    matrix: {lambda: [1, 2]}\n"
     "  e: {op: evaluate, models: merged@*, metrics: [sparsity]}\n",
     15, 29, "e", ["'models' takes a list", "[merged@*]"]),
    ("unknown-family", MERGE + "    density: 0.2\n    matrix: {lambda: [1, 2]}\n"
     "  e: {op: evaluate, models: [mergd@*], metrics: [sparsity]}\n",
     15, 30, "e", ["unknown step family 'mergd@*'", "did you mean 'merged@*'"]),
    ("unknown-member", MERGE + "    density: 0.2\n    matrix: {lambda: [1, 2]}\n"
     "  e: {op: evaluate, models: [merged@lambda=3], metrics: [sparsity]}\n",
     15, 30, "e", ["unknown step 'merged@lambda=3'", "did you mean"]),
    ("output-names-family", MERGE + "    density: 0.2\n    matrix: {lambda: [1, 2]}\noutputs: {merged: out/m}\n",
     15, 11, None, ["'merged' is a step family", "e.g. 'merged@lambda=1'"]),
]


@pytest.mark.parametrize(("text", "line", "col", "step", "fragments"), [c[1:] for c in ERRORS],
                         ids=[c[0] for c in ERRORS])
def test_family_errors_point_at_the_matrix_entry(text, line, col, step, fragments):
    diags = errors_of(text)
    assert len(diags) == 1, [d.format() for d in diags]
    d = diags[0]
    assert (d.line, d.col, d.step) == (line, col, step), d.format()
    for frag in fragments:
        assert frag in d.message, d.format()


def test_a_broken_matrix_does_not_also_fail_its_references():
    diags = errors_of(MERGE + "    density: 0.2\n    matrix: {lambda: []}\n"
                      "  e: {op: evaluate, models: [merged@*, merged@lambda=1], metrics: [sparsity]}\n")
    assert [d.message.split(":")[0] for d in diags] == ["matrix 'lambda' is an empty list"]


def test_family_limits_the_number_of_members():
    lambdas, densities = list(range(40)), [1.0 / (i + 2) for i in range(30)]
    diags = errors_of(MERGE + f"    matrix: {{lambda: {lambdas}, density: {densities}}}\n")
    assert "the matrix makes 1200 members; the limit is 1000" in diags[0].message


SCALARS = (st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["", "a", "a,b", "x=y", "merged@*", "${matrix.lambda}", "${vars.v}", "on"]))
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                   | st.dictionaries(st.sampled_from(["lambda", "density", "op", "matrix", "zz", "1"]), inner,
                                     max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(matrix={"lambda": [1, 2.5], "density": [0.5]}, foreach=None, ref="[merged@*, merged@*]")
@example(matrix=None, foreach=[{"lambda": 1, "density": 0.5}, {"density": 0.2}], ref="[merged@*]")
@given(matrix=ANY, foreach=st.none() | ANY, ref=st.sampled_from(["merged@*", "merged", "merged@lambda=1",
                                                                 "[merged@*]", "[merged@*, merged@*]", "zz@*"]))
def test_any_family_gets_a_pipeline_or_diagnostics_inside_the_file(matrix, foreach, ref):
    """Whatever a matrix or foreach holds, the front end answers with a Pipeline or with
    diagnostics that point inside the file, never another exception."""
    family = {"op": "merge", "method": "ties", "base": "base", "deltas": ["da", "db"]}
    family.update({k: v for k, v in (("matrix", matrix), ("foreach", foreach)) if v is not None})
    text = HEAD + yaml.safe_dump({"merged": family}, default_flow_style=True, width=10_000).replace("\n", " ")
    text = text.rstrip().replace("{merged:", "  merged:", 1)
    text = text[: text.rindex("}")] + "\n" + f"  e: {{op: evaluate, models: {ref}, metrics: [sparsity]}}\n"
    n_lines = text.count("\n") + 1
    try:
        p = parse(text)
    except PipelineError as exc:
        assert exc.diagnostics
        assert all(1 <= d.line <= n_lines for d in exc.diagnostics), [d.format() for d in exc.diagnostics]
        return
    members = [m.name for m in p.families["merged"]]
    assert members and all(n in p.steps for n in members)
    assert p.steps["e"].params.models == members * ref.count("merged@*")


# -- schema ---------------------------------------------------------------------------

def test_schema_takes_matrix_and_foreach_of_the_ops_parameters():
    import jsonschema

    from weightflow.dsl.lang.schema import language_schema

    schema = language_schema()
    doc = yaml.safe_load(SWEEP)
    doc["steps"]["scores"]["metrics"] = [{"sparsity": {}}]  # the schema spells a metric out
    jsonschema.validate(doc, schema)  # 'density' is required of ties, but the matrix gives it
    doc["steps"]["merged"]["matrix"]["lamda"] = [1]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
    doc["steps"]["merged"]["matrix"] = {"lambda": [1]}
    with pytest.raises(jsonschema.ValidationError):  # density is neither in the step nor its matrix...
        jsonschema.validate({**doc, "steps": {"m": {k: v for k, v in doc["steps"]["merged"].items()
                                                     if k != "matrix"}}}, schema)
    doc["steps"]["merged"]["foreach"] = [{"lambda": 1}]
    with pytest.raises(jsonschema.ValidationError):  # not both
        jsonschema.validate(doc, schema)


# -- the command line and the library pipeline, on tiny models -----------------------------

def _cli(capsys, *args) -> tuple[int, str, str]:
    from weightflow.dsl.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def sweep_inputs(tmp_path, tiny_models) -> list[str]:
    """--var arguments that point ties-sweep.yaml at the tiny models and token data."""
    import torch

    g = torch.Generator().manual_seed(0)
    for task in ("a", "b"):
        rows = [{"input_ids": torch.randint(0, 256, (12,), generator=g).tolist()} for _ in range(3)]
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {"base": tiny_models["base"], "a": tiny_models["ft_a"], "b": tiny_models["ft_b"],
              "heldout_a": tmp_path / "a.jsonl", "heldout_b": tmp_path / "b.jsonl",
              "lambdas": "[0.5, 1.0]", "densities": "[0.2, 1.0]"}
    return [x for k, v in values.items() for x in ("--var", f"{k}={v}")]


def test_ties_sweep_pipeline_runs_on_tiny_models(tmp_path, store_dir, sweep_inputs, capsys):
    from weightflow.dsl.store.content import Store
    from weightflow.dsl.store.lockfile import read

    path = tmp_path / "ties-sweep.yaml"
    path.write_text((ROOT / "pipelines" / "ties-sweep.yaml").read_text())
    members = ["merged@lambda=0.5,density=0.2", "merged@lambda=0.5,density=1.0",
               "merged@lambda=1.0,density=0.2", "merged@lambda=1.0,density=1.0"]

    rc, out, err = _cli(capsys, "plan", path, "--cache-dir", store_dir, *sweep_inputs)
    assert rc == 0, err
    assert "merged@* (4 members): 4 to run" in out
    assert "merged@lambda" not in out  # folded into one row
    rc, out, err = _cli(capsys, "run", path, "--cache-dir", store_dir, "-q", "--json", *sweep_inputs)
    assert rc == 0, err
    doc = json.loads(out)
    by_name = {s["name"]: s for s in doc["steps"]}
    assert [s["name"] for s in doc["steps"] if s.get("family") == "merged"] == members
    assert by_name[members[1]]["matrix"] == {"lambda": 0.5, "density": 1.0}
    assert doc["families"] == {"merged": members}

    lock = read(path.with_suffix(".lock"))
    assert set(members) | {"base", "a", "b", "delta_a", "delta_b", "scores"} == set(lock)
    assert len({lock[m].key for m in members}) == 4

    # each member merged with its own values: TIES is base + lambda * combine(trim(deltas)), so at
    # one density the lambda=0.5 member's change to the base is half the lambda=1.0 member's
    store = Store(store_dir)
    base = read_model(store.object_path(lock["base"].digest))
    half = read_model(store.object_path(lock[members[1]].digest))
    full = read_model(store.object_path(lock[members[3]].digest))
    trimmed = read_model(store.object_path(lock[members[2]].digest))
    name = "model.layers.0.mlp.up_proj.weight"
    import torch

    assert torch.allclose(half[name] - base[name], 0.5 * (full[name] - base[name]), atol=1e-6)
    assert not torch.allclose(trimmed[name], full[name])

    # the report scored base, a, b and every member, in that order
    report = json.loads((store.object_path(lock["scores"].digest) / "report.json").read_text())
    assert [m["digest"] for m in report["models"]] == [lock[n].digest for n in ["base", "a", "b", *members]]

    # one more lambda: only its two members (and the evaluation) run; plan says so compactly
    more = [v if v != "lambdas=[0.5, 1.0]" else "lambdas=[0.5, 1.0, 1.5]" for v in sweep_inputs]
    rc, out, err = _cli(capsys, "plan", path, "--cache-dir", store_dir, *more)
    assert rc == 0, err
    assert "merged@* (6 members): 4 cached, 2 to run" in out
    rc, out, err = _cli(capsys, "plan", path, "--cache-dir", store_dir, "--expand", *more)
    assert "  merged@lambda=1.5,density=0.2" in out and "  merged@lambda=0.5,density=0.2" in out
    rc, out, err = _cli(capsys, "plan", path, "--cache-dir", store_dir, "--json",
                        "--target", "merged@*", *more)
    doc = json.loads(out)
    wanted = {s["name"]: s["status"] for s in doc["steps"] if s.get("family")}
    assert list(wanted.values()).count("pending") == 2 and len(wanted) == 6
    assert {s["name"]: s["status"] for s in doc["steps"]}["scores"] == "skipped"

    rc, out, err = _cli(capsys, "status", path, "--cache-dir", store_dir, *sweep_inputs)
    assert rc == 0, err
    assert "merged@* (4 members): 4 locked" in out and "4 in store" in out
    rc, out, err = _cli(capsys, "status", path, "--cache-dir", store_dir, *more)
    assert "merged@* (6 members): 4 locked, 2 not locked" in out
    assert "merged@lambda=1.5,density=0.2" in out  # the unlocked members are named in the note
    rc, out, err = _cli(capsys, "status", path, "--cache-dir", store_dir, "--json", *sweep_inputs)
    entries = [s for s in json.loads(out)["steps"] if s.get("family") == "merged"]
    assert [s["name"] for s in entries] == members

    rc, out, err = _cli(capsys, "dag", path, *sweep_inputs)
    assert "merged@* (4 members) (merge: Model) <- base, delta_a, delta_b" in out
    assert "scores (evaluate: Report) <- base, a, b, merged@*" in out
    rc, out, err = _cli(capsys, "dag", path, "--mermaid", *sweep_inputs)
    assert "merged_lambda_0_5_density_0_2 --> scores" in out
