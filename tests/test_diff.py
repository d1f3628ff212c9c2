"""weightflow diff: a real git repository with two commits (a parameter change, a rename, a
reformatting, an added step), --json fields, --md, metrics side by side from reports in the
store, git's external diff driver, sweep families, and no torch import."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import run, write_pipeline

CFG = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
       "num_attention_heads: 2, vocab_size: 64}")

# commit 1
V1 = f"""
weightflow: 1
vars: {{w: 0.5}}
steps:
  base: {{op: load, config: {CFG}}}
  ft: {{op: load, config: {CFG}, init_seed: 1}}
  d: {{op: extract-delta, model: ft, base: base}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [d], weights: ["${{vars.w}}"]}}
  scores: {{op: evaluate, models: [base, merged], metrics: [{{delta_norm: {{base: base}}}}]}}
"""

# commit 2: w 0.5 -> 0.7 (a parameter change through a variable), d renamed to ft_delta,
# base reformatted (block style, keys reordered, a default spelled out), a step added
V2 = f"""
weightflow: 1
vars:
  w: 0.7
steps:
  base:
    init_seed: 0          # the default, written out
    config: {CFG}
    op: load
  ft: {{op: load, config: {CFG}, init_seed: 1}}
  ft_delta: {{op: extract-delta, model: ft, base: base}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [ft_delta], weights: ["${{vars.w}}"]}}
  half: {{op: merge, method: task-arithmetic, base: base, deltas: [ft_delta], weights: [0.25]}}
  scores: {{op: evaluate, models: [base, merged], metrics: [{{delta_norm: {{base: base}}}}]}}
"""

GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def git(repo: Path, *args: str) -> str:
    res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert res.returncode == 0, res.stderr
    return res.stdout


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def wf(*args, cwd=None) -> Result:
    """``weightflow ARGS`` in-process (a subprocess costs a second of imports), run in ``cwd``."""
    from weightflow.dsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    os.chdir(cwd or before)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        os.chdir(before)
    return Result(rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A repository with V1 then V2 committed, each with the lock file of its run; store
    'v1' holds V1's run only, store 'both' V1's and V2's.  Returns (repo, pipeline, stores)."""
    root = tmp_path_factory.mktemp("diffrepo")
    repo = root / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    path = write_pipeline(repo, V1)
    stores = {"v1": root / "store-v1", "both": root / "store-both"}
    run(path, stores["v1"])
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "v1")
    shutil.copytree(stores["v1"], stores["both"])
    write_pipeline(repo, V2)
    run(path, stores["both"])
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "v2: w 0.7, d renamed, base reformatted, half added")
    return repo, path, stores


def diff_json(repo: Path, store: Path, *args) -> dict:
    res = wf("diff", *args, "--json", "--cache-dir", store, cwd=repo)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def by_name(doc: dict) -> dict[str, dict]:
    return {s["name"]: s for s in doc["steps"]}


# -- classification ------------------------------------------------------------------------------

def test_two_commits_classified(repo):
    repo_dir, _, stores = repo
    doc = diff_json(repo_dir, stores["v1"], "HEAD~1", "HEAD", "pipeline.yaml")
    assert doc["format"] == 1
    assert doc["old"] == {"label": "HEAD~1:pipeline.yaml", "kind": "git", "rev": "HEAD~1",
                          "path": str((repo_dir / "pipeline.yaml").resolve())}
    assert doc["new"]["label"] == "HEAD:pipeline.yaml" and doc["new"]["kind"] == "git"
    steps = by_name(doc)
    assert [s["name"] for s in doc["steps"]] == ["base", "ft", "ft_delta", "merged", "half", "scores"]
    assert {n: s["change"] for n, s in steps.items()} == {
        "base": "unchanged",            # reformatted, a default written out
        "ft": "unchanged",
        "ft_delta": "renamed",          # same recipe under another name
        "merged": "changed",            # its own parameter
        "half": "added",
        "scores": "invalidated",        # by its input 'merged'
    }
    assert steps["ft_delta"]["old_name"] == "d" and steps["ft_delta"]["params"] == []
    # after ${vars} resolution; the rename of its input is no change of its own
    assert steps["merged"]["params"] == [{"path": "weights[0]", "old": 0.5, "new": 0.7}]
    assert steps["merged"]["because"] == []
    assert steps["scores"]["because"] == ["merged"] and steps["scores"]["params"] == []
    assert steps["half"]["old_name"] is None
    assert all(set(s) >= {"name", "old_name", "op", "change", "params", "because", "state", "key", "old_key",
                          "seconds", "seconds_from", "family"} for s in doc["steps"])


