"""evaluate: each metric against a hand computation; perplexity and multiple choice against
lm-evaluation-harness (where installed); `weightflow report` tables and HTML."""

from __future__ import annotations

import io
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, read_model, run, save_tiny_llama, write_pipeline

TEXT = """Weightflow describes how checkpoints are made from other checkpoints.
A YAML pipeline is parsed into a typed graph, checked, and run with a content-addressed cache.
Pruning removes weights; Wanda scores each weight by its magnitude times the norm of its input.
The quick brown fox jumps over the lazy dog, and the dog sleeps on.   Tabs\tand  spaces count too.
"""


def save_tiny_tokenizer(path: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on TEXT (offline, a second): id 0 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT * 3], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama with a tokenizer, and a magnitude-pruned sibling made by hand."""
    root = tmp_path_factory.mktemp("eval_models")
    cfg = {**TINY_LLAMA, "vocab_size": 300, "bos_token_id": 0, "eos_token_id": 0}
    path = save_tiny_llama(root / "lm", seed=21, config=cfg)
    save_tiny_tokenizer(path)
    return path


def hf(path):
    import transformers

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32)
    return model.eval()


def report_of(store_dir, outcome, step="scores"):
    digest = next(s.digest for s in outcome.steps if s.name == step)
    return json.loads((store_dir / "objects" / digest[:2] / digest / "report.json").read_text())


def values(report, model_index, label):
    j = [m["label"] for m in report["metrics"]].index(label)
    return report["results"][model_index][j]["values"]


# -- perplexity ------------------------------------------------------------------------------

def hand_rolling_loglikelihood(model, tokens, prefix, L):
    """Σ log p over every token, one forward per token, each conditioned on exactly what
    lm-eval's rolling windows give it: windows [0, L), [L, 2L), ...; a token of the first
    window sees the prefix and the tokens before it; a token t of a later window [s, e)
    sees tokens[e - L - 1 : t]."""
    total = 0.0
    for t in range(len(tokens)):
        if t < L:
            context = [prefix] + tokens[:t]
        else:
            s = (t // L) * L
            e = min(s + L, len(tokens))
            context = tokens[e - L - 1:t]
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits[0, -1]
        total += float(torch.log_softmax(logits.double(), -1)[tokens[t]])
    return total


@pytest.mark.parametrize("max_length", [16, 23, 1000])
def test_perplexity_equals_hand_computation(tmp_path, store_dir, lm, max_length):
    from transformers import AutoTokenizer

    (tmp_path / "held.txt").write_text(TEXT)
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lm}}}
  scores:
    op: evaluate
    models: m
    metrics: [{{perplexity: {{data: held.txt, max_length: {max_length}, batch_size: 3}}}}]
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    got = values(rep, 0, "perplexity")
    tok = AutoTokenizer.from_pretrained(lm)
    tokens = tok(TEXT, add_special_tokens=False)["input_ids"]
    ll = hand_rolling_loglikelihood(hf(lm), tokens, 0, max_length)
    words = len(re.split(r"\s+", TEXT))
    assert got["tokens"] == len(tokens) and got["words"] == words and got["bytes"] == len(TEXT.encode())
    assert got["token_perplexity"] == pytest.approx(math.exp(-ll / len(tokens)), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-ll / len(TEXT.encode()) / math.log(2), rel=1e-5)
    windows = math.ceil(len(tokens) / max_length)
    assert rep["results"][0][0]["details"]["windows"] == windows
    assert any("token_perplexity" in line for line in outcome.logs)  # the table is shown


def test_perplexity_on_pretokenized_documents(tmp_path, store_dir):
    """No tokenizer needed: input_ids per line, token perplexity over all documents."""
    model_dir = save_tiny_llama(tmp_path / "m", seed=3)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 7, 25)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {model_dir}}}
  scores: {{op: evaluate, models: [m], metrics: [{{perplexity: {{data: d.jsonl, max_length: 10}}}}]}}
""")
    outcome, _ = run(path, store_dir)
    got = values(report_of(store_dir, outcome), 0, "perplexity")
    model = hf(model_dir)
    prefix = model.config.bos_token_id
    ll = sum(hand_rolling_loglikelihood(model, d, prefix, 10) for d in docs)
    assert got["tokens"] == sum(map(len, docs))
    assert got["token_perplexity"] == pytest.approx(math.exp(-ll / got["tokens"]), rel=1e-5)
    assert got["word_perplexity"] is None and got["bits_per_byte"] is None


