"""`weightflow show` for people: the training curve as a sparkline and a small table, a
report's metrics as the report's table, a model's sparsity per layer, the rest as short
lines -- never a JSON dump cut mid-object; `--json` unchanged; fast and torch-free."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout

import pytest
from conftest import run, write_pipeline

from weightflow.dsl.present import show

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 32}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    r = random.Random(0)
    rows = [{"input_ids": [r.randrange(0, 16) for _ in range(10)]} for _ in range(32)]
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    path = write_pipeline(root, f"""
weightflow: 1
steps:
  base: {{op: load, config: {json.dumps(LLAMA)}}}
  ft: {{op: finetune, model: base, data: train.jsonl, max_steps: 12, learning_rate: 0.01, batch_size: 8,
        lr_scheduler: constant}}
  pruned: {{op: prune-wanda, model: ft, method: magnitude, sparsity: 0.5}}
  scores: {{op: evaluate, models: [base, pruned], metrics: [sparsity]}}
""")
    outcome, status = run(path, root / "cache")
    assert set(status.values()) == {"executed"}
    return path, root / "cache"


def cli(*args) -> tuple[int, str, str]:
    from weightflow.dsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


# -- the pieces -------------------------------------------------------------------------------

def test_sparkline_follows_the_values_and_resamples_long_curves():
    assert show.sparkline([4.0, 3.0, 2.0, 1.0]) == "█▆▃▁"
    assert show.sparkline([1.0, None, 1.0]) == "▄ ▄"  # flat: the middle; missing: a space
    long = show.sparkline([float(i) for i in range(400)], width=40)
    assert len(long) == 40 and long[0] == "▁" and long[-1] == "█" and list(long) == sorted(long)
    assert show.sparkline([None, None]) == ""


def test_curve_is_a_sparkline_per_loss_and_a_sampled_table():
    curve = [{"step": s, "loss": round(3 / s, 4), "retain_loss": 1.0 + s / 100, "lr": 0.001} for s in range(1, 31)]
    lines = show.curve_lines(curve)
    assert lines[0] == "training curve (30 logged steps, steps 1–30)"
    loss = next(ln for ln in lines if ln.strip().startswith("loss "))
    assert "3.0000 → 0.1000 (min 0.1000)" in loss and "█" in loss and "▁" in loss
    assert any(ln.strip().startswith("retain_loss") for ln in lines)
    table = [ln.split() for ln in lines if ln.startswith("    ")]
    assert table[0] == ["step", "loss", "retain_loss", "lr"]
    steps = [int(r[0]) for r in table[2:]]
    assert steps[0] == 1 and steps[-1] == 30 and len(steps) == show.CURVE_ROWS


def test_info_is_readable_and_says_where_a_long_value_is():
    info = {"summary": {"task": "causal-lm", "steps": 12, "eval_after": {"loss": 1.5, "step": 12}},
            "losses": {"forget": {"before": 1.0, "after": 3.0}, "retain": {"before": 1.0, "after": 1.1}},
            "training_curve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
            "device": "cpu", "blob": {"k" * 20: list(range(60))}}
    text = "\n".join(show.info_lines(info))
    assert ("summary\n  task             causal-lm\n  steps            12\n"
            "  eval_after       loss 1.5000, step 12") in text
    assert "losses\n      data  before   after\n    ------  ------  ------\n    forget  1.0000  3.0000\n" in text
    assert "training curve (2 logged steps" in text and "  device           cpu" in text
    blob = next(ln for ln in text.splitlines() if ln.strip().startswith("blob"))
    assert blob.endswith("… (whole value: --json)") and len(blob) <= 120


def test_layer_sparsity_groups_the_2d_weights_by_block():
    per_tensor = [
        {"name": "model.layers.0.mlp.up_proj.weight", "shape": [4, 8], "density": 0.5},
        {"name": "model.layers.0.self_attn.q_proj.weight", "shape": [8, 8], "density": 1.0},
        {"name": "model.layers.0.input_layernorm.weight", "shape": [8], "density": 1.0},  # 1-D: not pruned
        {"name": "model.layers.10.mlp.up_proj.weight", "shape": [4, 8], "density": 0.25},
        {"name": "model.layers.2.mlp.up_proj.weight", "shape": [4, 8], "density": 1.0},
        {"name": "model.embed_tokens.weight", "shape": [16, 8], "density": 1.0},
        {"name": "model.layers.1.step", "shape": [], "dtype": "I64"},  # no density: not a float
    ]
    layers = show.layer_sparsity(per_tensor)
    assert [r["layer"] for r in layers] == ["0", "2", "10", "other"]
    assert layers[0] == {"layer": "0", "tensors": 2, "parameters": 96, "zeros": 16, "sparsity": 16 / 96}
    assert layers[2]["sparsity"] == 0.75 and layers[3]["sparsity"] == 0.0
    lines = show.sparsity_lines(per_tensor)
    assert lines[0].startswith("sparsity per layer")
    assert next(ln for ln in lines if ln.strip().startswith("10 ")).split()[-2:] == ["75.00%", "█" * 15]
    dense = [dict(r, density=1.0) for r in per_tensor if "density" in r]
    assert show.sparsity_lines(dense) == []


# -- the command ----------------------------------------------------------------------------

def test_show_prints_the_curve_the_layers_and_the_report(ran):
    path, store = ran
    rc, out, err = cli("show", path, "ft", "--cache-dir", store)
    assert rc == 0, err
    assert "training curve (12 logged steps, steps 1–12)" in out
    loss = next(ln for ln in out.splitlines() if ln.strip().startswith("loss "))
    assert any(ch in loss for ch in show.SPARK) and "→" in loss
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("    ") and ln.split()[0].isdigit()]
    assert [int(r[0]) for r in rows][0] == 1 and [int(r[0]) for r in rows][-1] == 12
    assert "info      {" not in out  # no JSON dump
    rc, js, _ = cli("show", path, "ft", "--json", "--cache-dir", store)
    doc = json.loads(js)
    assert set(doc) == {"step", "path", "manifest", "summary", "lineage"}
    curve = doc["manifest"]["info"]["training_curve"]
    assert len(curve) == 12 and f"{curve[0]['loss']:.4f}"[:4] in loss.replace(",", "")

    rc, out, err = cli("show", path, "pruned", "--cache-dir", store)
    assert rc == 0, err
    assert "sparsity per layer" in out
    layer_rows = [ln.split() for ln in out.splitlines() if ln.strip()[:2] in ("0 ", "1 ")]
    assert [r[0] for r in layer_rows] == ["0", "1"] and all(r[3] == "50.00%" for r in layer_rows)

    rc, out, err = cli("show", path, "scores", "--cache-dir", store)
    assert rc == 0, err
    assert out.splitlines()[0].startswith("step      scores (evaluate v")
    header = next(ln for ln in out.splitlines() if ln.startswith("  step "))  # the report's table
    assert header.split()[:2] == ["step", "op"] and "sparsity" in header
    assert "load (baseline)" in out and any(ln.strip().startswith("pruned") and "0.5000" in ln
                                            for ln in out.splitlines())


def test_show_does_not_import_torch(ran):
    """show reads the store and the lock only (speed is measured by benchmarks, not here)."""
    path, store = ran
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        from weightflow.dsl.cli import main
        for step in ("base", "ft", "pruned", "scores"):
            with contextlib.redirect_stdout(io.StringIO()):
                rc = main(["show", {str(path)!r}, step, "--cache-dir", {str(store)!r}])
            assert rc == 0, step
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_show_keeps_the_weights_summary_of_an_object(ran, monkeypatch):
    """Summarising reads every weight; objects never change, so the second show reads the
    summary kept in the store's views/ instead of the weights."""
    from weightflow.dsl.present import tensor_stats

    path, store = ran
    rc, first, _ = cli("show", path, "pruned", "--json", "--cache-dir", store)
    assert rc == 0 and list((store / "views").rglob("*.json"))

    def no_reading(*a, **k):
        raise AssertionError("the weights were read again")

    monkeypatch.setattr(tensor_stats, "summarize", no_reading)
    rc, second, _ = cli("show", path, "pruned", "--json", "--cache-dir", store)
    assert rc == 0 and json.loads(second)["summary"] == json.loads(first)["summary"]


def test_gc_removes_a_view_with_its_object(tmp_path):
    from weightflow.dsl.store.content import Store

    store = Store(tmp_path / "cache")
    alive, gone = "a" * 64, "b" * 64
    store.object_path(alive).mkdir(parents=True)
    for digest in (alive, gone):
        view = store.root / "views" / digest[:2] / f"{digest}.json"
        view.parent.mkdir(parents=True, exist_ok=True)
        view.write_text("{}")
    store.collect(older_than_days=1e6)
    assert [p.stem for p in (store.root / "views").rglob("*.json")] == [alive]
