"""Composite models (issue 16): compose's contrast / ensemble / guarded rules against the rule
computed by hand from the component models, scoring by evaluate, generation, export and
``weightflow.load_model``, and the errors (weights-reading metrics, bad composite.json, type
mismatches)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run, save_tiny_llama, write_pipeline
from test_metrics_registry import LLAMA, WORDS, lines, report_of, word_tokenizer, write_lines

import weightflow


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    import transformers

    root = tmp_path_factory.mktemp("composite")
    out = {}
    for name, seed in (("target", 31), ("assistant", 32), ("third", 33)):
        out[name] = save_tiny_llama(root / name, seed=seed, config=LLAMA)
        word_tokenizer(out[name], "llama")
    torch.manual_seed(4)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=len(WORDS) + 4, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(root / "clf")
    word_tokenizer(root / "clf", "bert")
    out["clf"] = root / "clf"
    return out


def build(tmp_path, store_dir, parts, steps: str, outputs: str = "") -> tuple:
    text = f"""
weightflow: 1
steps:
  target: {{op: load, source: {parts['target']}}}
  assistant: {{op: load, source: {parts['assistant']}}}
  third: {{op: load, source: {parts['third']}}}
  clf: {{op: load, source: {parts['clf']}}}
{steps}
{outputs}
"""
    outcome, _ = run(write_pipeline(tmp_path, text), store_dir)
    return outcome


def obj(store_dir: Path, outcome, step: str) -> Path:
    digest = next(s.digest for s in outcome.steps if s.name == step)
    return store_dir / "objects" / digest[:2] / digest


def hand_lp(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(input_ids=ids).logits.float(), dim=-1)


IDS = torch.tensor([[2, 5, 9, 14, 7, 20, 11], [2, 30, 8, 8, 17, 4, 6]])


def test_contrast_equals_the_rule_by_hand(tmp_path, store_dir, parts):
    outcome = build(tmp_path, store_dir, parts, """
  plain: {op: compose, rule: contrast, target: target, assistant: assistant, alpha: 0.8}
  filtered: {op: compose, rule: contrast, target: target, assistant: assistant, alpha: 0.8, top_logit_filter: 0.9}
  none: {op: compose, rule: contrast, target: target, assistant: assistant, alpha: 0.0}
""")
    lp_t, lp_a = hand_lp(parts["target"], IDS), hand_lp(parts["assistant"], IDS)
    with torch.no_grad():
        plain = weightflow.load_model(obj(store_dir, outcome, "plain"))(input_ids=IDS).logits
        filt = weightflow.load_model(obj(store_dir, outcome, "filtered"))(input_ids=IDS).logits
        none = weightflow.load_model(obj(store_dir, outcome, "none"))(input_ids=IDS).logits
    torch.testing.assert_close(plain, torch.log_softmax(lp_t - 0.8 * lp_a, -1))
    keep = lp_t >= lp_t.max(-1, keepdim=True).values + math.log(0.9)
    assert 0 < keep.float().mean() < 1  # the filter does something here
    torch.testing.assert_close(filt, torch.log_softmax(torch.where(keep, lp_t - 0.8 * lp_a, lp_t), -1))
    torch.testing.assert_close(none, lp_t)  # alpha 0: the target itself
    spec = json.loads((obj(store_dir, outcome, "plain") / "composite.json").read_text())
    assert spec["rule"] == "contrast" and spec["params"] == {"alpha": 0.8, "top_logit_filter": 0.0}
    assert (obj(store_dir, outcome, "plain") / "assistant" / "model.safetensors").is_file()


def test_ensemble_averages_the_members(tmp_path, store_dir, parts):
    outcome = build(tmp_path, store_dir, parts, """
  probs: {op: compose, rule: ensemble, members: [target, assistant, third]}
  logps: {op: compose, rule: ensemble, members: [target, assistant, third], aggregate: mean_logprobs}
""")
    lps = torch.stack([hand_lp(parts[n], IDS) for n in ("target", "assistant", "third")])
    with torch.no_grad():
        probs = weightflow.load_model(obj(store_dir, outcome, "probs"))(input_ids=IDS).logits
        logps = weightflow.load_model(obj(store_dir, outcome, "logps"))(input_ids=IDS).logits
    torch.testing.assert_close(probs, torch.log(lps.exp().mean(0)))
    torch.testing.assert_close(logps, torch.log_softmax(lps.mean(0), -1))


def test_guarded_corrupts_flagged_inputs_only(tmp_path, store_dir, parts):
    import transformers

    outcome = build(tmp_path, store_dir, parts, """
  never: {op: compose, rule: guarded, target: target, classifier: clf, threshold: 1.0}
  always: {op: compose, rule: guarded, target: target, classifier: clf, threshold: 0.0001, strength: 2.0, seed: 5}