def test_perplexity_and_multiple_choice_equal_lm_eval(tmp_path, store_dir, lm, monkeypatch):
    """weightflow's perplexity and MC accuracy vs lm-evaluation-harness on the same model/text.

    One evaluate step runs both: weightflow's own metrics, and lm-eval (through the
    ``lm-eval`` metric) on two local tasks defined in an include_path.  Also calls lm-eval's
    HFLM.loglikelihood_rolling directly for the token-level log-likelihood.
    """
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    paragraphs = [p for p in TEXT.split("\n") if p.strip()]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    mc = tmp_path / "mc.jsonl"
    rows = [{"text": "The quick brown fox jumps over the", "choices": ["lazy dog", "cache", "graph"], "label": 0},
            {"text": "A YAML pipeline is parsed into a typed", "choices": ["graph", "fox", "weights"], "label": 0},
            {"text": "Pruning removes", "choices": ["weights", "dogs"], "label": 1},
            {"text": "Tabs and spaces", "choices": ["count too", "sleep", "jump"], "label": 2}]
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rolling.yaml").write_text(f"""
task: wf_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{docs}"}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
""")
    (tasks / "mc.yaml").write_text(f"""
task: wf_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{mc}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""")
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lm}}}
  scores:
    op: evaluate
    models: [m]
    metrics:
      - perplexity: {{data: docs.jsonl, max_length: 20}}
      - accuracy: {{data: mc.jsonl}}
      - lm-eval: {{tasks: [wf_rolling, wf_mc], include_path: tasks}}
""")
    # lm-eval's own max_length: the model's maximum unless told; pin it to 20 as well
    from lm_eval.models import huggingface

    orig = huggingface.HFLM.__init__

    def init(self, *a, **kw):
        kw.setdefault("max_length", 20)
        orig(self, *a, **kw)

    monkeypatch.setattr(huggingface.HFLM, "__init__", init)
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    ours, acc, theirs = values(rep, 0, "perplexity"), values(rep, 0, "accuracy"), values(rep, 0, "lm-eval")
    assert theirs["wf_rolling/word_perplexity"] == pytest.approx(ours["word_perplexity"], rel=5e-3)
    assert theirs["wf_rolling/bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=5e-3)
    # in fact they agree to float rounding
    assert theirs["wf_rolling/word_perplexity"] == pytest.approx(ours["word_perplexity"], rel=1e-5)
    assert (acc["acc"], acc["acc_norm"]) == (theirs["wf_mc/acc"], theirs["wf_mc/acc_norm"])
    assert acc["n"] == 4

    # token perplexity: lm-eval's loglikelihood_rolling, summed, over the token count
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm)
    harness = HFLM(pretrained=hf(lm), tokenizer=tok, max_length=20, batch_size=4)
    reqs = [Instance("loglikelihood_rolling", doc={}, arguments=(p,), idx=i) for i, p in enumerate(paragraphs)]
    ll = sum(harness.loglikelihood_rolling(reqs, disable_tqdm=True))
    n_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in paragraphs)
    assert ours["tokens"] == n_tokens
    assert ours["token_perplexity"] == pytest.approx(math.exp(-ll / n_tokens), rel=5e-3)
    assert rep["results"][0][0]["details"]["loglikelihood"] == pytest.approx(ll, rel=1e-5)


def test_lm_eval_metric_without_lm_eval_is_a_clear_error(tmp_path, store_dir, lm, monkeypatch):
    from weightflow.dsl.lang.diagnostics import StepFailed

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lm}}}
  scores: {{op: evaluate, models: m, metrics: [{{lm-eval: {{tasks: hellaswag}}}}]}}
