"""The unlearning measures of evaluate (issue 16): mia's four attacks, privleak, extraction,
truth_ratio, forget_quality, rouge and model_utility, each against a computation by hand on a
tiny causal LM (one unpadded forward pass per example, plain formulas in this file), and
rouge's ROUGE-L against the rouge-score package."""

from __future__ import annotations

import json
import math
import random
import zlib
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import run, save_tiny_llama, write_pipeline
from test_metrics_registry import LLAMA, WORDS, lines, report_of, word_tokenizer, write_lines


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unlearning_metrics")
    out = {}
    for name, seed in (("model", 21), ("reference", 22)):
        path = save_tiny_llama(root / name, seed=seed, config=LLAMA)
        word_tokenizer(path, "llama")
        out[name] = path
    return out


def hand(model_dir: Path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def qa_rows(n: int, seed: int) -> list[dict]:
    r = random.Random(seed)

    def phrase(lo=3, hi=6):
        return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))
    return [{"question": phrase(), "answer": phrase(), "paraphrased_answer": phrase(),
             "perturbed_answer": [phrase() for _ in range(3)]} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def answer_logps(tok, model, question: str, answer: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """log-softmax rows and gold ids of the answer tokens (+ EOS) after the question."""
    head = tok(question)["input_ids"]
    tail = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = head + tail
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits[len(head) - 1:len(ids) - 1], dim=-1)
    return lp, torch.tensor(tail), tail


def mean_nll(tok, model, q: str, a: str) -> float:
    lp, gold, _ = answer_logps(tok, model, q, a)
    return float(-lp.gather(1, gold[:, None]).mean())


def hand_ratios(tok, model, rows) -> list[float]:
    out = []
    for r in rows:
        true = math.exp(-mean_nll(tok, model, r["question"], r["paraphrased_answer"]))
        false = [math.exp(-mean_nll(tok, model, r["question"], x)) for x in r["perturbed_answer"]]
        out.append(math.prod(false) ** (1 / len(false)) / true)
    return out


def pairwise_auc(members, others) -> float:
    wins = sum(Fraction(1) if m > o else Fraction(1, 2) if m == o else Fraction(0) for m in members for o in others)
    return float(wins / (len(members) * len(others)))


def values(rep: dict, model: int, metric: int) -> dict:
    return rep["results"][model][metric]["values"]


# -- truth ratio and forget quality -----------------------------------------------------------

def test_truth_ratio_and_forget_quality_equal_hand(tmp_path, store_dir, lms):
    from scipy.stats import ks_2samp

    rows = qa_rows(9, 1)
    write_jsonl(tmp_path / "forget.jsonl", rows)
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lms['model']}}}
  ref: {{op: load, source: {lms['reference']}}}
  scores: {{op: evaluate, models: m, metrics: [{{truth_ratio: {{data: forget.jsonl, batch_size: 4}}}},
           {{forget_quality: {{forget: forget.jsonl, reference: ref, batch_size: 5}}}}]}}
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    ours, theirs = hand_ratios(*hand(lms["model"]), rows), hand_ratios(*hand(lms["reference"]), rows)
    got = values(rep, 0, 0)
    assert got["n"] == 9
    assert got["truth_ratio"] == pytest.approx(sum(ours) / 9, rel=1e-5)
    assert got["truth_score"] == pytest.approx(sum(max(0, 1 - r) for r in ours) / 9, rel=1e-5, abs=1e-9)
    assert got["truth_closeness"] == pytest.approx(sum(min(r, 1 / r) for r in ours) / 9, rel=1e-5)
    fq = values(rep, 0, 1)
    want = ks_2samp(ours, theirs)
    assert fq["ks_statistic"] == pytest.approx(float(want.statistic))
    assert fq["forget_quality"] == pytest.approx(float(want.pvalue), rel=1e-6)
    assert 0 <= fq["forget_quality"] <= 1


def test_forget_quality_of_the_reference_itself_is_one(tmp_path, store_dir, lms):
    write_jsonl(tmp_path / "forget.jsonl", qa_rows(6, 2))
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  ref: {{op: load, source: {lms['reference']}}}
  scores: {{op: evaluate, models: ref, metrics: [{{forget_quality: {{forget: forget.jsonl, reference: ref}}}}]}}
