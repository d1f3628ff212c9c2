"""finetune and unlearn on tiny random models: loss goes down, LoRA touches only its
targets, a separable toy set is learnt, unlearning methods keep their promises, SSD matches
a hand computation, runs are bit-reproducible, bad inputs fail before training."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_LLAMA, config_of, read_model, run, save_tiny_llama, write_pipeline

WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "mat", "log", "tree",
         "and", "then", "it", "was", "red", "blue", "green", "big", "small", "good", "great", "fine",
         "superb", "lovely", "nice", "happy", "bright", "bad", "awful", "poor", "terrible", "ugly", "sad",
         "dull", "grim", "movie", "film", "plot", "is", "this"]
POS = ["good", "great", "fine", "superb", "lovely", "nice", "happy", "bright"]
NEG = ["bad", "awful", "poor", "terrible", "ugly", "sad", "dull", "grim"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "is", "and", "it", "this"]


def save_word_tokenizer(path: Path, kind: str) -> None:
    """A word-level tokenizer over WORDS (BERT-style [CLS] x [SEP], or Llama-style <s> x)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        template = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                 special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
        template = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        names = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = template
    PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(path)


def save_tiny_bert(path: Path, id2label: dict | None = None, seed: int = 0) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    extra = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, num_labels=2, **extra)
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    save_word_tokenizer(path, "bert")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-models")
    llama = save_tiny_llama(root / "llama", seed=0)
    save_word_tokenizer(llama, "llama")
    return {"llama": llama, "bert": save_tiny_bert(root / "bert"),
            "bert_named": save_tiny_bert(root / "bert_named", {0: "neg", 1: "pos"})}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [r.choice(FILLER) for _ in range(5)] + [r.choice(POS if label == "pos" else NEG) for _ in range(2)]
        r.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def token_rows(n: int, seed: int, lo: int = 0, hi: int = 256, length: int = 12) -> list[dict]:
    r = random.Random(seed)
    return [{"input_ids": [r.randrange(lo, hi) for _ in range(length)]} for _ in range(n)]


def manifest(store_dir: Path, key: str) -> dict:
    from weightflow.dsl.store.content import Store

    return Store(store_dir).lookup(key).manifest


def keys_and_digests(outcome) -> dict:
    return {s.name: (s.key, s.digest) for s in outcome.steps}


# -- finetune ---------------------------------------------------------------------------

def test_finetune_causal_lm_on_text_lowers_the_loss_and_records_the_curve(tmp_path, store_dir, models, capsys):
    r = random.Random(0)
    lines = [" ".join([r.choice(["the", "a"]), r.choice(["cat", "dog", "bird"]), r.choice(["sat", "ran"]),
                       "on", "the", r.choice(["mat", "log", "tree"])]) for _ in range(48)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:40]) + "\n")
    (tmp_path / "heldout.txt").write_text("\n".join(lines[40:]) + "\n")
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {{op: load, source: {models['llama']}}}
          ft:
            op: finetune
            model: base
            data: train.txt
            eval_data: heldout.txt
            eval_every: 5
            epochs: 3
            learning_rate: 0.003
            batch_size: 8
            warmup_ratio: 0.1
            lr_scheduler: cosine
        outputs: {{ft: out/ft}}
        """)
    outcome, status = run(path, store_dir)
    assert status == {"base": "executed", "ft": "executed"}
    info = manifest(store_dir, keys_and_digests(outcome)["ft"][0])["info"]
    curve = info["training_curve"]
    assert [c["step"] for c in curve] == list(range(1, 16))  # 40 examples / 8 = 5 steps x 3 epochs
    assert curve[0]["lr"] == 0.0 and max(c["lr"] for c in curve) == pytest.approx(0.003)  # warm-up, then cosine
    assert curve[-1]["loss"] < curve[0]["loss"] - 1.0
    evals = info["validation"]
    assert [e["step"] for e in evals] == [0, 5, 10, 15]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0
    out = tmp_path / "out" / "ft"
    assert (out / "tokenizer.json").is_file() and config_of(out)["architectures"] == ["LlamaForCausalLM"]
    # `weightflow show --json` prints the curve from the manifest
    from weightflow.dsl.cli import main

    capsys.readouterr()
    assert main(["show", str(path), "ft", "--json", "--cache-dir", str(store_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["info"]["training_curve"] == curve


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_changes_only_the_targeted_weights_and_keeps_the_adapter(tmp_path, store_dir, models):
    import torch
    import transformers
    from peft import PeftModel

    write_jsonl(tmp_path / "train.jsonl", token_rows(32, seed=1))
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {{op: load, source: {models['llama']}}}
          lora:
            op: finetune
            model: base
            data: train.jsonl
            max_steps: 8
            learning_rate: 0.01
            lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj], keep_adapter: true}}
        outputs: {{base: out/base, lora: out/lora}}
        """)
    run(path, store_dir)
    base, tuned = read_model(tmp_path / "out" / "base"), read_model(tmp_path / "out" / "lora")
    assert set(base) == set(tuned)  # a normal model: no adapter tensors among the weights
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}
    # the stored adapter, applied to the base with peft, gives the merged weights
    adapter = tmp_path / "out" / "lora" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    for name in changed:
        torch.testing.assert_close(merged[name], tuned[name], rtol=1e-5, atol=1e-6)