def test_costs_from_the_store(repo):
    """With only V1 run: the rename is cached (free); what changed is to run, timed by its
    previous run; the added step has no recorded time."""
    repo_dir, _, stores = repo
    doc = diff_json(repo_dir, stores["v1"], "HEAD~1", "HEAD", "pipeline.yaml")
    steps = by_name(doc)
    lock1 = yaml.safe_load(git(repo_dir, "show", "HEAD~1:pipeline.lock"))
    assert {n: s["state"] for n, s in steps.items()} == {
        "base": "cached", "ft": "cached", "ft_delta": "cached", "merged": "to run", "half": "to run",
        "scores": "to run"}
    assert steps["ft_delta"]["key"] == lock1["steps"]["d"]["key"]  # the same key: nothing to compute
    manifest = json.loads((stores["v1"] / "actions" / lock1["steps"]["merged"]["key"][:2] /
                           f"{lock1['steps']['merged']['key']}.json").read_text())
    assert steps["merged"]["old_key"] == lock1["steps"]["merged"]["key"]
    assert steps["merged"]["seconds"] == manifest["seconds"] and steps["merged"]["seconds_from"] == "previous run"
    assert steps["merged"]["key"] is not None and steps["merged"]["key"] != steps["merged"]["old_key"]
    assert steps["half"]["seconds"] is None and steps["half"]["seconds_from"] is None
    assert steps["base"]["seconds_from"] == "this key"
    s = doc["summary"]
    counts = tuple(s[c] for c in ("added", "removed", "renamed", "changed", "invalidated", "unchanged"))
    assert counts == (1, 0, 1, 1, 1, 2)
    assert s["to_run"] == 3 and s["cached"] == 3 and s["would_rerun"] is True
    assert s["unknown_seconds"] == 1  # half
    assert s["seconds_to_run"] == pytest.approx(sum(steps[n]["seconds"] for n in ("merged", "scores")), abs=2e-3)
    res = wf("diff", "HEAD~1", "HEAD", "pipeline.yaml", "--exit-code", "--cache-dir", stores["v1"], cwd=repo_dir)
    assert res.returncode == 1, res.stderr
    res = wf("diff", "HEAD~1", "HEAD", "pipeline.yaml", "--exit-code", "--cache-dir", stores["both"], cwd=repo_dir)
    assert res.returncode == 0, res.stderr  # everything of V2 is cached there


def test_text_and_markdown(repo):
    repo_dir, _, stores = repo
    res = wf("diff", "HEAD~1", "HEAD", "pipeline.yaml", "--cache-dir", stores["v1"], cwd=repo_dir)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("weightflow diff HEAD~1:pipeline.yaml → HEAD:pipeline.yaml")
    row = next(line for line in out.splitlines() if line.startswith("merged "))
    assert "changed" in row and re.search(r"to run (~|<)[0-9.]+ s", row) and "weights[0]: 0.5 → 0.7" in row
    assert any(line.startswith("ft_delta (was d)") and "renamed" in line and "cached" in line
               for line in out.splitlines())
    assert any(line.startswith("scores ") and "input merged changed" in line for line in out.splitlines())
    assert "unchanged: 2 steps (base, ft); all cached" in out
    assert "would run: 3 steps" in out and "(1 with no recorded time)" in out
    md = wf("diff", "HEAD~1", "HEAD", "pipeline.yaml", "--md", "--cache-dir", stores["v1"], cwd=repo_dir).stdout
    assert md.startswith("### weightflow diff: `HEAD~1:pipeline.yaml` → `HEAD:pipeline.yaml`")
    assert "| step | op | change | cost | why |" in md
    assert "| `merged` | merge | changed |" in md and "weights[0]: 0.5 → 0.7" in md
    assert "| `half` | merge | added | to run (time unknown) | new step |" in md


