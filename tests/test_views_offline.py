"""Views (``show``, ``report``, ``export``, ``status``) read the lock file and the store.

They never fingerprint inputs (no hashing of model files, no hub revision look-ups) and
never touch the network: after a run, every op's fingerprint and preflight hook raises,
sockets refuse to connect and the model sources are gone, yet every view still answers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import socket
from contextlib import redirect_stderr, redirect_stdout

import pytest
from conftest import lock_of, run, write_pipeline


def _pipeline(models) -> str:
    return f"""
weightflow: 1
name: offline-views
steps:
  base: {{op: load, source: {models / 'base'}}}
  ft: {{op: load, source: {models / 'ft'}}}
  d: {{op: extract-delta, model: ft, base: base}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [d], weights: [0.5]}}
  scores: {{op: evaluate, models: [base, merged], metrics: [{{sparsity: {{}}}}]}}
"""


class Forbidden(AssertionError):
    pass


def _boom(*args, **kwargs):
    raise Forbidden("a view fingerprinted an input, ran a preflight or used the network")


@pytest.fixture
def offline(monkeypatch):
    """Every op's fingerprint/preflight hook, key computation and socket connect raises."""
    from weightflow.dsl.engine import planner
    from weightflow.dsl.lang import registry
    from weightflow.dsl.store.content import Store

    def arm():
        ops = {name: dataclasses.replace(spec, fingerprint=_boom, preflight=_boom)
               for name, spec in registry.all_ops().items()}
        monkeypatch.setattr(registry, "_OPS", ops)
        monkeypatch.setattr(registry, "_EXTRA", {})
        monkeypatch.setattr(planner.Planner, "key_of", _boom)
        monkeypatch.setattr(planner.Planner, "preflight", _boom)
        monkeypatch.setattr(Store, "file_digest", _boom)  # hashing a source file
        monkeypatch.setattr(socket.socket, "connect", _boom)
        monkeypatch.setattr(socket.socket, "connect_ex", _boom)
        monkeypatch.setattr(socket, "create_connection", _boom)
        monkeypatch.setattr(socket, "getaddrinfo", _boom)
    return arm