def test_classifier_learns_a_separable_toy_set(tmp_path, store_dir, models):
    import torch
    import transformers

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(80, seed=0))
    test_rows = sentiment_rows(40, seed=1)
    write_jsonl(tmp_path / "test.jsonl", test_rows)
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          bert: {{op: load, source: {models['bert']}}}
          clf: {{op: finetune, model: bert, data: train.jsonl, eval_data: test.jsonl, epochs: 10,
                learning_rate: 0.003, batch_size: 16}}
        outputs: {{clf: out/clf}}
        """)
    outcome, _ = run(path, store_dir)
    out = tmp_path / "out" / "clf"
    assert config_of(out)["id2label"] == {"0": "neg", "1": "pos"}  # strings -> ids in sorted order
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = tok([r["text"] for r in test_rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    hits = sum(model.config.id2label[p] == r["label"] for p, r in zip(pred, test_rows, strict=True))
    accuracy = hits / len(test_rows)
    assert accuracy > 0.9
    info = manifest(store_dir, keys_and_digests(outcome)["clf"][0])["info"]
    assert info["validation"][0]["accuracy"] <= 0.6 and info["validation"][-1]["accuracy"] == accuracy


def test_csv_labels_that_are_integers_count_as_integers(tmp_path, store_dir, models):
    from weightflow.dsl.lang.diagnostics import StepFailed

    (tmp_path / "d.csv").write_text("text,label\ngood film,1\nbad film,0\nnice plot,1\n")
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          bert: {{op: load, source: {models['bert']}}}
          clf: {{op: finetune, model: bert, data: d.csv, max_steps: 2, batch_size: 2}}
        outputs: {{clf: out/clf}}
        """)
    run(path, store_dir)
    labels = config_of(tmp_path / "out" / "clf").get("id2label")  # default names are not saved
    assert labels in (None, {"0": "LABEL_0", "1": "LABEL_1"})
    (tmp_path / "d.csv").write_text("text,label\ngood film,1\nbad film,2\n")
    with pytest.raises(StepFailed, match="example 2: label 2 is out of range"):
        run(path, store_dir)