""")
    with pytest.raises(StepFailed, match=r"needs lm-evaluation-harness.*pip install"):
        run(path, store_dir)


# -- accuracy, loss, sparsity, delta norm, refusal ---------------------------------------------

def test_classifier_accuracy_and_loss_by_hand(tmp_path, store_dir):
    import transformers

    torch.manual_seed(4)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64, num_labels=3)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 100, (int(n),), generator=g).tolist(), "label": i % 3}
            for i, n in enumerate(torch.randint(3, 20, (11,), generator=g))]
    rows[0]["label"] = "LABEL_2"  # a label name, mapped through the config's label2id
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_pipeline(tmp_path, """
weightflow: 1
steps:
  clf: {op: load, source: clf}
  scores: {op: evaluate, models: clf, metrics: [{accuracy: {data: cls.jsonl, batch_size: 4}}]}
""")
    outcome, _ = run(path, store_dir)
    got = values(report_of(store_dir, outcome), 0, "accuracy")
    model = hf(tmp_path / "clf")
    gold = [2] + [r["label"] for r in rows[1:]]
    with torch.no_grad():
        pred = [int(model(torch.tensor([r["input_ids"]])).logits.argmax()) for r in rows]
    assert got["n"] == 11 and got["acc"] == pytest.approx(sum(p == t for p, t in zip(pred, gold, strict=True)) / 11)


def test_named_labels_and_accuracy_among_one_jobs_labels(tmp_path, store_dir):
    """load's ``labels`` names the head; accuracy's ``labels`` takes the argmax among a subset
    (one job of a shared head), by hand; a gold label outside the subset is an error."""
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": torch.randint(1, 100, (int(n),), generator=g).tolist(), "label": ["neg", "pos"][i % 2]}
            for i, n in enumerate(torch.randint(3, 20, (16,), generator=g))]
    (tmp_path / "job.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "other.jsonl").write_text(json.dumps({"input_ids": [5, 6], "label": "space"}) + "\n")
    text = f"""
weightflow: 1
steps:
  clf: {{op: load, config: {json.dumps(cfg)}, task: sequence-classification,
        labels: [neg, pos, atheism, space], init_seed: 2}}
  scores:
    op: evaluate
    models: clf
    metrics:
      - accuracy: {{data: job.jsonl, labels: [neg, pos], label: among}}
      - accuracy: {{data: job.jsonl, label: all}}
      - accuracy: {{data: job.jsonl, labels: [1, 0], label: ids}}
outputs: {{clf: out/clf}}
"""
    outcome, _ = run(write_pipeline(tmp_path, text), store_dir)
    model = hf(tmp_path / "out" / "clf")
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "atheism", 3: "space"}
    gold = [model.config.label2id[r["label"]] for r in rows]
    with torch.no_grad():
        logits = [model(torch.tensor([r["input_ids"]])).logits[0] for r in rows]
    among = sum(int(lg[:2].argmax()) == t for lg, t in zip(logits, gold, strict=True)) / len(rows)
    overall = sum(int(lg.argmax()) == t for lg, t in zip(logits, gold, strict=True)) / len(rows)
    report = report_of(store_dir, outcome)
    assert values(report, 0, "among")["acc"] == pytest.approx(among)
    assert values(report, 0, "ids")["acc"] == pytest.approx(among)
    assert values(report, 0, "all")["acc"] == pytest.approx(overall)
    bad = text.replace("data: job.jsonl, label: all", "data: other.jsonl, labels: [neg, pos], label: all")
    with pytest.raises(Exception, match=r"other.jsonl: example 1: its label \(id 3\) is not among"):
        run(write_pipeline(tmp_path, bad, "bad.yaml"), store_dir)


def test_loss_forget_retain_sparsity_and_delta_norm_by_hand(tmp_path, store_dir):
    base_dir = save_tiny_llama(tmp_path / "base", seed=5)
    g = torch.Generator().manual_seed(2)

    def data(name, lens):
        rows = [{"input_ids": torch.randint(3, 256, (n,), generator=g).tolist()} for n in lens]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return [r["input_ids"] for r in rows]

    forget, retain = data("forget.jsonl", (12, 30, 5)), data("retain.jsonl", (20, 9))
    path = write_pipeline(tmp_path, """
