"""evaluate's metrics registry (ops/metrics/): a metric is one file, and everything else --
validation, the JSON Schema, `weightflow ops`, report columns, what stays out of the
report -- follows from its declaration.  ``mia_loss`` was added as one file and proves it:
its AUC against a pairwise count by hand (causal LM and classifier), and fine-tuning on the
forget set raises it."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import run, save_tiny_llama, write_pipeline

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "cat", "dog", "bird", "fish", "sat", "ran", "flew", "swam", "on", "under", "over",
         "near", "mat", "log", "tree", "rock", "and", "then", "it", "was", "red", "blue", "green", "big",
         "small", "old", "new"]
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}


def word_tokenizer(path: Path, kind: str) -> None:
    """A whitespace word-level tokenizer over WORDS: bert-style ([CLS] .. [SEP], a pad token)
    or llama-style (<s> first, </s> as EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        template = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
        template = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        names = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = template
    PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(path)


def lines(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(5, 10))) for _ in range(n)]


def write_lines(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def report_of(store_dir: Path, outcome, step: str = "scores") -> dict:
    digest = next(s.digest for s in outcome.steps if s.name == step)
    return json.loads((store_dir / "objects" / digest[:2] / digest / "report.json").read_text())


def pairwise_auc(members: list[float], others: list[float]) -> Fraction:
    """P(member score > non-member score) + ½·P(tie), by counting every pair."""
    wins = sum(Fraction(1) if m > o else Fraction(1, 2) if m == o else Fraction(0)
               for m in members for o in others)
    return wins / (len(members) * len(others))


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> Path:
    path = save_tiny_llama(tmp_path_factory.mktemp("mia") / "lm", seed=11, config=LLAMA)
    word_tokenizer(path, "llama")
    return path


# -- the AUC itself --------------------------------------------------------------------------

def test_auc_counts_pairs_and_ties_exactly():
    from weightflow.ops.metrics.mia_loss import auc

    members, others = [3.0, 2.0, 2.0, -1.0], [2.0, 1.0, 2.0]
    assert auc(members, others) == float(pairwise_auc(members, others)) == 7 / 12
    r = random.Random(0)
    for _ in range(50):
        m = [r.choice([0.0, 0.5, 1.0, 1.5, 2.0]) for _ in range(r.randint(1, 9))]
        o = [r.choice([0.0, 0.5, 1.0, 1.5, 2.0]) for _ in range(r.randint(1, 9))]
        assert auc(m, o) == float(pairwise_auc(m, o))
    assert auc([1.0], [0.0]) == 1.0 and auc([0.0], [1.0]) == 0.0 and auc([1.0], [1.0]) == 0.5


def _hand_causal_losses(model_dir: Path, rows: list[str]) -> list[float]:
    """Mean token NLL of each line encoded as `loss` encodes text: tokens + EOS, all scored."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in rows:
            ids = tok(text)["input_ids"] + [tok.eos_token_id]
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            out.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))
    return out


def _check_against_hand(got: dict, forget_losses: list[float], holdout_losses: list[float]) -> None:
    gap = min(abs(f - h) for f in forget_losses for h in holdout_losses)
    assert gap > 1e-4, "near-tied losses: the hand AUC could differ by float rounding alone"
    want = pairwise_auc([-x for x in forget_losses], [-x for x in holdout_losses])
    assert got["auc"] == pytest.approx(float(want), abs=1e-12)
    assert (got["n_forget"], got["n_holdout"]) == (len(forget_losses), len(holdout_losses))


def test_mia_loss_auc_of_a_causal_lm_equals_a_pairwise_count(tmp_path, store_dir, causal):
    forget, holdout = lines(7, 1), lines(9, 2)
    write_lines(tmp_path / "forget.txt", forget)
    write_lines(tmp_path / "holdout.txt", holdout)
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  m: {{op: load, source: {causal}}}
  scores: {{op: evaluate, models: m,
           metrics: [{{mia_loss: {{forget: forget.txt, holdout: holdout.txt, batch_size: 3}}}}]}}
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    got = rep["results"][0][0]["values"]
    _check_against_hand(got, _hand_causal_losses(causal, forget), _hand_causal_losses(causal, holdout))
    # the report's shape comes from the declaration; file paths stay out of it
    metric = rep["metrics"][0]
    assert metric["label"] == "mia_loss" and metric["metric"] == "mia_loss"
    assert metric["columns"] == [{"name": "auc", "better": None, "chart": True},
                                 {"name": "n_forget", "better": None, "chart": False},
                                 {"name": "n_holdout", "better": None, "chart": False}]
    assert metric["params"]["batch_size"] == 3 and "forget" not in metric["params"]
    text = json.dumps(rep)
    assert "forget.txt" not in text and "holdout.txt" not in text and str(tmp_path) not in text
    assert any("n_forget" in line for line in outcome.logs)  # the table is shown


def test_mia_loss_auc_of_a_classifier_equals_a_pairwise_count(tmp_path, store_dir):
    import transformers

    torch.manual_seed(6)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=len(WORDS) + 4, max_position_embeddings=64, num_labels=2,
                                  initializer_range=0.2)  # spread-out logits: no near-tied losses
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    word_tokenizer(tmp_path / "clf", "bert")
    r = random.Random(3)
    forget = [{"text": t, "label": r.randint(0, 1)} for t in lines(6, 4)]
    holdout = [{"text": t, "label": r.randint(0, 1)} for t in lines(5, 5)]
    for name, rows in (("forget.jsonl", forget), ("holdout.jsonl", holdout)):
        (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in rows))
    path = write_pipeline(tmp_path, """
weightflow: 1
steps:
  clf: {op: load, source: clf}
  scores: {op: evaluate, models: clf,
           metrics: [{mia_loss: {forget: forget.jsonl, holdout: holdout.jsonl, batch_size: 4}}]}
""")
    outcome, _ = run(path, store_dir)
    got = report_of(store_dir, outcome)["results"][0][0]["values"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "clf")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "clf").eval()

    def losses(rows):
        with torch.no_grad():
            return [float(torch.nn.functional.cross_entropy(
                model(**tok(x["text"], return_tensors="pt")).logits.double(), torch.tensor([x["label"]])))
                for x in rows]

    _check_against_hand(got, losses(forget), losses(holdout))


def test_fine_tuning_on_the_forget_set_raises_the_auc(tmp_path, store_dir, causal):
    write_lines(tmp_path / "forget.txt", lines(8, 7))
    write_lines(tmp_path / "holdout.txt", lines(8, 8))
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  base: {{op: load, source: {causal}}}
  tuned: {{op: finetune, model: base, data: forget.txt, max_steps: 30, learning_rate: 0.01, batch_size: 8}}
  scores:
    op: evaluate
    models: [base, tuned]
    metrics: [{{mia_loss: {{forget: forget.txt, holdout: holdout.txt}}}},
              {{loss: {{forget: forget.txt, retain: holdout.txt}}}}]
""")
    outcome, _ = run(path, store_dir)
    rep = report_of(store_dir, outcome)
    base, tuned = (rep["results"][i][0]["values"]["auc"] for i in (0, 1))
    assert tuned > base and tuned > 0.9, (base, tuned)
    # `loss` on the same files agrees: the tuned model fits the forget set better
    assert rep["results"][1][1]["values"]["forget_loss"] < rep["results"][1][1]["values"]["retain_loss"]


