"""The command line: JSON output, no torch for model-free commands, schema, ops, plug-ins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import write_pipeline

PIPE = """
weightflow: 1
steps:
  base: {op: load, config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
                            num_attention_heads: 2, vocab_size: 64}}
  ft: {op: load, config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
                          num_attention_heads: 2, vocab_size: 64}, init_seed: 1}
  d: {op: extract-delta, model: ft, base: base}
  merged: {op: merge, method: task-arithmetic, base: base, deltas: [d], weights: [0.5]}
"""


def wf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "weightflow", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def test_plan_and_run_json(tmp_path, store_dir):
    path = write_pipeline(tmp_path, PIPE)
    res = wf("plan", path, "--json", "--cache-dir", store_dir)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["pipeline"].endswith("pipeline.yaml")
    assert [s["name"] for s in doc["steps"]] == ["base", "ft", "d", "merged"]
    assert {tuple(sorted(s)) for s in doc["steps"]} >= {("digest", "key", "name", "op", "reason", "status")}
    assert [s["status"] for s in doc["steps"]] == ["pending"] * 4
    assert doc["steps"][0]["key"] and doc["steps"][2]["key"] is None  # after the first miss: unknown
    res = wf("run", path, "--json", "--cache-dir", store_dir)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [s["status"] for s in doc["steps"]] == ["executed"] * 4
    assert all(len(s["digest"]) == 64 for s in doc["steps"])
    doc = json.loads(wf("plan", path, "--json", "--cache-dir", store_dir).stdout)
    assert [s["status"] for s in doc["steps"]] == ["cached"] * 4
    doc = json.loads(wf("run", path, "--json", "--target", "d", "--cache-dir", store_dir).stdout)
    assert [s["status"] for s in doc["steps"]] == ["cached", "cached", "cached", "skipped"]


def test_frozen_cli_exits_nonzero(tmp_path, store_dir):
    path = write_pipeline(tmp_path, PIPE)
    assert wf("run", path, "--cache-dir", store_dir).returncode == 0
    path.write_text(path.read_text().replace("weights: [0.5]", "weights: [0.6]"))
    res = wf("run", path, "--frozen", "--cache-dir", store_dir)
    assert res.returncode != 0
    assert "merged" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("command", [["validate"], ["plan"], ["dag"], ["dag", "--mermaid"], ["status"],
                                     ["schema"], ["ops"]])
def test_model_free_commands_do_not_import_torch(tmp_path, command, store_dir, tiny_models):
    # a local source directory too: plan/status fingerprint its files without torch
    path = write_pipeline(tmp_path, PIPE + f"  local: {{op: load, source: {tiny_models['base']}}}\n")
    args = command + ([str(path)] if command[0] not in ("schema", "ops") else [])
    if command[0] in ("plan", "status"):
        args += ["--cache-dir", str(store_dir)]
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        from weightflow.dsl.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main({args!r})
        heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch", "numpy") if m in sys.modules)
        print(rc, heavy)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "0 []", res.stdout + res.stderr


def test_dag_formats(tmp_path):
    path = write_pipeline(tmp_path, PIPE)
    text = wf("dag", path).stdout
    assert "merged (merge: Model) <- base, d" in text
    mer = wf("dag", path, "--mermaid").stdout
    assert mer.startswith("flowchart TD") and "d --> merged" in mer
    dot = wf("dag", path, "--dot").stdout
    assert '"ft" -> "d";' in dot


def test_show_and_export(tmp_path, store_dir):
    path = write_pipeline(tmp_path, PIPE)
    res = wf("show", path, "merged", "--cache-dir", store_dir)
    assert res.returncode == 2 and "run it" in res.stderr.lower() or "first" in res.stderr
    wf("run", path, "--cache-dir", store_dir)
    doc = json.loads(wf("show", path, "merged", "--json", "--cache-dir", store_dir).stdout)
    assert doc["manifest"]["op"] == "merge" and doc["manifest"]["recipe"]["params"]["weights"] == [0.5]
    assert [c["step"] for c in doc["lineage"]["inputs"]] == ["base", "d"]
    assert doc["lineage"]["inputs"][1]["inputs"][0]["step"] == "ft"
    assert doc["summary"]["parameters"] > 0
    text = wf("show", path, "d", "--cache-dir", store_dir).stdout
    assert "base " in text and "lineage" in text
    res = wf("export", path, "merged", tmp_path / "exported", "--cache-dir", store_dir)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    marker = json.loads((tmp_path / "exported" / "weightflow-export.json").read_text())
    assert marker["manifest"]["step"] == "merged"


def test_unknown_target_is_a_clear_error(tmp_path, store_dir):
    path = write_pipeline(tmp_path, PIPE)
    res = wf("run", path, "--target", "mergd", "--cache-dir", store_dir)
    assert res.returncode == 2 and "did you mean 'merged'" in res.stderr and "Traceback" not in res.stderr


def test_schema_validates_example_and_rejects_bad_step(tmp_path):
    import jsonschema
    import yaml

    schema = json.loads(wf("schema").stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = yaml.safe_load(PIPE)
    doc["vars"] = {"w": 0.5}
    doc["steps"]["merged"]["weights"] = ["${vars.w}"]
    jsonschema.validate(doc, schema)
    bad = yaml.safe_load(PIPE)
    bad["steps"]["merged"]["wieghts"] = [1]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = yaml.safe_load(PIPE)
    bad["steps"]["d"]["op"] = "nope"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ops_lists_every_op_with_params():
    doc = json.loads(wf("ops", "--json").stdout)
    names = {op["name"] for op in doc}
    assert {"load", "extract-delta", "merge"} <= names
    merge = next(op for op in doc if op["name"] == "merge")
    variants = {v["variant"]: {p["name"] for p in v["params"]} for v in merge["variants"]}
    assert variants["task-arithmetic"] >= {"base", "deltas", "weights", "lambda"}
    assert variants["linear"] >= {"models", "weights", "normalize"}
    text = wf("ops").stdout
    assert "extract-delta (v1) -> Delta" in text


def test_readme_op_reference_is_current_and_write_refreshes_it(tmp_path):
    """The README's op reference is generated; editing an op without regenerating fails here."""
    from pathlib import Path

    from weightflow.dsl.lang.opdocs import README_BEGIN, README_END, ops_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block.strip() == ops_markdown().strip(), \
        "README.md's op reference is stale: run `weightflow ops --markdown --write README.md`"
    for op in ("load", "finetune", "unlearn", "prune-wanda", "evaluate", "merge", "dare-prune", "extract-delta"):
        assert f"#### `{op}` (v" in block
    stale = tmp_path / "R.md"
    stale.write_text(f"intro\n{README_BEGIN}\nold text\n{README_END}\noutro\n")
    res = wf("ops", "--markdown", "--write", str(stale))
    assert res.returncode == 0 and "updated" in res.stdout
    text = stale.read_text()
    assert "old text" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert text.split(README_BEGIN)[1].split(README_END)[0].strip() == ops_markdown().strip()
    assert "already current" in wf("ops", "--markdown", "--write", str(stale)).stdout
    (tmp_path / "none.md").write_text("no markers\n")
    res = wf("ops", "--markdown", "--write", str(tmp_path / "none.md"))
    assert res.returncode == 2 and "no '<!-- BEGIN" in res.stderr and "Traceback" not in res.stderr