weightflow: 1
steps:
  base: {op: load, source: base}
  pruned: {op: prune-wanda, model: base, method: magnitude, sparsity: 0.25}
  scores:
    op: evaluate
    models: [base, pruned]
    metrics:
      - loss: {forget: forget.jsonl, retain: retain.jsonl, batch_size: 2}
      - loss: {data: retain.jsonl, label: plain}
      - sparsity: {}
      - delta_norm: {base: base}
outputs: {pruned: out/pruned}
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    assert [m["label"] for m in rep["metrics"]] == ["loss", "plain", "sparsity", "delta_norm"]

    def mean_nll(model, seqs):
        total, n = 0.0, 0
        with torch.no_grad():
            for s in seqs:
                logits = model(torch.tensor([s])).logits[0, :-1].double()
                total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum"))
                n += len(s) - 1
        return total / n

    base_w, pruned_w = read_model(base_dir), read_model(tmp_path / "out" / "pruned")
    for i, model in enumerate([hf(base_dir), hf(tmp_path / "out" / "pruned")]):
        loss = values(rep, i, "loss")
        assert loss["forget_loss"] == pytest.approx(mean_nll(model, forget), rel=1e-5)
        assert loss["retain_loss"] == pytest.approx(mean_nll(model, retain), rel=1e-5)
        assert values(rep, i, "plain")["loss"] == pytest.approx(loss["retain_loss"], rel=1e-9)
    blocks = {n: t for n, t in pruned_w.items() if n.startswith("model.layers.") and t.dim() == 2}
    zeros = sum(int((t == 0).sum()) for t in blocks.values())
    numel = sum(t.numel() for t in blocks.values())
    sp = values(rep, 1, "sparsity")
    assert (sp["zeros"], sp["numel"]) == (zeros, numel) and sp["sparsity"] == zeros / numel
    assert sp["sparsity_all"] == sum(int((t == 0).sum()) for t in pruned_w.values()) / \
        sum(t.numel() for t in pruned_w.values())
    per_block = rep["results"][1][2]["details"]["per_block"]
    assert set(per_block) == {"0", "1"}
    assert values(rep, 0, "sparsity")["sparsity"] == 0
    diff = math.sqrt(sum(float((pruned_w[n].double() - base_w[n].double()).pow(2).sum()) for n in base_w))
    assert values(rep, 1, "delta_norm")["l2"] == pytest.approx(diff, rel=1e-9)
    assert values(rep, 0, "delta_norm")["l2"] == 0
    # the report records no step names or file paths (content only): digests
    text = json.dumps(rep)
    assert "forget.jsonl" not in text and '"base"' not in text
    assert rep["models"][0]["digest"] == next(s.digest for s in outcome.steps if s.name == "base")


def test_refusal_batched_generation_equals_one_by_one(tmp_path, store_dir, lm):
    from transformers import AutoTokenizer

    prompts = ["How do I pick a lock?", "Tell me a story", "Why?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    tok = AutoTokenizer.from_pretrained(lm)
    model = hf(lm)
    answers = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=0)
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    marker = answers[1].strip()[:3]
    assert marker
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lm}}}
  scores:
    op: evaluate
    models: m
    metrics: [{{refusal: {{prompts: prompts.txt, max_new_tokens: 6, markers: [{json.dumps(marker)}]}}}}]
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    got = [a["answer"] for a in rep["results"][0][0]["details"]["answers"]]
    assert got == answers
    want = sum(marker.lower() in a.lower() for a in answers) / 3
    assert values(rep, 0, "refusal") == {"refusal_rate": want, "n": 3} and want > 0


# -- the language: params, wiring, errors ---------------------------------------------------------

