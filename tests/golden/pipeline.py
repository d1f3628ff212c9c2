"""A pipeline covering every op and every method on tiny models, with its inputs.

Used by ``tests/test_golden_digests.py``: the output digest of every step is recorded in
``digests.json`` so a restructure that must not change behaviour can prove it did not.
Everything is built here from seeds (no downloads, no committed model files).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "mat", "log", "tree",
         "and", "then", "it", "was", "red", "blue", "green", "big", "small", "good", "great", "fine",
         "superb", "lovely", "nice", "happy", "bright", "bad", "awful", "poor", "terrible", "ugly", "sad",
         "dull", "grim", "movie", "film", "plot", "is", "this"]
POS = ["good", "great", "fine", "superb", "lovely", "nice", "happy", "bright"]
NEG = ["bad", "awful", "poor", "terrible", "ugly", "sad", "dull", "grim"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "is", "and", "it", "this"]

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}


def word_tokenizer(path: Path, kind: str) -> None:
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


def _lines(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return [" ".join([r.choice(["the", "a"]), r.choice(["cat", "dog", "bird"]), r.choice(["sat", "ran"]),
                      "on", "the", r.choice(["mat", "log", "tree"])]) for _ in range(n)]


def _sentiment(n: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [r.choice(FILLER) for _ in range(4)] + [r.choice(POS if label == "pos" else NEG) for _ in range(2)]
        r.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def build_inputs(root: Path) -> None:
    """Model directories and data files the pipeline reads, made from seeds."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = dict(LLAMA)
    model_type = cfg.pop("model_type")
    torch.manual_seed(0)
    llama = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **cfg))
    llama.save_pretrained(root / "llama")
    word_tokenizer(root / "llama", "llama")
    torch.manual_seed(1)
    bert_cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=len(WORDS) + 4)
    transformers.BertModel(bert_cfg).save_pretrained(root / "bert")
    word_tokenizer(root / "bert", "bert")
    lines = _lines(60, 0)
    (root / "train.txt").write_text("\n".join(lines[:32]) + "\n")
    (root / "held.txt").write_text("\n".join(lines[32:44]) + "\n")
    (root / "forget.txt").write_text("\n".join(lines[44:52]) + "\n")
    (root / "retain.txt").write_text("\n".join(lines[52:]) + "\n")
    (root / "cls_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sentiment(24, 0)))
    (root / "cls_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sentiment(12, 1)))


PIPELINE = """
weightflow: 1
name: golden
seed: 0
dtype: float32
steps:
  llama: {op: load, source: llama}
  bert: {op: load, source: bert, task: sequence-classification, labels: [neg, pos]}
  bert_seeded: {op: load, source: bert, task: sequence-classification, num_labels: 2, init_seed: 7}
  from_config:
    op: load
    config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
             num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 64}
    init_seed: 3
  ft_a: {op: finetune, model: llama, data: train.txt, max_steps: 3, learning_rate: 0.003, batch_size: 8}
  ft_b: {op: finetune, model: llama, data: train.txt, max_steps: 3, learning_rate: 0.002, batch_size: 8,
         shuffle_seed: 5, lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
  clf: {op: finetune, model: bert, data: cls_train.jsonl, max_steps: 3, learning_rate: 0.003, batch_size: 8}
  clf_lora: {op: finetune, model: bert_seeded, data: cls_train.jsonl, max_steps: 3, learning_rate: 0.003,
             batch_size: 8, lora: {r: 2, alpha: 4, target_modules: [query, value]}}
  u_ga: {op: unlearn, model: ft_a, method: grad-ascent, forget: forget.txt, max_steps: 2, batch_size: 4}
  u_gd: {op: unlearn, model: ft_a, method: grad-diff, forget: forget.txt, retain: retain.txt, max_steps: 2,
         batch_size: 4}
  u_npo: {op: unlearn, model: ft_a, method: npo, forget: forget.txt, retain: retain.txt, max_steps: 2, batch_size: 4}
  u_simnpo: {op: unlearn, model: ft_a, method: simnpo, forget: forget.txt, retain: retain.txt, max_steps: 2,
             batch_size: 4}
  u_ssd: {op: unlearn, model: ft_a, method: ssd, forget: forget.txt, retain: retain.txt, batch_size: 4}
  u_kl: {op: unlearn, model: ft_a, method: grad-diff, retain_loss: kl, forget: forget.txt, retain: retain.txt,
         max_steps: 2, batch_size: 4}
  da: {op: extract-delta, model: ft_a, base: llama}
  db: {op: extract-delta, model: ft_b, base: llama}
  da_shallow: {op: extract-delta, model: ft_a, base: llama, include: ["model.layers.0.*"]}
  pa: {op: dare-prune, delta: da, drop_rate: 0.7}
  pb: {op: dare-prune, delta: db, drop_rate: 0.5, selection: magnitude}
  pq: {op: dare-prune, delta: da, drop_rate: 0.7, rescale: darex-q, q: auto, model: ft_a,
       calibration: {data: train.txt, samples: 4, seq_len: 16}}
  m_linear: {op: merge, method: linear, models: [llama, ft_a, ft_b], weights: [0.2, 0.5, 0.3]}
  m_slerp: {op: merge, method: slerp, models: [ft_a, ft_b], t: 0.3}
  m_ta: {op: merge, method: task-arithmetic, base: llama, deltas: [da, db], weights: [1.0, -0.5], lambda: 0.8}
  m_ties: {op: merge, method: ties, base: llama, deltas: [da, db], density: 0.4}
  m_ties_model: {op: merge, method: ties, base: llama, deltas: [da, db], density: 0.4, trim_scope: model,
                 normalize: false}
  m_dare_ties: {op: merge, method: dare-ties, base: llama, deltas: [da, db], density: 0.5}
  m_dare_linear: {op: merge, method: dare-linear, base: llama, deltas: [da, db], density: 0.5, rescale: l1}
  m_crumbs: {op: merge, method: breadcrumbs, base: llama, deltas: [da, db], density: 0.5, gamma: 0.05}
  m_crumbs_ties: {op: merge, method: breadcrumbs, base: llama, deltas: [da, db], density: 0.5, sign_consensus: true}
  m_della: {op: merge, method: della, base: llama, deltas: [da, db], density: 0.5, epsilon: 0.1}
  m_della_l1: {op: merge, method: della, base: llama, deltas: [da, db], density: 0.5, rescale: l1,
               sign_consensus: false}
  m_pruned: {op: merge, method: ties, base: llama, deltas: [pa, pb, pq], density: 1.0}
  m_patch: {op: merge, method: task-arithmetic, base: llama, deltas: [da_shallow]}
  wanda: {op: prune-wanda, model: m_ties, sparsity: 0.5, calibration: {data: train.txt, samples: 4, seq_len: 16}}
  wanda_24: {op: prune-wanda, model: m_ties, pattern: "2:4", calibration: {data: train.txt, samples: 4, seq_len: 16}}
  magnitude: {op: prune-wanda, model: m_ties, method: magnitude, sparsity: 0.3}
  scores:
    op: evaluate
    models: [llama, ft_a, m_ties, wanda, u_npo]
    metrics:
      - {perplexity: {data: held.txt}}
      - {loss: {data: held.txt}}
      - sparsity
      - {delta_norm: {base: llama}}
  cls_scores:
    op: evaluate
    models: [bert, clf, clf_lora]
    metrics: [{accuracy: {data: cls_test.jsonl}}]
"""