def test_working_copy_forms(repo):
    """`diff P` = HEAD against the working copy; `diff REV P`; `diff OLD NEW` with REV:PATH."""
    repo_dir, path, stores = repo
    doc = diff_json(repo_dir, stores["both"], "pipeline.yaml")
    assert doc["old"]["label"] == "HEAD:pipeline.yaml" and doc["new"] == {
        "label": "pipeline.yaml", "kind": "file", "rev": None, "path": str(path.resolve())}
    assert {s["change"] for s in doc["steps"]} == {"unchanged"}
    original = path.read_text()
    try:
        path.write_text(original.replace("weights: [0.25]", "weights: [0.3]"))
        doc = diff_json(repo_dir, stores["both"], "pipeline.yaml")
        assert by_name(doc)["half"]["params"] == [{"path": "weights[0]", "old": 0.25, "new": 0.3}]
        doc = diff_json(repo_dir, stores["both"], "main~1", "pipeline.yaml")
        assert by_name(doc)["ft_delta"]["change"] == "renamed" and by_name(doc)["half"]["change"] == "added"
        sub = repo_dir / "sub"  # REV:PATH is relative to the top level, wherever diff runs
        sub.mkdir(exist_ok=True)
        doc = diff_json(sub, stores["both"], "HEAD~1:pipeline.yaml", "HEAD:pipeline.yaml")
        assert by_name(doc)["merged"]["change"] == "changed"
    finally:
        path.write_text(original)


def test_added_and_removed_file(repo, tmp_path):
    repo_dir, path, stores = repo
    doc = diff_json(repo_dir, stores["v1"], "/dev/null", "pipeline.yaml")
    assert {s["change"] for s in doc["steps"]} == {"added"} and doc["old"]["kind"] == "none"
    doc = diff_json(repo_dir, stores["v1"], "pipeline.yaml", "/dev/null")
    assert [s["change"] for s in doc["steps"]] == ["removed"] * 6 and doc["summary"]["would_rerun"] is False


def test_bad_arguments_are_clear_errors(repo, tmp_path):
    repo_dir, path, stores = repo
    res = wf("diff", "no-such-rev", "pipeline.yaml", "--cache-dir", stores["v1"], cwd=repo_dir)
    assert res.returncode == 2 and "unknown git revision 'no-such-rev'" in res.stderr
    assert "Traceback" not in res.stderr
    outside = write_pipeline(tmp_path, V1)
    res = wf("diff", outside, "--cache-dir", stores["v1"], cwd=tmp_path)
    assert res.returncode == 2 and "not inside a git repository" in res.stderr and "Traceback" not in res.stderr
    res = wf("diff", "HEAD:missing.yaml", "HEAD:pipeline.yaml", "--json", "--cache-dir", stores["v1"], cwd=repo_dir)
    assert res.returncode == 0 and json.loads(res.stdout)["old"]["kind"] == "none"
    res = wf("diff", "--cache-dir", stores["v1"], cwd=repo_dir)
    assert res.returncode == 2 and "diff needs a pipeline" in res.stderr
    broken = write_pipeline(tmp_path, V1.replace("method: task-arithmetic", "method: nope"), "broken.yaml")
    res = wf("diff", outside, broken, "--cache-dir", stores["v1"], cwd=tmp_path)
    assert res.returncode == 2 and "broken.yaml:" in res.stderr and "merged" in res.stderr
    assert "Traceback" not in res.stderr


# -- metrics -------------------------------------------------------------------------------------

def test_metrics_side_by_side(repo):
    """Both commits run: every metric of 'scores', old and new with the change; merged's
    delta norm scales with the merge weight (0.5 -> 0.7), the base's stays 0."""
    repo_dir, _, stores = repo
    doc = diff_json(repo_dir, stores["both"], "HEAD~1", "HEAD", "pipeline.yaml")
    (rep,) = doc["reports"]
    assert rep["step"] == "scores" and rep["status"] == "compared" and rep["old_digest"] != rep["new_digest"]
    rows = {(r["model"], r["column"]): r for r in rep["rows"]}
    assert set(rows) == {("base", "l2"), ("base", "relative"), ("merged", "l2"), ("merged", "relative")}

    def report(rev: str) -> dict:
        digest = yaml.safe_load(git(repo_dir, "show", f"{rev}:pipeline.lock"))["steps"]["scores"]["digest"]
        return json.loads((stores["both"] / "objects" / digest[:2] / digest / "report.json").read_text())

    old, new = report("HEAD~1"), report("HEAD")
    m = rows[("merged", "l2")]
    assert m["old"] == old["results"][1][0]["values"]["l2"] and m["new"] == new["results"][1][0]["values"]["l2"]
    assert m["delta"] == pytest.approx(m["new"] - m["old"])
    assert m["new"] / m["old"] == pytest.approx(0.7 / 0.5, rel=1e-4)
    assert rows[("base", "l2")]["old"] == 0 and rows[("base", "l2")]["direction"] == "same"
    assert all(r["metric"] == "delta_norm" for r in rep["rows"])
    out = wf("diff", "HEAD~1", "HEAD", "pipeline.yaml", "--cache-dir", stores["both"], cwd=repo_dir).stdout
    assert "metrics of 'scores' (HEAD~1:pipeline.yaml → HEAD:pipeline.yaml):" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("merged") and "delta_norm l2" in x)
    assert line.split()[-1].startswith("+")  # the norm grew
    # the base's unchanged values are left out of the table, and counted
    assert not any(x.strip().startswith("base") for x in out.splitlines())
    assert "2 unchanged values not shown (--expand shows every value)" in out
    full = wf("diff", "HEAD~1", "HEAD", "pipeline.yaml", "--expand", "--cache-dir", stores["both"], cwd=repo_dir).stdout
    assert any(x.strip().startswith("base") and "delta_norm l2" in x for x in full.splitlines())
    md = wf("diff", "HEAD~1", "HEAD", "pipeline.yaml", "--md", "--cache-dir", stores["both"], cwd=repo_dir).stdout
    assert "#### Metrics of `scores`" in md and "| `merged` | delta_norm l2 |" in md