def test_ops_from_another_package_via_entry_points(tmp_path, store_dir, monkeypatch):
    """A separate installed package adds an op through the weightflow.ops entry points."""
    pkg = tmp_path / "plugin"
    (pkg / "wf_plugin").mkdir(parents=True)
    (pkg / "wf_plugin" / "__init__.py").write_text(textwrap.dedent('''
        from weightflow.dsl.lang.spec import Kind, ModelRef, OpParams, OpSpec

        class ScaleParams(OpParams):
            model: ModelRef
            factor: float = 2.0

        def run(inputs, params, ctx):
            from weightflow.ops.lib.tensors import Checkpoint, copy_side_files, tensor_buffer
            src = Checkpoint(inputs["model"].path)
            w = ctx.tensor_writer(list(src.info.values()))
            for n in src.names():
                t = src.get(n)
                w.write(n, tensor_buffer(t * params.factor if t.is_floating_point() else t))
            w.close()
            copy_side_files(inputs["model"].path, ctx.out)
            return {}

        OP = OpSpec(name="scale", version=1, output=Kind.MODEL, params=ScaleParams, run=run,
                    doc="Multiply every weight by a factor.")
    '''))
    dist = pkg / "wf_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wf-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[weightflow.ops]\nscale = wf_plugin:OP\n")
    path = write_pipeline(tmp_path, PIPE + "  doubled: {op: scale, model: base, factor: 3}\n")
    env_code = f"import sys; sys.path.insert(0, {str(pkg)!r}); from weightflow.dsl.cli import main; " \
               f"raise SystemExit(main(['run', {str(path)!r}, '--json', '--cache-dir', {str(store_dir)!r}]))"
    res = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    statuses = {s["name"]: s["status"] for s in json.loads(res.stdout)["steps"]}
    assert statuses["doubled"] == "executed"


def test_version_and_one_ops_reference():
    res = subprocess.run([sys.executable, "-m", "weightflow", "--version"], capture_output=True, text=True)
    from weightflow import __version__

    assert res.returncode == 0 and res.stdout.strip() == f"weightflow {__version__}"
    res = subprocess.run([sys.executable, "-m", "weightflow", "ops", "merge"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("merge (v2) -> Model")
    assert "model_stock" in res.stdout and "``" not in res.stdout and "\nload (" not in res.stdout
    res = subprocess.run([sys.executable, "-m", "weightflow", "ops", "merj"], capture_output=True, text=True)
    assert res.returncode == 2 and "did you mean 'merge'" in res.stderr and "Traceback" not in res.stderr