def test_prompt_response_data_puts_the_loss_on_the_response_only(models):
    import transformers

    from weightflow.ops.finetune import FinetuneParams
    from weightflow.ops.lib.training import IGNORE, Encoder

    tok = transformers.AutoTokenizer.from_pretrained(models["llama"])
    model = transformers.AutoModelForCausalLM.from_pretrained(models["llama"])
    params = FinetuneParams(model="m", data="d.jsonl", prompt_field="q", response_field="a", max_length=9)
    enc = Encoder(params, "causal-lm", model, tok, models["llama"])
    ex, = enc.encode(Path("d.jsonl"), [{"q": "the cat sat on", "a": "the mat"}])
    prompt = tok("the cat sat on")["input_ids"]  # <s> the cat sat on
    answer = tok("the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.ids == prompt + answer and ex.target == [IGNORE] * len(prompt) + answer
    short = FinetuneParams(model="m", data="d.jsonl", prompt_field="q", response_field="a", sequence_len=6)
    ex, = Encoder(short, "causal-lm", model, tok, models["llama"]).encode(Path("d.jsonl"),
                                                                         [{"q": "the cat sat on", "a": "the mat"}])
    assert len(ex.ids) == 6 and ex.target[-1] == answer[0]  # truncated at max_length


# -- keys: aliases are spellings, not settings ------------------------------------------

def _key(tmp_path: Path, body: str, name: str) -> str:
    from weightflow.dsl.engine.planner import Planner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    (tmp_path / "d.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  base: {op: load, config: {model_type: llama}}\n"
                          + textwrap.indent(textwrap.dedent(body), "  "), name=name)
    return Planner(load_pipeline(path), Store(tmp_path / "cache")).key_of("ft", {"base": "0" * 64})


def test_axolotl_and_hf_spellings_give_the_same_key(tmp_path):
    canonical = _key(tmp_path, """
        ft: {op: finetune, model: base, data: d.jsonl, epochs: 2, batch_size: 4, max_length: 64,
             lr_scheduler: cosine, eval_every: 5, eval_data: d.jsonl,
             lora: {alpha: 8, dropout: 0.1, target_modules: [q_proj]}}
        """, "a.yaml")
    hf = _key(tmp_path, """
        ft: {op: finetune, model: base, data: d.jsonl, num_train_epochs: 2, per_device_train_batch_size: 4,
             max_seq_length: 64, lr_scheduler_type: cosine, eval_steps: 5, eval_data: d.jsonl, seed: 0,
             lora: {lora_alpha: 8, lora_dropout: 0.1, lora_target_modules: [q_proj]}}
        """, "b.yaml")
    axolotl = _key(tmp_path, """
        ft: {op: finetune, model: base, data: d.jsonl, num_epochs: 2.0, micro_batch_size: 4, sequence_len: 64,
             lr_scheduler: cosine, eval_every: 5, eval_data: d.jsonl,
             lora: {alpha: 8, dropout: 0.1, target_modules: [q_proj]}}
        """, "c.yaml")
    other = _key(tmp_path, """
        ft: {op: finetune, model: base, data: d.jsonl, num_epochs: 3, micro_batch_size: 4, sequence_len: 64,
             lr_scheduler: cosine, eval_every: 5, eval_data: d.jsonl,
             lora: {alpha: 8, dropout: 0.1, target_modules: [q_proj]}}
        """, "d.yaml")
    assert canonical == hf == axolotl != other
    npo = _key(tmp_path, "ft: {op: unlearn, method: npo, model: base, forget: d.jsonl, retain: d.jsonl}\n", "e.yaml")
    npo_explicit = _key(tmp_path, "ft: {op: unlearn, method: npo, model: base, forget: d.jsonl, retain: d.jsonl, "
                        "beta: 0.1, forget_weight: 1, retain_weight: 1.0}\n", "f.yaml")
    assert npo == npo_explicit  # method defaults are filled in before hashing


# -- unlearn ----------------------------------------------------------------------------

UNLEARN = """
weightflow: 1
steps:
  base: {{op: load, config: {config}}}
  known: {{op: finetune, model: base, data: all.jsonl, max_steps: 30, learning_rate: 0.005, batch_size: 16,
          lr_scheduler: constant}}
{unlearn}
"""


def _unlearn_data(tmp_path: Path) -> None:
    forget, retain = token_rows(16, seed=0, lo=0, hi=128), token_rows(32, seed=1, lo=128, hi=256)
    write_jsonl(tmp_path / "forget.jsonl", forget)
    write_jsonl(tmp_path / "retain.jsonl", retain)
    write_jsonl(tmp_path / "all.jsonl", forget + retain)


def test_unlearning_methods_raise_forget_loss_and_spare_retain(tmp_path, store_dir):
    """A tiny Llama first fits forget + retain sequences; then each method takes the same 20
    steps (AdamW, lr 1e-3, batch 8) on it.  The retain term must protect the retain set,
    while the forget loss still rises by most of what plain ascent achieves.

    Not asserted, because it is false here and in every principled setup tried: that
    grad-diff and NPO raise the forget loss at least as much as grad-ascent.  To first order
    (plain SGD, g_f = ∇NLL_forget, g_r = ∇NLL_retain) a grad-ascent step raises the retain
    loss by lr·g_f·g_r, and a grad-diff step raises the forget loss by lr·(|g_f|² − g_f·g_r):
    grad-diff out-forgets grad-ascent only if grad-ascent leaves the retain set unharmed
    (here cos(g_f, g_r) ≈ 0.13 > 0).  NPO's gradient is grad-ascent's on each sequence times
    2σ(−β·Δnll) ≤ 1, so under a scale-free optimizer (AdamW, clipping) it follows grad-ascent
    and then slows as the weight decays (Zhang et al. 2024: slower divergence)."""
    _unlearn_data(tmp_path)
    common = "model: known, forget: forget.jsonl, retain: retain.jsonl, max_steps: 20, learning_rate: 0.001"
    steps = "\n".join(f"  {m.replace('-', '_')}: {{op: unlearn, method: {m}, {common}}}"
                      for m in ("grad-ascent", "grad-diff", "npo", "simnpo"))
    path = write_pipeline(tmp_path, UNLEARN.format(config=json.dumps(TINY_LLAMA), unlearn=steps))
    outcome, _ = run(path, store_dir)
    keys = keys_and_digests(outcome)
    rise = {}
    for m in ("grad_ascent", "grad_diff", "npo", "simnpo"):
        info = manifest(store_dir, keys[m][0])["info"]
        losses = info["losses"]
        rise[m] = {k: losses[k]["after"] - losses[k]["before"] for k in ("forget", "retain")}
        assert len(info["training_curve"]) == 20 and "forget_loss" in info["training_curve"][0]
    ga, gd, npo = rise["grad_ascent"], rise["grad_diff"], rise["npo"]
    assert ga["forget"] > 2.0
    for r in (gd, npo):
        # most of grad-ascent's forgetting (measured: grad-diff 0.95x, NPO 0.84x) ...
        assert r["forget"] > 0.75 * ga["forget"]
        # ... with the retain set protected
        assert r["retain"] < ga["retain"] and r["retain"] < 0.1 * r["forget"]
    assert ga["retain"] > 0.2
    assert rise["simnpo"]["forget"] > 0.1 and rise["simnpo"]["retain"] < ga["retain"]


def test_ssd_dampens_exactly_the_selected_parameters_by_the_rule(tmp_path, store_dir, models):
    """Importances by hand (HF's own loss, batch size 1, eval mode), then the rule."""
    import torch
    import transformers

    forget, retain = token_rows(4, seed=2, length=8), token_rows(6, seed=3, length=8)
    write_jsonl(tmp_path / "forget.jsonl", forget)
    write_jsonl(tmp_path / "retain.jsonl", retain)
    alpha, lam = 0.2, 1.0  # small alpha: some selected elements have lambda*I_D/I_f >= 1 (kept)
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {{op: load, source: {models['llama']}}}
          ssd: {{op: unlearn, method: ssd, model: base, forget: forget.jsonl, retain: retain.jsonl,
                alpha: {alpha}, lambda: {lam}, batch_size: 1}}
        outputs: {{base: out/base, ssd: out/ssd}}
        """)
    outcome, _ = run(path, store_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base").eval()

    def importance(rows):
        imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for row in rows:
            model.zero_grad()
            ids = torch.tensor([row["input_ids"]])
            model(input_ids=ids, labels=ids).loss.backward()
            for n, p in model.named_parameters():
                imp[n] += p.grad ** 2
        return {n: v / len(rows) for n, v in imp.items()}

    i_f, i_d = importance(forget), importance(retain)
    before, after = read_model(tmp_path / "out" / "base"), read_model(tmp_path / "out" / "ssd")
    n_selected = n_kept_by_min = 0
    for name, theta in before.items():
        sel = i_f[name] > alpha * i_d[name]
        factor = torch.where(sel, (lam * i_d[name] / i_f[name]).clamp(max=1.0), torch.ones_like(theta))
        expected = theta * factor
        # elements within float noise of the threshold, or of a factor of 1, could fall either way
        clear = ((i_f[name] - alpha * i_d[name]).abs() > 1e-4 * (i_f[name] + alpha * i_d[name]) + 1e-30) \
            & ((factor - 1).abs() > 1e-4)
        assert torch.equal((after[name] != theta)[clear], (expected != theta)[clear]), name
        torch.testing.assert_close(after[name][clear], expected[clear], rtol=1e-4, atol=1e-9)
        n_selected += int(sel.sum())
        n_kept_by_min += int((sel & (factor == 1)).sum())
    assert n_selected > 0 and n_kept_by_min > 0
    assert any(not torch.equal(before[n], after[n]) for n in before)
    info = manifest(store_dir, keys_and_digests(outcome)["ssd"][0])["info"]
    assert info["ssd"]["dampened"] == pytest.approx(n_selected, rel=0.01)
    assert set(info["losses"]) == {"forget", "retain"}


# -- reproducibility -------------------------------------------------------------------

def test_same_seed_same_data_same_weights_in_fresh_caches(tmp_path, models):
    write_jsonl(tmp_path / "sent.jsonl", sentiment_rows(24, seed=4))
    _unlearn_data(tmp_path)
    text = f"""
        weightflow: 1
        seed: 3
        steps:
          bert: {{op: load, source: {models['bert']}}}
          llama: {{op: load, source: {models['llama']}}}
          clf: {{op: finetune, model: bert, data: sent.jsonl, max_steps: 4, learning_rate: 0.001, batch_size: 4}}
          lora: {{op: finetune, model: llama, data: forget.jsonl, max_steps: 3, lora: {{r: 2, dropout: 0.1}},
                 learning_rate: 0.01, gradient_accumulation_steps: 2, batch_size: 4, gradient_checkpointing: true}}
          npo: {{op: unlearn, method: npo, model: llama, forget: forget.jsonl, retain: retain.jsonl,
                retain_loss: kl, max_steps: 3, learning_rate: 0.001, batch_size: 4}}
          gd: {{op: unlearn, method: grad-diff, model: llama, forget: forget.jsonl, retain: retain.jsonl,
               max_steps: 3, learning_rate: 0.001, batch_size: 4, gradient_checkpointing: true}}
          gd_plain: {{op: unlearn, method: grad-diff, model: llama, forget: forget.jsonl, retain: retain.jsonl,
                     max_steps: 3, learning_rate: 0.001, batch_size: 4}}
        """
    path = write_pipeline(tmp_path, text)
    first, _ = run(path, tmp_path / "cache1")
    second, status = run(path, tmp_path / "cache2")
    assert set(status.values()) == {"executed"}
    assert keys_and_digests(first) == keys_and_digests(second)
    # recomputing activations (gradient checkpointing) does not change a bit
    assert keys_and_digests(first)["gd"][1] == keys_and_digests(first)["gd_plain"][1]
    reseeded = write_pipeline(tmp_path, text.replace("seed: 3", "seed: 4"), name="reseeded.yaml")
    third, _ = run(reseeded, tmp_path / "cache1", targets=["clf", "npo"])
    a, c = keys_and_digests(first), keys_and_digests(third)
    assert a["clf"][1] != c["clf"][1]  # dropout and order follow the seed
    assert a["npo"][0] != c["npo"][0]


# -- bad inputs: clear errors before training ----------------------------------------------

def _pipeline_error(tmp_path: Path, text: str) -> str:
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline

    with pytest.raises(PipelineError) as exc:
        load_pipeline(write_pipeline(tmp_path, text))
    return str(exc.value)


@pytest.mark.parametrize("step, fragments", [
    ("{op: finetune, model: base, data: missing.jsonl}", ["pipeline.yaml:4:", "data file not found", "missing.jsonl"]),
    ("{op: finetune, model: base, data: 'hf:imdb'}", ["pipeline.yaml:4:", "hub datasets are not fetched",
                                                      "local .jsonl"]),
    ("{op: finetune, model: base, data: d.tsv}", ["unsupported data format '.tsv'"]),
    ("{op: finetune, model: base, data: d.jsonl, epochs: 1, num_epochs: 2}", ["'epochs' and 'num_epochs' are "
                                                                             "the same setting"]),
    ("{op: finetune, model: base, data: d.jsonl, prompt_field: q}", ["'prompt_field' and 'response_field' go "
                                                                     "together"]),
    ("{op: finetune, model: base, data: d.jsonl, lora: {r: 0}}", ["lora.r"]),
    ("{op: unlearn, method: grad-diff, model: base, forget: d.jsonl}", ["needs 'retain' data"]),
    ("{op: unlearn, method: grad-diff, model: base, forget: d.jsonl, retain: d.jsonl, beta: 0.2}",
     ["'beta' does not apply to method grad-diff", "npo, simnpo"]),
    ("{op: unlearn, method: grad-ascent, model: base, forget: d.jsonl, retain_weight: 1}",
     ["use method: grad-diff"]),
    ("{op: unlearn, method: ssd, model: base, forget: d.jsonl, retain: d.jsonl, lora: {r: 2}}",
     ["'lora' does not apply to method ssd"]),
    ("{op: unlearn, method: grad-ascent, model: base, forget: d.jsonl, retain_loss: kl}",
     ["'retain_loss' does not apply to method grad-ascent"]),
    ("{op: finetune, model: base, data: d.jsonl, eval_every: 10}", ["'eval_every' needs 'eval_data'"]),
    ("{op: unlearn, method: forget-it, model: base, forget: d.jsonl}", ["method"]),
])
def test_invalid_training_steps_are_located(tmp_path, step, fragments):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "d.tsv").write_text("x\n")
    message = _pipeline_error(tmp_path, f"weightflow: 1\nsteps:\n  base: {{op: load, config: {{model_type: llama}}}}\n"
                                        f"  ft: {step}\n")
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in message


@pytest.mark.parametrize("rows, task, fragment", [
    ([{"text": "a b"}, {"txt": "c"}], "causal-lm", "line 2 has no field 'text' (fields there: txt)"),
    ([{"text": "a", "label": 1}, {"text": "b"}], "sequence-classification", "line 2 has no field 'label'"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": "pos"}], "sequence-classification",
     "line 2: labels mix integers and strings"),
    ([{"input_ids": [1, 2]}, {"text": "b"}], "causal-lm", "line 2 has no 'input_ids'"),
])
def test_data_problems_are_reported_before_any_step_runs(tmp_path, store_dir, rows, task, fragment):
    from weightflow.dsl.lang.diagnostics import PipelineError

    write_jsonl(tmp_path / "d.jsonl", rows)
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {{op: load, config: {{model_type: llama}}}}
          ft: {{op: finetune, model: base, data: d.jsonl, task: {task}}}
        """)
    with pytest.raises(PipelineError) as exc:
        run(path, store_dir)
    assert fragment in str(exc.value) and "d.jsonl" in str(exc.value) and "pipeline.yaml:4:" in str(exc.value)
    assert not (store_dir / "objects").exists() or not any((store_dir / "objects").rglob("*.safetensors"))