""")
    lp_t = hand_lp(parts["target"], IDS)
    with torch.no_grad():
        never = weightflow.load_model(obj(store_dir, outcome, "never"))
        always = weightflow.load_model(obj(store_dir, outcome, "always"))
        out_never, out_always = never(input_ids=IDS).logits, always(input_ids=IDS).logits
        assert not never.last_flagged.any() and always.last_flagged.all()
        torch.testing.assert_close(out_never, lp_t)
        assert (out_always - lp_t).abs().max() > 1e-3
        # by hand: the same noise (seeded by the rule's seed and the prompt tokens) on the embeddings
        target = transformers.AutoModelForCausalLM.from_pretrained(parts["target"], dtype=torch.float32).eval()
        import hashlib

        emb = target.get_input_embeddings()
        want = []
        for row in IDS:
            h = hashlib.sha256(f"5:{row.tolist()}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))
            noise = torch.randn((IDS.shape[1], emb.weight.shape[1]), generator=g)
            e = emb(row[None]) + 2.0 * float(emb.weight.std()) * noise
            want.append(torch.log_softmax(target(inputs_embeds=e).logits.float(), -1)[0])
        torch.testing.assert_close(out_always, torch.stack(want))


def test_evaluate_scores_a_composite_and_generation_is_greedy(tmp_path, store_dir, parts):
    write_lines(tmp_path / "text.txt", lines(5, 1))
    write_lines(tmp_path / "prompts.txt", lines(3, 2))
    outcome = build(tmp_path, store_dir, parts, """
  same: {op: compose, rule: contrast, target: target, assistant: assistant, alpha: 0.0}
  scores:
    op: evaluate
    models: [target, same]
    metrics: [{perplexity: {data: text.txt}}, {refusal: {prompts: prompts.txt, max_new_tokens: 5, markers: [the]}}]
""")
    rep = report_of(store_dir, outcome)
    t, c = rep["results"][0], rep["results"][1]
    assert c[0]["values"]["token_perplexity"] == pytest.approx(t[0]["values"]["token_perplexity"], rel=1e-5)
    # greedy generation through the composite gives the target's own answers (alpha 0)
    assert [a["answer"] for a in c[1]["details"]["answers"]] == [a["answer"] for a in t[1]["details"]["answers"]]


def test_export_and_load_model_reload_it(tmp_path, store_dir, parts):
    outcome = build(tmp_path, store_dir, parts, """
  uld: {op: compose, rule: contrast, target: target, assistant: assistant, alpha: 0.5, top_logit_filter: 0.01}
""", "outputs: {uld: out/uld}")
    exported = tmp_path / "out" / "uld"
    assert (exported / "composite.json").is_file() and (exported / "target" / "config.json").is_file()
    with torch.no_grad():
        a = weightflow.load_model(exported)(input_ids=IDS).logits
        b = weightflow.load_model(obj(store_dir, outcome, "uld"))(input_ids=IDS).logits
    assert torch.equal(a, b)
    assert weightflow.load_tokenizer(exported)("cat dog")["input_ids"][0] == 2


def test_a_bad_composite_json_is_a_clear_error(tmp_path, parts):
    from weightflow.dsl.lang.diagnostics import OpError

    d = tmp_path / "c"
    d.mkdir()
    shutil.copytree(parts["target"], d / "target")
    shutil.copytree(parts["assistant"], d / "assistant")
    spec = {"format": "weightflow-composite", "version": 1, "rule": "contrast", "params": {},
            "components": {"target": "target", "assistant": "assistant"}, "primary": "target"}
    for change, message in (({"rule": "exec"}, "unknown rule"), ({"components": {"target": "../x", "assistant":
                            "assistant"}}, "not a subdirectory"), ({"version": 9}, "composite version"),
                            ({"primary": "nobody"}, "'primary'")):
        (d / "composite.json").write_text(json.dumps({**spec, **change}))
        with pytest.raises(OpError, match=message):
            weightflow.load_model(d)


def test_weight_metrics_refuse_a_composite_and_merges_refuse_it_at_parse_time(tmp_path, store_dir, parts):
    write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  target: {{op: load, source: {parts['target']}}}
  assistant: {{op: load, source: {parts['assistant']}}}
  c: {{op: compose, rule: contrast, target: target, assistant: assistant}}
  m: {{op: merge, method: linear, models: [target, c]}}
""", name="bad.yaml")
    res = subprocess.run([sys.executable, "-m", "weightflow", "validate", str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "expects a Model" in res.stderr and "produces a Composite" in res.stderr
    with pytest.raises(Exception, match="reads a model's weights"):
        build(tmp_path, store_dir, parts, """
  c: {op: compose, rule: contrast, target: target, assistant: assistant}
  s: {op: evaluate, models: c, metrics: [{sparsity: {}}]}
""")