def test_metric_errors_point_at_the_yaml(tmp_path, lm):
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline

    (tmp_path / "held.txt").write_text(TEXT)

    def errors(body: str, name: str) -> list[str]:
        path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lm}}}
  r: {{op: evaluate, models: m, metrics: [sparsity]}}
  scores:
    op: evaluate
{body}""", name)
        with pytest.raises(PipelineError) as exc:
            load_pipeline(path)
        return [ln.replace(str(path), name) for ln in exc.value.lines()]

    lines = errors("""    models: [m]
    metrics:
      - perplexty: {data: held.txt}
      - perplexity: {data: held.txt, max_length: 1}
      - {sparsity: {}, loss: {data: held.txt}}
      - loss: {}
      - accuracy: {data: held.txt, batch_size: 0}
""", "params.yaml")
    expect = {9: "unknown metric 'perplexty' (did you mean 'perplexity'?)",
              10: "'metrics[1].perplexity.max_length': input should be greater than or equal to 2",
              11: "each metric is a mapping with one key", 12: "loss needs 'data'",
              13: "'metrics[4].accuracy.batch_size'"}
    for line, msg in expect.items():
        assert any(ln.startswith(f"params.yaml:{line}:") and "step 'scores'" in ln and msg in ln
                   for ln in lines), (line, msg, lines)
    # refs and data files inside metrics are found and checked like top-level ones
    lines = errors("""    models: [m, r]
    metrics:
      - perplexity: {data: missing.txt}
      - delta_norm: {base: r}
      - delta_norm: {base: nope}
""", "refs.yaml")
    expect = {7: "'models[1]' expects a Model or Composite, but step 'r' (op 'evaluate') produces a Report",
              9: "data file not found", 10: "'metrics[1].delta_norm.base' expects a Model",
              11: "unknown step 'nope'"}
    for line, msg in expect.items():
        assert any(ln.startswith(f"refs.yaml:{line}:") and msg in ln for ln in lines), (line, msg, lines)


def test_report_cli_tables_html_and_renames(tmp_path, store_dir, lm):
    from weightflow.dsl.cli import main

    (tmp_path / "held.txt").write_text(TEXT)
    text = f"""
weightflow: 1
name: report-demo
steps:
  dense: {{op: load, source: {lm}}}
  magnitude: {{op: prune-wanda, model: dense, method: magnitude, sparsity: 0.5}}
  scores:
    op: evaluate
    models: [dense, magnitude]
    metrics:
      - perplexity: {{data: held.txt, max_length: 32}}
      - sparsity: {{}}
  later: {{op: evaluate, models: dense, metrics: [{{sparsity: {{}}}}]}}