@pytest.mark.parametrize("model, data, extra, fragment", [
    ("bert_named", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "meh"}], "",
     "line 2: label 'meh' is not one of the model's labels ('neg', 'pos')"),
    ("bert", [{"text": "good", "label": 0}, {"text": "bad", "label": 5}], "",
     "label 5 is out of range: the model's head has 2 labels"),
    ("bert", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}, {"text": "x", "label": "c"}], "",
     "the data has 3 labels ('a', 'b', 'c') but the model's head has 2"),
    ("bert", [{"text": "good", "label": 0}], ", lora: {target_modules: [q_proj, value]}",
     "lora.target_modules: no module of the model matches 'q_proj'; its adaptable modules are named"),
    ("llama_bare", [{"text": "good"}], "", "text data needs the model's tokenizer"),
])
def test_run_time_input_errors_come_before_training(tmp_path, store_dir, models, model, data, extra, fragment):
    from weightflow.dsl.lang.diagnostics import StepFailed

    write_jsonl(tmp_path / "d.jsonl", data)
    source = (f"{{op: load, config: {json.dumps(TINY_LLAMA)}}}" if model == "llama_bare"
              else f"{{op: load, source: {models[model]}}}")
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {source}
          ft: {{op: finetune, model: base, data: d.jsonl, max_steps: 1{extra}}}
        """)
    with pytest.raises(StepFailed) as exc:
        run(path, store_dir)
    assert fragment in str(exc.value), str(exc.value)
    assert "internal error" not in str(exc.value)


def test_validate_with_training_steps_does_not_import_torch(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "x", "label": 0}\n')
    path = write_pipeline(tmp_path, """
        weightflow: 1
        steps:
          base: {op: load, config: {model_type: llama}}
          ft: {op: finetune, model: base, data: d.jsonl, lora: {r: 4}}
          ul: {op: unlearn, method: npo, model: ft, forget: d.jsonl, retain: d.jsonl}
        """)
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        from weightflow.dsl.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["validate", {str(path)!r}])
        print(rc, sorted(m for m in ("torch", "transformers", "peft", "numpy") if m in sys.modules))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "0 []", res.stdout + res.stderr