# -- derived from the declaration, with no other edit -----------------------------------------

def test_mia_loss_is_declared_in_its_own_file_only():
    from weightflow.ops.metrics import METRICS

    metric = METRICS["mia_loss"]
    assert Path(__import__(metric.compute.__module__, fromlist=["_"]).__file__).resolve() == \
        ROOT / "ops" / "metrics" / "mia_loss.py"
    mentions = sorted(str(p.relative_to(ROOT)) for d in ("ops", "dsl") for p in (ROOT / d).rglob("*.py")
                      if "mia_loss" in p.read_text(encoding="utf-8"))
    assert mentions == ["ops/metrics/mia_loss.py"]
    assert metric.files == ("forget", "holdout")
    assert {"label", "forget", "holdout"} <= metric.not_in_report


def test_every_metric_keeps_its_files_and_refs_out_of_the_report():
    from weightflow.dsl.lang.spec import DataFile, StepRef
    from weightflow.ops.metrics import METRICS, PathParam, _markers

    for name, metric in METRICS.items():
        for field, info in metric.params.model_fields.items():
            marks = _markers(info.annotation) + list(info.metadata)
            if any(isinstance(m, (DataFile, StepRef, PathParam)) for m in marks):
                assert field in metric.not_in_report, (name, field)
            elif field != "label":
                assert field not in metric.not_in_report, (name, field)
    assert METRICS["lm-eval"].not_in_report == {"label", "include_path"}
    assert METRICS["delta_norm"].not_in_report == {"label", "base"}


def test_schema_ops_and_validation_include_mia_loss(tmp_path):
    import jsonschema
    import yaml

    from weightflow.dsl.lang import opdocs
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.lang.schema import language_schema
    from weightflow.ops.metrics import METRICS

    text = opdocs.ops_text()
    block = text[text.index("evaluate (v"):].split("\n\n")[0]
    assert "list[" + " | ".join(METRICS) + "]" in block and "mia_loss" in block
    assert "Item" not in block  # metric names, not class names
    assert "- ``mia_loss``: " in next(op["doc"] for op in opdocs.ops_json() if op["name"] == "evaluate")
    assert "``holdout`` (required)" in opdocs.ops_markdown()

    schema = language_schema()
    (tmp_path / "f.txt").write_text("a b\n")
    doc = yaml.safe_load("""
weightflow: 1
steps:
  m: {op: load, source: ./m}
  s: {op: evaluate, models: [m], metrics: [{mia_loss: {forget: f.txt, holdout: f.txt, max_length: 64}}]}
""")
    jsonschema.validate(doc, schema)
    doc["steps"]["s"]["metrics"][0]["mia_loss"]["holdot"] = "f.txt"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)

    (tmp_path / "m").mkdir()
    good = tmp_path / "good.yaml"
    good.write_text("weightflow: 1\nsteps:\n  m: {op: load, source: ./m}\n"
                    "  s: {op: evaluate, models: m, metrics: [{mia_loss: {forget: f.txt, holdout: f.txt}}]}\n")
    step = load_pipeline(good).steps["s"]
    assert sorted(".".join(map(str, k)) for k in step.data_files) == ["metrics.0.mia_loss.forget",
                                                                      "metrics.0.mia_loss.holdout"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("mia_loss: {forget: f.txt, holdout: f.txt}", "mia_los: {forget: f.txt}"))
    with pytest.raises(PipelineError, match="did you mean 'mia_loss'"):
        load_pipeline(bad)
    bad.write_text(good.read_text().replace(", holdout: f.txt", ""))
    with pytest.raises(PipelineError, match="holdout"):
        load_pipeline(bad)