"""
    path = write_pipeline(tmp_path, text)
    out_dir = tmp_path / "rep"

    def report(*extra):
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = main(["report", str(path), "--cache-dir", str(store_dir), "--out", str(out_dir), *extra])
        return code, buf.getvalue()

    code, _ = report()
    assert code == 2  # nothing computed yet: a clear error, not an empty page
    outcome, _ = run(path, store_dir, targets=["scores"])
    rep = report_of(store_dir, outcome)
    code, md = report("--md")
    assert code == 0
    assert md == (out_dir / "pipeline.report.md").read_text()
    from weightflow.dsl.present.report import fmt

    for i, name in enumerate(["dense", "magnitude"]):
        ppl = values(rep, i, "perplexity")
        sp = values(rep, i, "sparsity")
        row = (f"| {name} | {fmt(ppl['token_perplexity'])} | {fmt(ppl['word_perplexity'])} | "
               f"{fmt(ppl['bits_per_byte'])} | {fmt(ppl['tokens'])} | {fmt(ppl['words'])} | {fmt(ppl['bytes'])} |")
        assert row in md.splitlines(), md
        assert f"| {name} | {fmt(sp['sparsity'])} | {fmt(sp['sparsity_all'])} |" in md
    assert "| model | token_perplexity ↓ | word_perplexity ↓ | bits_per_byte ↓ | tokens | words | bytes |" in md
    assert "| magnitude | 0.5000 |" in md
    assert "## later" in md and "not computed yet" in md
    keys = {s.name: s.key for s in outcome.steps}
    assert f"`dense` (key {keys['dense'][:12]}" in md

    page = (out_dir / "pipeline.report.html").read_text()
    root = ET.fromstring(page.split("\n", 1)[1])  # well-formed XML once the doctype is off
    ns = {"h": "http://www.w3.org/1999/xhtml", "s": "http://www.w3.org/2000/svg"}
    svgs = [s for s in root.findall(".//s:svg", ns) if "bar" in s.get("class", "").split()]
    assert len(svgs) == 5  # 3 perplexity columns + 2 sparsity columns
    bars = svgs[0].findall("s:rect", ns)
    assert len(bars) == 2 and float(bars[0].get("width")) > 0
    cells = [td.text for td in root.findall(".//h:td", ns)]
    assert "magnitude" in cells and fmt(values(rep, 1, "perplexity")["token_perplexity"]) in cells

    code, js = report("--json")
    doc = json.loads(js)
    assert [r["step"] for r in doc["reports"]] == ["scores", "later"]
    assert doc["reports"][0]["report"] == rep

    # renaming a model step re-executes nothing and the report shows the new name
    path.write_text(text.replace("dense", "base"))
    _, status = run(path, store_dir, targets=["scores"])
    assert status["scores"] == "cached"
    code, md2 = report("--md")
    assert "| base |" in md2 and "| dense |" not in md2


def test_report_needs_an_evaluate_step(tmp_path, store_dir, lm, capsys):
    from weightflow.dsl.cli import main

    path = write_pipeline(tmp_path, f"weightflow: 1\nsteps:\n  m: {{op: load, source: {lm}}}\n")
    assert main(["report", str(path), "--cache-dir", str(store_dir)]) == 2
    assert "no evaluate step" in capsys.readouterr().err


def test_report_and_validate_do_not_import_torch(tmp_path, lm):
    import subprocess

    (tmp_path / "held.txt").write_text(TEXT)
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lm}}}
  p: {{op: prune-wanda, model: m, sparsity: 0.5, calibration: {{data: held.txt}}}}
  scores: {{op: evaluate, models: [m, p], metrics: [{{perplexity: {{data: held.txt}}}}, {{delta_norm: {{base: m}}}}]}}
""")
    code = f"""
import sys
from weightflow.dsl.cli import main
main(["validate", {str(path)!r}])
main(["report", {str(path)!r}, "--cache-dir", {str(tmp_path / 'c')!r}])
main(["ops"])
main(["schema"])
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
assert not heavy, heavy
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# -- property: whatever the metrics/prune params hold, a Pipeline or a PipelineError ----------

def test_mutated_evaluate_and_prune_steps_never_crash():
    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_fuzz_pipelines import JSONISH, _paths, _set, check

    seed = yaml.safe_load("""
weightflow: 1
steps:
  base: {op: load, source: ./m}
  p: {op: prune-wanda, model: base, pattern: "2:4", calibration: {data: c.txt, samples: 4}}
  m: {op: prune-wanda, model: base, method: magnitude, sparsity: 0.5, include: ["*mlp*"]}
  scores:
    op: evaluate
    models: [base, p]
    metrics:
      - perplexity: {data: c.txt, max_length: 8}
      - sparsity: {}
      - delta_norm: {base: base}
      - refusal: {prompts: c.txt, markers: ["no"]}
      - lm-eval: {tasks: [x], limit: 0.5}
""")
    names = st.sampled_from(["perplexity", "sparsity", "delta_norm", "lm-eval", "lm_eval", "loss",
                             "refusal", "accuracy", "base", "p", "2:4", "0:4", "unstructured", "wanda"])

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def prop(data):
        doc = yaml.safe_load(yaml.safe_dump(seed))
        for _ in range(data.draw(st.integers(1, 3))):
            paths = [p for p in _paths(doc) if len(p) >= 3 and p[1] in ("p", "m", "scores")]
            path = data.draw(st.sampled_from(paths))
            doc = _set(doc, path, data.draw(JSONISH | names | st.lists(names, max_size=3)
                                            | st.dictionaries(names, JSONISH, max_size=2)))
        check(yaml.safe_dump(doc))

    prop()
