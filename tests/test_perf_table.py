"""The README's performance table is generated from bench-results/*.json and matches it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

import perf_table  # noqa: E402


def test_the_readme_table_is_the_one_the_committed_results_give():
    res = subprocess.run([sys.executable, str(ROOT / "tests/benchmarks/perf_table.py"), "--check",
                          str(ROOT / "README.md")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _train_doc() -> dict:
    def variant(wall, loop, rss, acc):
        return {"wall_s": wall, "loop_s": loop, "peak_rss_mb": rss, "heldout_accuracy": acc}

    r = {"trainer": variant(30.0, 20.0, 1000, 0.8), "weightflow": variant(33.0, 22.0, 1000, 0.8),
         "weightflow-fast": variant(21.0, 12.0, 990, 0.82), "trainer-bf16": variant(20.0, 10.0, 1000, 0.79),
         "weightflow-fast-bf16": variant(15.0, 6.0, 980, 0.81)}
    pairs = [("weightflow", "trainer"), ("weightflow-fast", "trainer"), ("weightflow-fast-bf16", "trainer-bf16"),
             ("weightflow-fast-bf16", "trainer")]
    for v, ref in pairs:
        r[f"{v}/{ref}"] = {k: round(r[v][k] / r[ref][k], 2) for k in ("wall_s", "loop_s", "peak_rss_mb")}
    strict = {k: v for k, v in r.items() if "bf16" not in k}  # the bf16 pair runs in platform mode only
    return {"created": "2026-12-02T06:00:00Z", "machine": {"load_average_at_start": [0.4, 0.5, 0.6]},
            "results": {"minilm platform": r, "minilm strict": strict}}


def test_rows_carry_the_results_figures(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(_train_doc()))
    text = perf_table.table(tmp_path)
    assert "**1.10×** (loop 1.10×)" in text  # defaults: 33 / 30
    assert "**0.70×** (loop 0.60×)" in text  # opt-in settings: 21 / 30, 12 / 20
    assert "held-out accuracy 0.82 vs 0.8" in text
    # bf16 against Trainer's bf16 (15 / 20, 6 / 10), and against Trainer's float32 defaults (15 / 30)
    assert "HF Trainer `bf16=True` 20.0 s (loop 10.0 s) | **0.75×** (loop 0.60×)" in text
    assert "against Trainer's float32 defaults 0.50×" in text
    assert text.count("`bf16: true` |") == 1  # platform only: no strict bf16 row
    assert text.count("| minilm") == 0 and text.count("fine-tune MiniLM") == 5  # 3 platform + 2 strict rows
    assert "load average 0.4–0.4" in text
    # the benchmarks that were not run say so instead of showing a number
    assert text.count("not measured") == 4  # wanda, eval (two rows), merge


def test_write_replaces_only_the_marked_block_and_check_sees_a_stale_one(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(_train_doc()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{perf_table.BEGIN}\nold table\n{perf_table.END}\nafter\n")
    assert perf_table.main(["--results", str(tmp_path), "--check", str(readme)]) == 1
    assert perf_table.main(["--results", str(tmp_path), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{perf_table.END}\nafter\n")
    assert "old table" not in text and "**0.70×**" in text
    assert perf_table.main(["--results", str(tmp_path), "--check", str(readme)]) == 0


def test_a_readme_without_markers_is_a_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n")
    with pytest.raises(SystemExit, match="markers"):
        perf_table.main(["--results", str(tmp_path), "--write", str(readme)])
