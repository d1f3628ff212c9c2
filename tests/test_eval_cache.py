"""evaluate caches one score per (model digest, metric recipe) in the store (``scores/``):
a rerun scores only the pairs whose model or metric changed, the report's bytes are those
of a cold run, a corrupt or foreign-platform score is recomputed, and ``gc`` / ``verify``
cover the entries."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import run, write_pipeline

from weightflow.dsl.store.content import Store, parse_score
from weightflow.dsl.store.verify import verify_store
from weightflow.ops.metrics import METRICS

PIPELINE = """
weightflow: 1
steps:
  base: {{op: load, source: {base}}}
  a: {{op: prune-wanda, model: base, method: magnitude, sparsity: {sparsity_a}}}
  b: {{op: prune-wanda, model: base, method: magnitude, sparsity: 0.5}}
  c: {{op: load, source: {ft}}}
  scores:
    op: evaluate
    models: [a, b, c]
    metrics:
      - loss: {{data: data.jsonl, batch_size: 2{loss_extra}}}
      - sparsity: {{{sparsity_extra}}}
"""


@pytest.fixture
def computed(monkeypatch) -> list[tuple[str, str]]:
    """Every (model digest, metric name) that a metric's ``compute`` actually ran for."""
    calls: list[tuple[str, str]] = []
    for name in ("loss", "sparsity"):
        metric = METRICS[name]

        def counting(subject, m, ctx, _compute=metric.compute, _name=name):
            calls.append((subject.art.digest, _name))
            return _compute(subject, m, ctx)

        monkeypatch.setitem(METRICS, name, dataclasses.replace(metric, compute=counting))
    return calls