def test_report_missing_on_new_side_is_said(repo):
    repo_dir, _, stores = repo
    doc = diff_json(repo_dir, stores["v1"], "HEAD~1", "HEAD", "pipeline.yaml")
    assert [(r["step"], r["status"]) for r in doc["reports"]] == [("scores", "new missing")]


# -- git's external diff driver --------------------------------------------------------------

def test_git_external_driver(repo, tmp_path):
    repo_dir, path, stores = repo
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo_dir), str(clone)], check=True, env={**os.environ, **GIT_ENV})
    command = (f"{shlex.quote(sys.executable)} -m weightflow diff --git-driver "
               f"--cache-dir {shlex.quote(str(stores['v1']))}")
    git(clone, "config", "diff.weightflow.command", command)
    (clone / ".gitattributes").write_text("*.yaml diff=weightflow\n")
    (clone / "ci.yaml").write_text("jobs: {test: {runs-on: ubuntu}}\n")
    git(clone, "add", ".gitattributes", "ci.yaml")
    git(clone, "commit", "-q", "-m", "attributes")
    out = git(clone, "diff", "HEAD~2", "HEAD~1")
    assert "diff --weightflow a/pipeline.yaml b/pipeline.yaml" in out
    assert "weightflow diff a/pipeline.yaml" in out and "b/pipeline.yaml" in out
    assert any(line.startswith("ft_delta (was d)") and "renamed" in line for line in out.splitlines())
    assert any(line.startswith("merged ") and "weights[0]: 0.5 → 0.7" in line for line in out.splitlines())
    assert "\n-  d: {op: extract-delta" in out  # the line diff follows
    # the working copy against the index, a new pipeline file, and a file that is no pipeline
    (clone / "pipeline.yaml").write_text((clone / "pipeline.yaml").read_text().replace("[0.25]", "[0.5]"))
    write_pipeline(clone, V1, "second.yaml")
    (clone / "ci.yaml").write_text("jobs: {test: {runs-on: debian}}\n")
    git(clone, "add", "second.yaml")
    out = git(clone, "diff", "HEAD")
    sections = {s.split("\n", 1)[0]: s for s in ("\n" + out).split("\ndiff --")[1:]}
    assert set(sections) == {"weightflow a/ci.yaml b/ci.yaml", "weightflow a/pipeline.yaml b/pipeline.yaml",
                             "weightflow a/second.yaml b/second.yaml"}
    assert "weights[0]: 0.25 → 0.5" in sections["weightflow a/pipeline.yaml b/pipeline.yaml"]
    second = sections["weightflow a/second.yaml b/second.yaml"]
    assert "a/second.yaml (no such file)" in second and second.count(" added ") == 5
    ci = sections["weightflow a/ci.yaml b/ci.yaml"]
    assert "-jobs: {test: {runs-on: ubuntu}}" in ci and "STEP" not in ci
    # a pipeline that does not parse: git still gets a diff (a failing driver stops git); the
    # driver's own arguments as git passes them, in-process (git's call is tested above)
    broken = tmp_path / "blob.yaml"
    broken.write_text((clone / "pipeline.yaml").read_text().replace("op: merge", "op: mrege", 1))
    res = wf("diff", "--git-driver", "--cache-dir", stores["v1"], "pipeline.yaml", clone / "pipeline.yaml",
             "1" * 40, "100644", broken, "2" * 40, "100644", cwd=clone)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "cannot compare the pipelines" in out and "unknown op 'mrege'" in out and "+  merged: {op: mrege" in out
    assert wf("diff", "--git-driver", "x.yaml", "a", "b", cwd=clone).returncode == 2  # not git's 7 arguments


