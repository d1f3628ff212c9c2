"""The wide report table: models as rows (step, op, differing parameters, run time) x metric
values as columns, with directions, baselines, chance level, what is charted, and sweep
families (``base@k=v``) as pivot tables; on report data directly and through
``weightflow report`` on a tiny pipeline."""

from __future__ import annotations

import io
import json
import random
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from conftest import run, write_pipeline

from weightflow.dsl.present import table
from weightflow.dsl.present.table import build, parse_member

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}


def demo_pipeline(root: Path) -> Path:
    """Two random tiny classifiers (four labels, one job of two), a delta, two merges at
    different weights, a pruned merge, and an evaluate over all five: accuracy among the
    job's two labels and among all four, the delta norm and the sparsity."""
    rnd = random.Random(3)
    rows = [{"input_ids": [rnd.randint(1, 99) for _ in range(rnd.randint(3, 12))], "label": ["neg", "pos"][i % 2]}
            for i in range(24)]
    (root / "job.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    load = f"op: load, config: {json.dumps(BERT)}, task: sequence-classification, labels: [neg, pos, atheism, space]"
    return write_pipeline(root, f"""
weightflow: 1
name: report-demo
description: two tiny classifiers, merged at two weights, pruned, scored
steps:
  base: {{{load}, init_seed: 1}}
  ft: {{{load}, init_seed: 2}}
  d: {{op: extract-delta, model: ft, base: base}}
  half: {{op: merge, method: task-arithmetic, base: base, deltas: [d], weights: [0.5]}}
  full: {{op: merge, method: task-arithmetic, base: base, deltas: [d], weights: [0.9]}}
  pruned: {{op: prune-wanda, model: full, method: magnitude, sparsity: 0.5}}
  scores:
    op: evaluate
    models: [base, ft, half, full, pruned]
    metrics:
      - accuracy: {{data: job.jsonl, labels: [neg, pos], label: job}}
      - accuracy: {{data: job.jsonl, label: all4}}
      - delta_norm: {{base: base}}
      - sparsity
""")


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_table")
    path = demo_pipeline(root)
    outcome, status = run(path, root / "cache")
    assert set(status.values()) == {"executed"}
    return path, root / "cache", outcome


def cli(*args) -> tuple[int, str, str]:
    from weightflow.dsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


# -- report data, by hand ---------------------------------------------------------------------

def col(name, better=None, chart=True):
    return {"name": name, "better": better, "chart": chart}


def doc_of(names, metrics, values, ops=None, params=None, seconds=None, num_labels=None):
    """A collected report as ``report.collect`` returns it; ``values[i][j]``: model i, metric j."""
    models = [{"step": n, "key": f"{i:064x}", "digest": f"{i + 100:064x}", "op": (ops or {}).get(n, "merge"),
               "params": (params or {}).get(n, {}), "seconds": (seconds or {}).get(n),
               "num_labels": num_labels} for i, n in enumerate(names)]
    report = {"format": 1, "models": [{"digest": m["digest"]} for m in models], "metrics": metrics,
              "results": [[{"values": v} for v in row] for row in values]}
    return {"step": "scores", "op": "evaluate", "status": "cached", "key": "a" * 64, "digest": "b" * 64,
            "reason": "", "report": report, "models": models, "seconds": 2.5}


def test_member_names_parse_into_family_and_typed_values():
    assert parse_member("merged@lambda=0.5,density=0.2") == ("merged", {"lambda": 0.5, "density": 0.2})
    assert parse_member("m@k=3,method=ties,lr=1e-4") == ("m", {"k": 3, "method": "ties", "lr": 1e-4})
    assert isinstance(parse_member("m@k=3")[1]["k"], int)
    assert parse_member("m@x=nan") == ("m", {"x": "nan"})  # not a number a chart could place
    for not_member in ("merged", "merged@*", "@k=1", "m@", "m@k", "m@k=1,k=2"):
        assert parse_member(not_member) is None, not_member


def test_wide_table_rows_columns_directions_baselines_chance_and_charting():
    metrics = [{"label": "job", "metric": "accuracy", "params": {"labels": ["neg", "pos"]},
                "columns": [col("acc", "higher"), col("n", chart=False)]},
               {"label": "all", "metric": "accuracy", "params": {}, "columns": [col("acc", "higher")]},
               {"label": "sparsity", "metric": "sparsity", "params": {},
                "columns": [col("sparsity"), col("sparsity_all"), col("zeros", chart=False)]},
               {"label": "ppl", "metric": "perplexity", "params": {}, "columns": [{"name": "token_perplexity"}]}]
    names = ["base", "ta", "ties"]
    values = [[{"acc": 0.5, "n": 50}, {"acc": 0.25}, {"sparsity": 0.0, "sparsity_all": 0.0, "zeros": 0},
               {"token_perplexity": 30.0}],
              [{"acc": 0.75, "n": 50}, {"acc": 0.5}, {"sparsity": 0.0, "sparsity_all": 1.7e-05, "zeros": 0},
               {"token_perplexity": 20.0}],
              [{"acc": 0.70, "n": 50}, {"acc": 0.6}, {"sparsity": 0.0, "sparsity_all": 0.0, "zeros": 0},
               {"token_perplexity": 25.0}]]
    ops = {"base": "load"}
    params = {"ta": {"method": "task-arithmetic", "weights": [0.5], "seed": 0},
              "ties": {"method": "ties", "weights": [0.5], "seed": 0, "density": 0.2}}
    t = build(doc_of(names, metrics, values, ops, params, {"base": 1.25, "ta": 0.5, "ties": 75.0}, num_labels=4))
    # counts stay out of the wide table; every score is a column, with its direction
    assert [c.header for c in t.columns] == ["job: acc ↑", "all: acc ↑", "sparsity", "sparsity_all",
                                             "ppl: token_perplexity ↓"]  # ↓ from the metric's declaration
    # parameters that two rows have and that differ; equal ones (weights, seed) and one-row ones left out
    assert t.param_names == ["method"]
    assert [r.baseline for r in t.rows] == [True, False, False]
    # chance: the job's 2 labels; without `labels`, the models' 4
    assert t.chance_row == [0.5, 0.25, None, None, None]
    charted = {c.name if c.label != "all" else "all": (c.charted, c.why_not_charted) for c in t.columns}
    assert charted["sparsity"] == (False, "0 for every model")
    assert charted["sparsity_all"][0] is False and "negligible" in charted["sparsity_all"][1]
    assert charted["acc"] == (True, "") and charted["token_perplexity"] == (True, "")
    assert t.best(0) == 1 and t.best(1) == 2 and t.best(4) == 1 and t.best(2) is None

    text = table.text(t)
    lines = text.splitlines()
    header = lines[0].split()
    assert header[:3] == ["step", "op", "method"] and header[-1] == "time"
    base_line = next(ln for ln in lines if ln.strip().startswith("base"))
    assert "load (baseline)" in base_line and "1.25 s" in base_line
    ta_line = next(ln for ln in lines if ln.strip().startswith("ta "))
    assert "0.7500 *" in ta_line and "task-arithmetic" in ta_line and "20.000 *" in ta_line
    assert "75 s" in next(ln for ln in lines if ln.strip().startswith("ties"))
    chance_line = next(ln for ln in lines if ln.strip().startswith("chance"))
    assert chance_line.split()[-2:] == ["0.5000", "0.2500"]
    assert "Not charted: sparsity (0 for every model); sparsity_all (spread 1.700e-05: negligible)." in text

    md = "\n".join(table.markdown(t))
    assert ("| step | op | method | job: acc ↑ | all: acc ↑ | sparsity | sparsity_all | "
            "ppl: token_perplexity ↓ | time |") in md
    assert "| `ta` | merge | task-arithmetic | **0.7500** | 0.5000 | 0 | 1.700e-05 | **20.000** | 0.50 s |" in md
    assert "| _chance_ |" in md and "Bold is the best value" in md


def test_a_one_parameter_family_pivots_and_names_its_best_member():
    names = ["base"] + [f"ta@lambda={x}" for x in (0.7, 0.1, 0.4)] + ["lone@k=1"]
    accs = {"base": 0.5, "ta@lambda=0.7": 0.6, "ta@lambda=0.1": 0.55, "ta@lambda=0.4": 0.8, "lone@k=1": 0.9}
    metrics = [{"label": "job", "metric": "accuracy", "params": {}, "columns": [col("acc", "higher")]}]
    t = build(doc_of(names, metrics, [[{"acc": accs[n]}] for n in names], {"base": "load"},
                     {n: {"weights": [1.0]} for n in names[1:]}))
    (fam,) = t.families  # a single member is not a family
    assert fam.name == "ta" and fam.keys == ["lambda"] and fam.axis(t, "lambda") == [0.1, 0.4, 0.7]
    assert t.rows[fam.best(t, 0)].name == "ta@lambda=0.4"
    # the swept value is a parameter column, first
    assert t.param_names[0] == "lambda" and t.rows[1].params["lambda"] == 0.7
    ((caption, header, rows),) = table.family_pivots(t, fam)
    assert caption == "ta@* (3 members)" and header == ["lambda", "job: acc ↑"]
    assert rows == [["0.1", "0.5500"], ["0.4", "0.8000 *"], ["0.7", "0.6000"]]
    assert "best by job: acc: ta@lambda=0.4 (0.8000)" in table.text(t)
    md = "\n".join(table.markdown(t))
    assert "### Sweep `ta@*` (3 members over lambda)" in md and "| 0.4 | **0.8000** |" in md
    assert "Best: by job: acc, `ta@lambda=0.4` (0.8000)." in md


def test_a_two_parameter_family_is_a_grid_per_column_with_the_best_cell_marked():
    grid = {(lam, d): round(1 - abs(lam - 0.5) - abs(d - 0.5) / 2, 4) for lam in (0.3, 0.5, 0.7) for d in (0.2, 0.8)}
    names = [f"m@lambda={lam},density={d}" for lam, d in grid]
    metrics = [{"label": "ppl", "metric": "perplexity", "params": {},
                "columns": [col("token_perplexity", "lower")]},
               {"label": "sparsity", "metric": "sparsity", "params": {}, "columns": [col("sparsity")]}]
    values = [[{"token_perplexity": 10 * (2 - grid[k])}, {"sparsity": 0.1 * i}] for i, k in enumerate(grid)]
    t = build(doc_of(names, metrics, values))
    (fam,) = t.families
    assert fam.keys == ["lambda", "density"]
    pivots = table.family_pivots(t, fam)
    assert [p[0] for p in pivots] == ["m@*: ppl: token_perplexity ↓", "m@*: sparsity"]
    caption, header, rows = pivots[0]
    assert header == ["lambda \\ density", "0.2", "0.8"]
    assert [r[0] for r in rows] == ["0.3", "0.5", "0.7"]
    best = next(i for i, r in enumerate(rows) for c in r[1:] if c.endswith(" *"))
    assert rows[best][0] == "0.5"  # lowest perplexity at lambda 0.5 (either density ties at 0.15 off)
    assert not any(c.endswith(" *") for r in pivots[1][2] for c in r[1:])  # sparsity has no direction


# -- through the command line -----------------------------------------------------------------

def test_report_command_prints_the_wide_table_and_md_prints_markdown(ran, tmp_path):
    path, store, outcome = ran
    rc, out, err = cli("report", path, "--cache-dir", store, "--out", tmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.strip().startswith("step"))
    assert header.split()[:2] == ["step", "op"] and "job: acc ↑" in header and "time" in header
    assert "init_seed" in header and "weights" in header and "method" in header  # the differing params
    assert "delta_norm: l2" in header
    for name in ("base", "ft"):
        assert "load (baseline)" in next(ln for ln in lines if ln.strip().startswith(name + " "))
    rep = json.loads((store / "objects" / outcome.steps[-1].digest[:2] / outcome.steps[-1].digest /
                      "report.json").read_text())
    half = rep["results"][2][0]["values"]["acc"]
    half_line = next(ln for ln in lines if ln.strip().startswith("half"))
    assert table.fmt(half) in half_line and "[0.5]" in half_line and "task-arithmetic" in half_line
    # the chance row: 1/2 among the job's labels, 1/4 among the head's four
    assert next(ln for ln in lines if ln.strip().startswith("chance")).split()[-2:] == ["0.5000", "0.2500"]
    # run times come from the store's manifests
    from weightflow.dsl.store.content import Store

    seconds = Store(store).lookup(next(s.key for s in outcome.steps if s.name == "pruned")).manifest["seconds"]
    assert table.fmt_seconds(seconds) in next(ln for ln in lines if ln.strip().startswith("pruned"))

    rc, md, _ = cli("report", path, "--md", "--cache-dir", store, "--out", tmp_path)
    assert rc == 0 and md == (tmp_path / "pipeline.report.md").read_text()
    assert "| step | op | init_seed | weights | method | job: acc ↑ |" in md
    assert "| `base` | load (baseline) | 1 |" in md and "| _chance_ |" in md
    rc, js, _ = cli("report", path, "--json", "--cache-dir", store, "--out", tmp_path)
    (doc,) = json.loads(js)["reports"]
    assert [m["op"] for m in doc["models"]] == ["load", "load", "merge", "merge", "prune-wanda"]
    assert doc["models"][0]["num_labels"] == 4 and doc["models"][2]["params"]["weights"] == [0.5]