@pytest.fixture
def workdir(tmp_path, tiny_models) -> Path:
    g = torch.Generator().manual_seed(7)
    rows = [{"input_ids": torch.randint(3, 256, (n,), generator=g).tolist()} for n in (9, 14, 6, 11)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def pipeline(workdir: Path, tiny_models, sparsity_a: float = 0.25, loss_extra: str = "",
             sparsity_extra: str = "") -> Path:
    text = PIPELINE.format(base=tiny_models["base"], ft=tiny_models["ft_a"], sparsity_a=sparsity_a,
                           loss_extra=loss_extra, sparsity_extra=sparsity_extra)
    return write_pipeline(workdir, text)


def report_bytes(store_dir: Path, outcome) -> tuple[str, bytes]:
    digest = next(s.digest for s in outcome.steps if s.name == "scores")
    return digest, (store_dir / "objects" / digest[:2] / digest / "report.json").read_bytes()


def digest_of(outcome, step: str) -> str:
    return next(s.digest for s in outcome.steps if s.name == step)


def scoring_line(outcome) -> str:
    return next(line for line in outcome.logs if "(model, metric) pairs" in line)


def test_only_the_changed_models_scores_are_computed_and_the_report_is_a_cold_runs(
        workdir, tiny_models, store_dir, computed, tmp_path_factory):
    path = pipeline(workdir, tiny_models)
    outcome, status = run(path, store_dir)
    assert status["scores"] == "executed"
    assert len(computed) == 6 and len(set(computed)) == 6
    assert scoring_line(outcome) == "scores: scoring 6 of 6 (model, metric) pairs; 0 cached"
    assert len(list(Store(store_dir).scores())) == 6

    computed.clear()
    path = pipeline(workdir, tiny_models, sparsity_a=0.3)  # one upstream model's recipe changes
    outcome, status = run(path, store_dir)
    assert status["scores"] == "executed" and status["a"] == "executed" and status["b"] == "cached"
    new_a = digest_of(outcome, "a")
    assert sorted(computed) == [(new_a, "loss"), (new_a, "sparsity")]
    assert scoring_line(outcome) == "scores: scoring 2 of 6 (model, metric) pairs; 4 cached"
    entry = Store(store_dir).lookup(next(s.key for s in outcome.steps if s.name == "scores"))
    assert entry.manifest["info"]["scores"] == {"computed": 2, "cached": 4}

    cold_dir = tmp_path_factory.mktemp("cold") / "cache"
    cold, _ = run(path, cold_dir)
    assert report_bytes(cold_dir, cold) == report_bytes(store_dir, outcome)


def test_a_changed_metric_parameter_recomputes_only_that_metric(workdir, tiny_models, store_dir, computed,
                                                                tmp_path_factory):
    run(pipeline(workdir, tiny_models), store_dir)
    computed.clear()
    path = pipeline(workdir, tiny_models, loss_extra=", limit: 3")
    outcome, status = run(path, store_dir)
    assert status["scores"] == "executed"
    assert sorted(name for _, name in computed) == ["loss"] * 3
    assert scoring_line(outcome) == "scores: scoring 3 of 6 (model, metric) pairs; 3 cached"

    computed.clear()  # a label is not part of the score: the report changes, nothing is scored
    outcome, status = run(pipeline(workdir, tiny_models, loss_extra=", limit: 3", sparsity_extra="label: zeros"),
                          store_dir)
    assert status["scores"] == "executed" and computed == []
    rep = json.loads(report_bytes(store_dir, outcome)[1])
    assert [m["label"] for m in rep["metrics"]] == ["loss", "zeros"]

    cold_dir = tmp_path_factory.mktemp("cold") / "cache"
    cold, _ = run(path, cold_dir)
    limited, _ = run(path, store_dir)
    assert report_bytes(cold_dir, cold) == report_bytes(store_dir, limited)


def test_a_changed_data_file_rescores_only_the_metric_that_reads_it(workdir, tiny_models, store_dir, computed):
    path = pipeline(workdir, tiny_models)
    run(path, store_dir)
    computed.clear()
    data = workdir / "data.jsonl"
    data.write_text(data.read_text().splitlines()[0] + "\n")
    run(path, store_dir)
    assert sorted(name for _, name in computed) == ["loss"] * 3


def _score_files(store_dir: Path) -> dict[str, Path]:
    return dict(Store(store_dir).scores())


def _relabel(workdir, tiny_models, label: str) -> Path:
    """The same scores under another label: the evaluate step reruns, every score can be reused."""
    return pipeline(workdir, tiny_models, sparsity_extra=f"label: {label}")


def test_a_corrupt_score_entry_is_discarded_and_recomputed(workdir, tiny_models, store_dir, computed):
    outcome, _ = run(pipeline(workdir, tiny_models), store_dir)
    _, good = report_bytes(store_dir, outcome)
    files = _score_files(store_dir)
    keys = sorted(files)
    # one garbled, one whose value was edited (still valid JSON, but not what was written)
    files[keys[0]].write_bytes(files[keys[0]].read_bytes()[:40])
    doc = json.loads(files[keys[1]].read_text())
    first = next(iter(doc["score"]["values"]))
    doc["score"]["values"][first] = 12345.0
    files[keys[1]].write_text(json.dumps(doc))

    computed.clear()
    outcome, status = run(_relabel(workdir, tiny_models, "again"), store_dir)
    assert status["scores"] == "executed"
    assert len(computed) == 2
    assert sum("score entry" in line and "is corrupted" in line for line in outcome.logs) == 2
    assert "12345" not in report_bytes(store_dir, outcome)[1].decode()
    for key in keys[:2]:  # rewritten sound
        assert parse_score(key, Store(store_dir).score_path(key).read_bytes())[1] is None
    # the relabelled report differs from the first only in its label
    rep = json.loads(report_bytes(store_dir, outcome)[1])
    first_rep = json.loads(good)
    assert rep["results"] == first_rep["results"]


def test_verify_reports_and_repairs_a_corrupt_score(workdir, tiny_models, store_dir):
    run(pipeline(workdir, tiny_models), store_dir)
    store = Store(store_dir)
    doc = verify_store(store)
    assert doc["ok"] and doc["scores"] == 6
    (key, path), (edited_key, edited) = list(store.scores())[:2]
    path.write_text("{not json")
    doc = json.loads(edited.read_text())
    doc["score"]["values"]["sparsity"] = 0.75
    edited.write_text(json.dumps(doc))
    doc = verify_store(store)
    assert not doc["ok"]
    garbled, changed = sorted(doc["problems"], key=lambda p: p["key"] != key)
    assert garbled["problem"] == changed["problem"] == "corrupt-score"
    assert garbled["key"] == key and garbled["step"] is None and "not valid JSON" in garbled["message"]
    assert changed["key"] == edited_key and changed["step"] == "scores" and "checksum" in changed["message"]
    assert not garbled["repaired"] and path.exists()  # without --repair nothing is touched
    doc = verify_store(store, repair=True)
    assert doc["ok"] and all(p["repaired"] for p in doc["problems"])
    assert not path.exists() and not edited.exists()
    assert verify_store(store)["scores"] == 4
    assert verify_store(store, scope={})["scores"] == 0  # lock files name reports, not scores


def test_a_score_is_reused_only_from_cpu_strict_or_the_same_platform(workdir, tiny_models, store_dir, computed):
    run(pipeline(workdir, tiny_models), store_dir)
    store = Store(store_dir)
    loss_scores = {key: parse_score(key, p.read_bytes())[0] for key, p in store.scores()}
    loss_scores = {k: s for k, s in loss_scores.items() if s["metric"] == "loss"}
    here = next(iter(loss_scores.values()))["platform"]
    assert here != "cpu-strict"  # the tests run in the default (platform) mode
    strict_key, foreign_key, _ = sorted(loss_scores)
    for key, platform in ((strict_key, "cpu-strict"), (foreign_key, "cpu other 64 threads torch 0.0")):
        score = dict(loss_scores[key])
        score["platform"] = platform
        score["values"] = {**score["values"], "loss": 99.0}  # marks a reused score in the report
        store.write_score(key, score)

    computed.clear()
    outcome, _ = run(_relabel(workdir, tiny_models, "again"), store_dir)
    foreign_model = loss_scores[foreign_key]["model"]
    assert computed == [(foreign_model, "loss")]
    rep = json.loads(report_bytes(store_dir, outcome)[1])
    losses = {m["digest"]: row[0]["values"]["loss"] for m, row in zip(rep["models"], rep["results"], strict=True)}
    assert losses[loss_scores[strict_key]["model"]] == 99.0  # the strict score holds here: reused
    assert losses[foreign_model] == loss_scores[foreign_key]["values"]["loss"]  # recomputed
    rewritten = parse_score(foreign_key, store.score_path(foreign_key).read_bytes())[0]
    assert rewritten["platform"] == here


def test_a_forced_step_recomputes_every_score(workdir, tiny_models, store_dir, computed):
    path = pipeline(workdir, tiny_models)
    run(path, store_dir)
    computed.clear()
    outcome, status = run(path, store_dir, force=["scores"])
    assert status["scores"] == "executed" and len(computed) == 6


def test_gc_removes_score_entries_unused_for_the_age(workdir, tiny_models, store_dir):
    run(pipeline(workdir, tiny_models), store_dir)
    store = Store(store_dir)
    files = _score_files(store_dir)
    old = time.time() - 30 * 86400
    stale = sorted(files)[:4]
    for key in stale:
        os.utime(files[key], (old, old))
    # a hit is a use: it refreshes the entry's age
    assert store.read_score(stale[0]) is not None
    dry = store.collect(older_than_days=14, dry_run=True)
    assert dry["scores"] == 3 and dry["kept_scores"] == 3 and dry["score_bytes"] > 0
    assert all(p.exists() for p in files.values())
    doc = store.collect(older_than_days=14)
    assert doc["scores"] == 3
    assert sorted(_score_files(store_dir)) == sorted(set(files) - set(stale[1:]))


def test_read_score_refuses_what_is_not_a_sound_entry(tmp_path):
    store = Store(tmp_path / "cache")
    key = "ab" * 32
    assert store.read_score(key) is None  # missing: silently absent
    store.write_score(key, {"values": {"x": float("nan"), "y": 1.5}, "details": {}, "platform": "cpu-strict"})
    score = store.read_score(key)
    assert score["values"]["y"] == 1.5 and score["values"]["x"] != score["values"]["x"]  # NaN kept as NaN
    assert list(score["values"]) == ["x", "y"]  # key order kept: it orders a metric's own columns
    other = "cd" * 32
    store.score_path(other).parent.mkdir(parents=True, exist_ok=True)
    store.score_path(other).write_bytes(store.score_path(key).read_bytes())  # copied from another key
    warned: list[str] = []
    assert store.read_score(other, warn=warned.append) is None
    assert "copied from another entry" in warned[0] and not store.score_path(other).exists()
    with pytest.raises(ValueError):
        store.write_score("../x", {})