# -- sweep families (names only) ------------------------------------------------------------

def test_sweep_family_shown_compactly():
    from weightflow.dsl.present.diff import Diff, StepDiff, text
    from weightflow.dsl.present.diff_sides import Side

    members = [f"merged@lambda={x},density={y}" for x in (0.3, 0.5, 0.7) for y in (0.2, 0.5)]
    steps = [StepDiff("base", "base", "load", "unchanged", state="cached")]
    for i, name in enumerate(members):
        steps.append(StepDiff(name, name if i < 4 else None, "merge", "invalidated" if i < 4 else "added",
                              because=["base"] if i < 4 else [], state="cached" if i < 2 else "to run",
                              seconds=2.0))
    d = Diff(Side("old.yaml", "", Path("old.yaml")), Side("new.yaml", "", Path("new.yaml")), steps, [])
    out = text(d)
    row = next(line for line in out.splitlines() if line.startswith("merged@*"))
    assert row.startswith("merged@* (6 members)") and "2 cached, 4 to run ~8.0 s" in row
    assert "2 added, 4 invalidated" in row and "input base changed (4 members)" in row
    assert any(line.strip() == "new step (2 members)" for line in out.splitlines())
    assert not any(line.startswith("merged@lambda") for line in out.splitlines())
    expanded = text(d, expand=True)
    assert sum(line.startswith("merged@lambda=") for line in expanded.splitlines()) == 6
    fam = d.as_json()["families"]
    assert fam == [{"family": "merged", "members": members, "changes": {"added": 2, "invalidated": 4},
                    "cached": 2, "to_run": 4, "seconds": 8.0}]
    assert all(s["family"] == "merged" for s in d.as_json()["steps"][1:])


# -- spelling -----------------------------------------------------------------------------------

def test_alias_spelling_and_data_path_are_no_change(tmp_path, store_dir):
    """`num_epochs` is an alias of `epochs`; `./data.jsonl` is the same file as `data.jsonl`."""
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    body = f"""
    weightflow: 1
    steps:
      base: {{op: load, config: {CFG}}}
      ft: {{op: finetune, model: base, data: DATA, EPOCHS: 2, learning_rate: 1.0e-4}}
    """
    a = write_pipeline(tmp_path, body.replace("DATA", "data.jsonl").replace("EPOCHS", "epochs"), "a.yaml")
    b = write_pipeline(tmp_path, body.replace("DATA", "./data.jsonl").replace("EPOCHS", "num_epochs"), "b.yaml")
    c = write_pipeline(tmp_path, body.replace("DATA", "data.jsonl").replace("EPOCHS: 2", "epochs: 3"), "c.yaml")
    doc = json.loads(wf("diff", a, b, "--json", "--cache-dir", store_dir).stdout)
    assert [s["change"] for s in doc["steps"]] == ["unchanged", "unchanged"]
    res = wf("diff", a, c, "--json", "--cache-dir", store_dir)
    assert res.returncode == 0, res.stderr
    assert by_name(json.loads(res.stdout))["ft"]["params"] == [{"path": "epochs", "old": 2, "new": 3}]


# -- no torch --------------------------------------------------------------------------------

def test_diff_does_not_import_torch(repo):
    repo_dir, _, stores = repo
    quickstart = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
    calls = [["diff", "HEAD~1", "HEAD", "pipeline.yaml", "--cache-dir", str(stores["both"])]]
    if (quickstart.parent / "models" / "all-MiniLM-L6-v2").is_dir():  # built by examples/prepare.py
        calls.append(["diff", str(quickstart), str(quickstart), "--cache-dir", str(stores["v1"])])
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        from weightflow.dsl.cli import main
        for args in {calls!r}:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                rc = main(args)
            print(rc, "metrics of 'scores'" in out.getvalue() or "unchanged: 11 steps" in out.getvalue())
        heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch", "numpy") if m in sys.modules)
        print(heavy)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_dir,
                         env={**os.environ, **GIT_ENV})
    assert res.stdout.split("\n")[:-1] == ["0 True"] * len(calls) + ["[]"], res.stdout + res.stderr