""")
    outcome, _ = run(path, store_dir)
    got = values(report_of(store_dir, outcome), 0, 0)
    assert got["ks_statistic"] == 0 and got["forget_quality"] == pytest.approx(1.0)


def test_the_reference_is_scored_once_per_evaluate_not_once_per_model(tmp_path, store_dir, lms, monkeypatch):
    """forget_quality and privleak over three models load and score the reference once each,
    with the numbers of a computation by hand; other forget data is scored anew."""
    from scipy.stats import ks_2samp

    from weightflow.ops.metrics import _qa

    monkeypatch.setattr(_qa, "_REFERENCE_RESULTS", {})
    calls = []
    real = _qa.reference_subject
    monkeypatch.setattr(_qa, "reference_subject", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = qa_rows(7, 3)
    write_jsonl(tmp_path / "forget.jsonl", rows)
    write_jsonl(tmp_path / "other.jsonl", qa_rows(5, 4))
    write_lines(tmp_path / "f.txt", lines(6, 5))
    write_lines(tmp_path / "h.txt", lines(6, 6))
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lms['model']}}}
  ref: {{op: load, source: {lms['reference']}}}
  scores:
    op: evaluate
    models: [m, ref, m]
    metrics: [{{forget_quality: {{forget: forget.jsonl, reference: ref}}}},
              {{privleak: {{forget: f.txt, holdout: h.txt, reference: ref}}}},
              {{forget_quality: {{forget: other.jsonl, reference: ref, label: fq_other}}}}]
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    assert len(calls) == 3  # one per metric, not one per (model, metric)
    want = ks_2samp(hand_ratios(*hand(lms["model"]), rows), hand_ratios(*hand(lms["reference"]), rows))
    assert values(rep, 0, 0)["forget_quality"] == pytest.approx(float(want.pvalue), rel=1e-6)
    assert values(rep, 1, 0)["ks_statistic"] == 0 and values(rep, 1, 1)["privleak"] == 0.0
    assert values(rep, 2, 1) == values(rep, 0, 1)


# -- membership inference, privacy leakage, extraction ----------------------------------------

def hand_attack_scores(tok, model, text: str, k: float) -> dict[str, float]:
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    gold = torch.tensor(ids[1:])
    logp = lp.gather(1, gold[:, None]).squeeze(1)
    p = lp.exp()
    mu = (p * lp).sum(-1)
    sigma = ((p * lp * lp).sum(-1) - mu ** 2).sqrt()
    n = max(1, int(len(logp) * k))
    low = sorted(logp.tolist())[:n]
    low_z = sorted(((logp - mu) / sigma).tolist())[:n]
    text_bytes = len(zlib.compress(tok.decode(ids[1:], skip_special_tokens=True).encode()))
    return {"loss": float(logp.mean()), "zlib": float(logp.sum()) / text_bytes,
            "min-k": sum(low) / n, "min-k++": sum(low_z) / n}


def test_mia_attacks_equal_hand(tmp_path, store_dir, lms):
    forget, holdout = lines(7, 3), lines(8, 4)
    write_lines(tmp_path / "forget.txt", forget)
    write_lines(tmp_path / "holdout.txt", holdout)
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lms['model']}}}
  scores: {{op: evaluate, models: m, metrics: [{{mia: {{forget: forget.txt, holdout: holdout.txt, k: 0.3,
                                                       batch_size: 3}}}}]}}
""")
    outcome, _ = run(path, store_dir)
    got = values(report_of(store_dir, outcome), 0, 0)
    tok, model = hand(lms["model"])
    f = [hand_attack_scores(tok, model, t, 0.3) for t in forget]
    h = [hand_attack_scores(tok, model, t, 0.3) for t in holdout]
    for attack, col in (("loss", "auc_loss"), ("zlib", "auc_zlib"), ("min-k", "auc_min_k"),
                        ("min-k++", "auc_min_k_pp")):
        gap = min(abs(a[attack] - b[attack]) for a in f for b in h)
        assert gap > 1e-6, f"{attack}: near-tied scores would make the hand AUC depend on rounding"
        assert got[col] == pytest.approx(pairwise_auc([a[attack] for a in f], [b[attack] for b in h]), abs=1e-12), col
    assert (got["n_forget"], got["n_holdout"]) == (7, 8)
    # the attacks are different statistics: not all four AUCs coincide
    assert len({round(got[c], 9) for c in ("auc_loss", "auc_zlib", "auc_min_k", "auc_min_k_pp")}) > 1


def test_privleak_is_the_relative_auc_gap_to_the_reference(tmp_path, store_dir, lms):
    write_lines(tmp_path / "forget.txt", lines(8, 5))
    write_lines(tmp_path / "holdout.txt", lines(8, 6))
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lms['model']}}}
  ref: {{op: load, source: {lms['reference']}}}
  scores:
    op: evaluate
    models: [m, ref]
    metrics: [{{mia: {{forget: forget.txt, holdout: holdout.txt, attacks: [min-k]}}}},
              {{privleak: {{forget: forget.txt, holdout: holdout.txt, reference: ref}}}}]
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    auc_m, auc_ref = values(rep, 0, 0)["auc_min_k"], values(rep, 1, 0)["auc_min_k"]
    assert values(rep, 0, 0)["auc_loss"] is None  # only the attacks asked for
    pl = values(rep, 0, 1)
    assert pl["auc"] == auc_m and pl["reference_auc"] == auc_ref
    assert pl["privleak"] == pytest.approx((auc_m - auc_ref) / auc_ref * 100)
    assert values(rep, 1, 1)["privleak"] == 0.0
    assert auc_m != auc_ref


