"""Caching, early cutoff, the lock file, --force, --frozen, corruption and gc."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import lock_of, run, write_pipeline

PIPE = """
weightflow: 1
steps:
  base: {{op: load, source: {base}}}
  ft_a: {{op: load, source: {ft_a}}}
  ft_b: {{op: load, source: {ft_b}}}
  delta_a: {{op: extract-delta, model: ft_a, base: base}}
  delta_b: {{op: extract-delta, model: ft_b, base: base}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [delta_a, delta_b], weights: [{wa}, 0.5]}}
outputs: {{merged: out/merged}}
"""

# The same pipeline reformatted: block style, comments, other key order, renamed steps.
RENAMED = """
# a comment
weightflow: 1
outputs:
  combined: out/merged
steps:
  foundation:
    source: {base}
    op: load
  ft_a: {{op: load, source: {ft_a}}}
  ft_b: {{source: {ft_b}, op: load}}
  task_a:
    op: extract-delta
    base: foundation   # order of keys does not matter
    model: ft_a
  task_b: {{op: extract-delta, model: ft_b, base: foundation}}
  combined:
    op: merge
    method: task-arithmetic
    weights: [{wa}, 0.50]
    deltas: [task_a, task_b]
    base: foundation
    lambda: 1.0
"""


def pipeline(tmp_path, tiny_models, text=PIPE, wa="1.0", name="pipeline.yaml"):
    fields = {k: str(v) for k, v in tiny_models.items()}
    return write_pipeline(tmp_path, text.format(wa=wa, **fields), name)


def test_second_run_executes_nothing_and_lock_is_stable(tmp_path, tiny_models, store_dir):
    path = pipeline(tmp_path, tiny_models)
    _, first = run(path, store_dir)
    assert set(first.values()) == {"executed"}
    lock_text = path.with_suffix(".lock").read_text()
    outcome, second = run(path, store_dir)
    assert set(second.values()) == {"cached"}
    assert not outcome.lock_changed
    assert path.with_suffix(".lock").read_text() == lock_text
    assert "timestamp" not in lock_text and "created" not in lock_text


def test_changing_one_merge_weight_reexecutes_only_the_merge(tmp_path, tiny_models, store_dir):
    path = pipeline(tmp_path, tiny_models)
    run(path, store_dir)
    old = lock_of(path)["merged"]
    pipeline(tmp_path, tiny_models, wa="0.25")
    _, status = run(path, store_dir)
    assert status == {"base": "cached", "ft_a": "cached", "ft_b": "cached", "delta_a": "cached",
                      "delta_b": "cached", "merged": "executed"}
    new = lock_of(path)["merged"]
    assert new["key"] != old["key"] and new["digest"] != old["digest"]


def test_renaming_and_reformatting_reexecutes_nothing(tmp_path, tiny_models, store_dir):
    path = pipeline(tmp_path, tiny_models)
    run(path, store_dir)
    renamed = pipeline(tmp_path, tiny_models, text=RENAMED, name="renamed.yaml")
    _, status = run(renamed, store_dir)
    assert set(status.values()) == {"cached"}, status
    assert lock_of(renamed)["combined"]["key"] == lock_of(path)["merged"]["key"]


def test_force_recomputes_and_early_cutoff_keeps_dependants(tmp_path, tiny_models, store_dir):
    path = pipeline(tmp_path, tiny_models)
    run(path, store_dir)
    _, status = run(path, store_dir, force=["delta_a"])
    assert status["delta_a"] == "executed"
    # same bytes came out, so the merge's key did not change: it stays cached
    assert status["merged"] == "cached"
    _, status = run(path, store_dir, force=["merged"])
    assert status["merged"] == "executed" and status["base"] == "cached"


def test_early_cutoff_when_recipe_changes_but_output_does_not(tmp_path, tiny_models, store_dir):
    path = pipeline(tmp_path, tiny_models)
    run(path, store_dir)
    text = path.read_text().replace("delta_a: {op: extract-delta, model: ft_a, base: base}",
                                    "delta_a: {op: extract-delta, model: ft_a, base: base, exclude: [nothing.matches]}")
    assert text != path.read_text()
    path.write_text(text)
    _, status = run(path, store_dir)
    assert status["delta_a"] == "executed"  # new key
    assert status["merged"] == "cached"     # same delta content -> same merge key


def test_targets_run_only_what_they_need(tmp_path, tiny_models, store_dir):
    path = pipeline(tmp_path, tiny_models)
    outcome, status = run(path, store_dir, targets=["delta_a"])
    assert status == {"base": "executed", "ft_a": "executed", "ft_b": "skipped", "delta_a": "executed",
                      "delta_b": "skipped", "merged": "skipped"}
    assert not (tmp_path / "out" / "merged").exists()  # outputs of skipped steps are not exported


def test_frozen_detects_a_changed_pipeline_without_running(tmp_path, tiny_models, store_dir):
    from weightflow.dsl.engine.runner import FrozenMismatch

    path = pipeline(tmp_path, tiny_models)
    run(path, store_dir)
    _, status = run(path, store_dir, frozen=True)  # unchanged: fine
    assert set(status.values()) == {"cached"}
    pipeline(tmp_path, tiny_models, wa="0.3")
    actions_before = sorted((store_dir / "actions").rglob("*.json"))
    lock_before = path.with_suffix(".lock").read_text()
    with pytest.raises(FrozenMismatch) as exc:
        run(path, store_dir, frozen=True)
    assert "merged" in str(exc.value) and "would change" in str(exc.value)
    assert sorted((store_dir / "actions").rglob("*.json")) == actions_before
    assert path.with_suffix(".lock").read_text() == lock_before


def test_frozen_rerun_in_a_fresh_cache_verifies_digests(tmp_path, tiny_models, store_dir):
    path = pipeline(tmp_path, tiny_models)
    run(path, store_dir)
    _, status = run(path, tmp_path / "fresh-cache", frozen=True)
    assert set(status.values()) == {"executed"}


def test_corrupted_entry_is_detected_discarded_and_recomputed(tmp_path, tiny_models, store_dir):
    path = pipeline(tmp_path, tiny_models)
    run(path, store_dir)
    digest = lock_of(path)["merged"]["digest"]
    obj = store_dir / "objects" / digest[:2] / digest
    tensor_file = obj / "model.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the last tensor
    tensor_file.write_bytes(bytes(data))
    outcome, status = run(path, store_dir)
    assert status["merged"] == "executed"
    assert any("corrupted" in m for m in outcome.logs)
    assert lock_of(path)["merged"]["digest"] == digest  # recomputed to the same content
    from weightflow.dsl.format.checkpoint import digest_directory

    assert digest_directory(obj) == digest


def test_source_files_are_hashed_once_then_memoised(tmp_path, tiny_models, store_dir, monkeypatch):
    from weightflow.dsl.engine.planner import plan
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store import content as store_mod
    from weightflow.dsl.store.content import Store

    calls = []
    real = store_mod.hash_file
    monkeypatch.setattr(store_mod, "hash_file", lambda p: calls.append(Path(p).name) or real(p))
    path = pipeline(tmp_path, tiny_models)
    plan(load_pipeline(path), Store(store_dir))
    assert "model.safetensors" in calls
    calls.clear()
    plan(load_pipeline(path), Store(store_dir))
    assert calls == []
    # touching a file (new mtime) makes it re-hashed, content digest unchanged
    f = tiny_models["ft_a"] / "model.safetensors"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    plan(load_pipeline(path), Store(store_dir))
    assert calls == ["model.safetensors"]


def test_failure_publishes_nothing_half_written(tmp_path, store_dir):
    from weightflow.dsl.format.checkpoint import TensorInfo
    from weightflow.dsl.lang import registry
    from weightflow.dsl.lang.diagnostics import StepFailed
    from weightflow.dsl.lang.spec import Kind, OpParams, OpSpec

    def boom(inputs, params, ctx):
        w = ctx.tensor_writer([TensorInfo("a", "F32", (4,)), TensorInfo("b", "F32", (4,))])
        w.write("a", bytes(16))
        raise RuntimeError("disk on fire")

    registry.register(OpSpec(name="boom", version=1, output=Kind.MODEL, params=OpParams, run=boom, doc="x"))
    try:
        path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  b: {op: boom}\n")
        with pytest.raises(StepFailed) as exc:
            run(path, store_dir)
        assert "disk on fire" in str(exc.value) and "step 'b'" in str(exc.value)
        assert not list((store_dir / "objects").rglob("*")) if (store_dir / "objects").exists() else True
        assert not (store_dir / "actions").exists() or not list((store_dir / "actions").rglob("*.json"))
        assert not list((store_dir / "tmp").iterdir())
        assert not path.with_suffix(".lock").exists()
    finally:
        registry.unregister("boom")


def test_gc_keeps_what_locks_reference(tmp_path, tiny_models, store_dir, capsys):
    from weightflow.dsl.cli import main

    path = pipeline(tmp_path, tiny_models, wa="0.1")
    run(path, store_dir)
    path = pipeline(tmp_path, tiny_models, wa="0.2")
    run(path, store_dir)  # the first merge is now referenced by no lock
    assert len(list((store_dir / "actions").rglob("*.json"))) == 7
    assert main(["gc", str(path), "--cache-dir", str(store_dir), "--dry-run", "--json", "--older-than", "0"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["actions"] == 1 and dry["objects"] == 1
    assert len(list((store_dir / "actions").rglob("*.json"))) == 7
    assert main(["gc", str(path), "--cache-dir", str(store_dir), "--json", "--older-than", "0"]) == 0
    assert len(list((store_dir / "actions").rglob("*.json"))) == 6
    _, status = run(path, store_dir)
    assert set(status.values()) == {"cached"}