def cli(*args) -> tuple[int, str, str]:
    from weightflow.dsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def ran(tmp_path, tiny_models, store_dir):
    """A pipeline that was run, whose model sources were then removed."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models["base"], models / "base")
    shutil.copytree(tiny_models["ft_a"], models / "ft")
    path = write_pipeline(tmp_path, _pipeline(models))
    outcome, status = run(path, store_dir)
    assert set(status.values()) == {"executed"}, status
    shutil.rmtree(models)  # a view that looked at a source would now fail
    return path, outcome


def test_views_never_fingerprint_inputs_or_touch_the_network(tmp_path, store_dir, ran, offline):
    path, outcome = ran
    lock = lock_of(path)
    offline()

    rc, out, err = cli("show", path, "merged", "--cache-dir", store_dir)
    assert rc == 0, err
    assert "merged (merge v" in out and lock["merged"]["digest"] in out and "lineage" in out
    assert f"d (extract-delta) {lock['d']['digest'][:12]}" in out
    rc, out, err = cli("show", path, "d", "--cache-dir", store_dir)
    assert rc == 0, err
    assert "base " in out and "(step 'base')" in out  # the delta's base named from the lock
    rc, out, err = cli("show", path, "merged", "--json", "--cache-dir", store_dir)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["manifest"]["op"] == "merge" and doc["manifest"]["recipe"]["params"]["weights"] == [0.5]
    assert doc["lineage"]["key"] == lock["merged"]["key"]
    assert [(c["step"], c["digest"]) for c in doc["lineage"]["inputs"]] == \
        [("base", lock["base"]["digest"]), ("d", lock["d"]["digest"])]
    assert doc["summary"]["parameters"] > 0

    rc, out, err = cli("status", path, "--json", "--cache-dir", store_dir)
    assert rc == 0, err
    doc = json.loads(out)
    assert [(s["name"], s["lock"], s["cache"]) for s in doc["steps"]] == \
        [(n, "locked", "in store") for n in ("base", "ft", "d", "merged", "scores")]
    assert all(s["key"] == lock[s["name"]]["key"] for s in doc["steps"])
    rc, out, err = cli("status", path, "--cache-dir", store_dir)
    assert rc == 0, err
    assert "weightflow plan" in out and "stale" in out

    out_dir = tmp_path / "rep"
    rc, out, err = cli("report", path, "--md", "--cache-dir", store_dir, "--out", out_dir)
    assert rc == 0, err
    assert "## scores" in out and "| base |" in out and "| merged |" in out
    assert f"`merged` (key {lock['merged']['key'][:12]}" in out
    assert (out_dir / "pipeline.report.html").is_file()
    rc, out, err = cli("report", path, "--json", "--cache-dir", store_dir, "--out", out_dir)
    assert rc == 0, err
    (rep,) = json.loads(out)["reports"]
    assert rep["status"] == "cached" and rep["key"] == lock["scores"]["key"] and rep["report"]["results"]

    target = tmp_path / "exported"
    rc, out, err = cli("export", path, "merged", target, "--cache-dir", store_dir)
    assert rc == 0, err
    assert (target / "model.safetensors").is_file()
    marker = json.loads((target / "weightflow-export.json").read_text())
    assert marker["manifest"]["step"] == "merged"
    assert "Forbidden" not in err


def test_views_read_the_lock_even_for_an_unreachable_hub_source(tmp_path, store_dir, ran, offline):
    """The lock names what ran; the pipeline now loads from an unpinned, unreachable hub
    repo, whose fingerprint would ask the hub for its revision.  Views still answer from
    the lock, and ``status`` says the lock may be stale."""
    path, _ = ran
    lock = lock_of(path)
    text = path.read_text()
    path.write_text("\n".join("  base: {op: load, source: 'hf:nobody-here/unreachable-model'}"
                              if line.startswith("  base:") else line for line in text.splitlines()) + "\n")
    offline()

    rc, out, err = cli("show", path, "base", "--json", "--cache-dir", store_dir)
    assert rc == 0, err
    assert json.loads(out)["lineage"]["digest"] == lock["base"]["digest"]
    rc, out, err = cli("status", path, "--cache-dir", store_dir)
    assert rc == 0, err
    assert "base" in out and "in store" in out and "weightflow plan" in out
    rc, out, err = cli("report", path, "--json", "--cache-dir", store_dir, "--out", tmp_path / "rep")
    assert rc == 0, err
    rc, _, err = cli("export", path, "base", tmp_path / "exported", "--cache-dir", store_dir)
    assert rc == 0, err


def test_status_names_what_the_lock_lacks_and_missing_entries(tmp_path, store_dir, ran, offline):
    path, _ = ran
    lock = lock_of(path)
    # a new step the lock does not know, a renamed step, and a store entry gone
    text = path.read_text().replace("  scores:", "  evals:") + \
        "  half: {op: merge, method: task-arithmetic, base: base, deltas: [d], weights: [0.25]}\n"
    path.write_text(text)
    from weightflow.dsl.store.content import Store

    Store(store_dir).discard_action(lock["merged"]["key"])
    offline()

    rc, out, err = cli("status", path, "--json", "--cache-dir", store_dir)
    assert rc == 0, err
    doc = json.loads(out)
    states = {s["name"]: (s["lock"], s["cache"]) for s in doc["steps"]}
    assert states == {"base": ("locked", "in store"), "ft": ("locked", "in store"),
                      "d": ("locked", "in store"), "merged": ("locked", "missing"),
                      "evals": ("not locked", "-"), "half": ("not locked", "-")}
    assert doc["not_locked"] == ["evals", "half"] and doc["lock_only"] == ["scores"]
    rc, out, err = cli("status", path, "--cache-dir", store_dir)
    assert rc == 0, err
    assert "evals, half" in out and "no longer has: scores" in out

    rc, _, err = cli("show", path, "merged", "--cache-dir", store_dir)
    assert rc == 2 and "does not hold" in err and "--target merged" in err
    rc, _, err = cli("show", path, "half", "--cache-dir", store_dir)
    assert rc == 2 and "not in the lock file" in err and "first" in err
    rc, _, err = cli("export", path, "merged", tmp_path / "x", "--cache-dir", store_dir)
    assert rc == 2 and "no cached output" in err and not (tmp_path / "x").exists()
    rc, _, err = cli("report", path, "--cache-dir", store_dir)
    assert rc == 2 and "no report" in err  # 'evals' is not in the lock