def test_extraction_equals_hand_and_rises_when_the_answers_are_learned(tmp_path, store_dir, lms):
    rows = [{"prompt": r["question"], "response": r["answer"]} for r in qa_rows(6, 7)]
    write_jsonl(tmp_path / "forget.jsonl", rows)
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lms['model']}}}
  tuned: {{op: finetune, model: m, data: forget.jsonl, prompt_field: prompt, response_field: response,
          max_steps: 40, learning_rate: 0.01, batch_size: 6}}
  scores: {{op: evaluate, models: [m, tuned], metrics: [{{extraction: {{data: forget.jsonl, prompt_field: prompt,
                                                                     response_field: response}}}}]}}
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    tok, model = hand(lms["model"])
    em, es = [], []
    for r in rows:
        lp, gold, _ = answer_logps(tok, model, r["prompt"], r["response"])
        hit = (lp.argmax(-1) == gold).tolist()
        em.append(sum(hit) / len(hit))
        k = next((i for i in range(len(hit)) if all(hit[i:])), len(hit))
        es.append(1 - k / len(hit))
    got = values(rep, 0, 0)
    assert got["exact_memorization"] == pytest.approx(sum(em) / 6)
    assert got["extraction_strength"] == pytest.approx(sum(es) / 6)
    tuned = values(rep, 1, 0)
    assert tuned["exact_memorization"] > got["exact_memorization"] + 0.3
    assert tuned["extraction_strength"] > got["extraction_strength"]


# -- ROUGE-L and model utility ----------------------------------------------------------------

def test_rouge_l_equals_the_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    from weightflow.ops.metrics.rouge import rouge_l

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    r = random.Random(0)
    vocab = WORDS + ["Cat,", "DOG!", "it's", "42", "x-y"]
    for _ in range(200):
        gold = " ".join(r.choice(vocab) for _ in range(r.randint(0, 12)))
        gen = " ".join(r.choice(vocab) for _ in range(r.randint(0, 12)))
        want = scorer.score(gold, gen)["rougeL"]
        recall, f1 = rouge_l(gold, gen)
        assert recall == pytest.approx(want.recall) and f1 == pytest.approx(want.fmeasure), (gold, gen)


def greedy(tok, model, question: str, n: int) -> str:
    ids = torch.tensor([tok(question)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_rouge_and_model_utility_equal_hand(tmp_path, store_dir, lms):
    from weightflow.ops.metrics.rouge import rouge_l

    rows = qa_rows(5, 9)
    write_jsonl(tmp_path / "retain.jsonl", rows)
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lms['model']}}}
  scores: {{op: evaluate, models: m, metrics: [{{rouge: {{data: retain.jsonl, max_new_tokens: 6, batch_size: 2}}}},
           {{model_utility: {{data: [retain.jsonl], max_new_tokens: 6}}}}]}}
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    tok, model = hand(lms["model"])
    recalls = [rouge_l(r["answer"], greedy(tok, model, r["question"], 6))[0] for r in rows]
    assert values(rep, 0, 0)["rouge_l_recall"] == pytest.approx(sum(recalls) / 5)
    answers = rep["results"][0][0]["details"]["answers"] if "details" in rep["results"][0][0] else None
    if answers is not None:
        assert [a["gold"] for a in answers] == [r["answer"] for r in rows]
    prob = sum(math.exp(-mean_nll(tok, model, r["question"], r["answer"])) for r in rows) / 5
    truth = sum(max(0, 1 - x) for x in hand_ratios(tok, model, rows)) / 5
    rouge = sum(recalls) / 5
    mu = values(rep, 0, 1)
    assert mu["probability"] == pytest.approx(prob, rel=1e-5)
    assert mu["truth_score"] == pytest.approx(truth, rel=1e-5, abs=1e-9)
    assert mu["rouge_l_recall"] == pytest.approx(rouge)
    parts = [prob, rouge, truth]
    want = 0.0 if min(parts) <= 0 else 3 / sum(1 / x for x in parts)
    assert mu["model_utility"] == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_harmonic_mean_is_zero_when_any_part_is():
    from weightflow.ops.metrics.model_utility import harmonic_mean

    assert harmonic_mean([0.5, 0.5]) == 0.5
    assert harmonic_mean([1.0, 0.25]) == pytest.approx(0.4)
    assert harmonic_mean([0.9, 0.0, 0.8]) == 0.0


def test_qa_metrics_name_a_missing_field(tmp_path, lms):
    """Checked before any step runs: the file, the field, no traceback."""
    import subprocess
    import sys

    write_jsonl(tmp_path / "qa.jsonl", [{"question": "a cat", "answer": "the dog"}])
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {lms['model']}}}
  scores: {{op: evaluate, models: m, metrics: [{{truth_ratio: {{data: qa.jsonl}}}}]}}
""")
    res = subprocess.run([sys.executable, "-m", "weightflow", "run", str(path), "--cache-dir", str(tmp_path / "store")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "paraphrased_answer" in res.stderr and "qa.jsonl" in res.stderr
    assert not (tmp_path / "store" / "objects").exists() or not any((tmp_path / "store" / "objects").iterdir())
