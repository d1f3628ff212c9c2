"""The first ops end to end: load local directories, extract deltas, merge."""

from __future__ import annotations

import torch
from conftest import config_of, read_model, run, write_pipeline

PIPE = """
weightflow: 1
name: ta
vars: {{wa: 0.7, wb: -0.3}}
steps:
  base: {{op: load, source: {base}}}
  ft_a: {{op: load, source: {ft_a}}}
  ft_b: {{op: load, source: {ft_b}}}
  delta_a: {{op: extract-delta, model: ft_a, base: base}}
  delta_b: {{op: extract-delta, model: ft_b, base: base}}
  merged:
    op: merge
    method: task-arithmetic
    base: base
    deltas: [delta_a, delta_b]
    weights: ["${{vars.wa}}", "${{vars.wb}}"]
  averaged:
    op: merge
    method: linear
    models: [base, ft_a, ft_b]
    weights: [1.0, 2.0, 3.0]
    normalize: true
outputs:
  merged: out/merged
  averaged: out/averaged
  delta_a: out/delta_a
"""


def make(tmp_path, tiny_models, text=PIPE):
    return write_pipeline(tmp_path, text.format(**{k: str(v) for k, v in tiny_models.items()}))


def test_task_arithmetic_is_exactly_base_plus_weighted_deltas(tmp_path, tiny_models, store_dir):
    path = make(tmp_path, tiny_models)
    outcome, status = run(path, store_dir)
    assert set(status.values()) == {"executed"}
    base, a, b = (read_model(tiny_models[k]) for k in ("base", "ft_a", "ft_b"))
    merged = read_model(tmp_path / "out" / "merged")
    assert set(merged) == set(base)
    for name, t in base.items():
        da = a[name].float() - t.float()
        db = b[name].float() - t.float()
        expected = t.float() + (da * 0.7 + db * -0.3)
        assert torch.equal(merged[name], expected), name
    # the delta itself is exactly model - base, and remembers its base
    delta = read_model(tmp_path / "out" / "delta_a")
    for name, t in delta.items():
        assert torch.equal(t, a[name].float() - base[name].float())


def test_linear_normalized_is_weighted_average(tmp_path, tiny_models, store_dir):
    path = make(tmp_path, tiny_models)
    run(path, store_dir)
    models = [read_model(tiny_models[k]) for k in ("base", "ft_a", "ft_b")]
    avg = read_model(tmp_path / "out" / "averaged")
    for name in models[0]:
        expected = (models[0][name] * 1 + models[1][name] * 2 + models[2][name] * 3) / 6
        torch.testing.assert_close(avg[name], expected, rtol=1e-6, atol=1e-7)
    assert config_of(tmp_path / "out" / "averaged")["model_type"] == "llama"


def test_exported_model_loads_with_plain_transformers(tmp_path, tiny_models, store_dir):
    import transformers

    path = make(tmp_path, tiny_models)
    run(path, store_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    merged = read_model(tmp_path / "out" / "merged")
    sd = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(sd[name], t), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256)


def test_patching_onto_another_base_warns_naming_both(tmp_path, tiny_models, store_dir):
    text = """
    weightflow: 1
    steps:
      base: {{op: load, source: {base}}}
      other: {{op: load, source: {other}}}
      ft_a: {{op: load, source: {ft_a}}}
      delta_a: {{op: extract-delta, model: ft_a, base: base}}
      patched: {{op: merge, method: task-arithmetic, base: other, deltas: [delta_a], weights: [0.5]}}
    outputs: {{patched: out/patched}}
    """
    path = make(tmp_path, tiny_models, text)
    outcome, _ = run(path, store_dir)
    warnings = [m for m in outcome.logs if m.startswith("warning")]
    assert any("'base'" in m and "'other'" in m and "patching" in m for m in warnings), warnings
    other, a, base = (read_model(tiny_models[k]) for k in ("other", "ft_a", "base"))
    patched = read_model(tmp_path / "out" / "patched")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(patched[name], other[name] + (a[name] - base[name]) * 0.5)


def test_include_exclude_and_dtype(tmp_path, tiny_models, store_dir):
    text = """
    weightflow: 1
    dtype: bfloat16
    steps:
      base: {{op: load, source: {base}}}
      ft_a: {{op: load, source: {ft_a}, dtype: float32}}
      delta_a: {{op: extract-delta, model: ft_a, base: base, include: ["model.layers.0.*"], exclude: ["*norm*"]}}
      merged: {{op: merge, method: task-arithmetic, base: base, deltas: [delta_a]}}
    outputs: {{delta_a: out/delta, merged: out/merged, base: out/base}}
    """
    path = make(tmp_path, tiny_models, text)
    run(path, store_dir)
    delta = read_model(tmp_path / "out" / "delta")
    assert delta and all(n.startswith("model.layers.0.") and "norm" not in n for n in delta)
    assert all(t.dtype == torch.float32 for t in delta.values())
    merged = read_model(tmp_path / "out" / "merged")
    base = read_model(tmp_path / "out" / "base")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert config_of(tmp_path / "out" / "merged")["torch_dtype"] == "bfloat16"
    # tensors outside the delta are the base's, untouched
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_mismatched_architectures_name_the_first_differing_tensor(tmp_path, tiny_models, store_dir):
    import pytest
    from conftest import TINY_LLAMA, save_tiny_llama

    from weightflow.dsl.lang.diagnostics import StepFailed

    wide = save_tiny_llama(tmp_path / "wide", config={**TINY_LLAMA, "intermediate_size": 96})
    text = f"""
    weightflow: 1
    steps:
      base: {{op: load, source: {tiny_models['base']}}}
      wide: {{op: load, source: {wide}}}
      d: {{op: extract-delta, model: wide, base: base}}
    """
    path = write_pipeline(tmp_path, text)
    with pytest.raises(StepFailed) as exc:
        run(path, store_dir)
    msg = str(exc.value)
    assert "pipeline.yaml:5:3: step 'd'" in msg, msg
    assert "'model.layers.0.mlp.down_proj.weight'" in msg and "[64, 96]" in msg and "[64, 128]" in msg, msg
    # the loads before the failure stay cached
    from weightflow.dsl.engine.planner import plan
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    statuses = {s.name: s.status for s in plan(load_pipeline(path), Store(store_dir))}
    assert statuses == {"base": "cached", "wide": "cached", "d": "pending"}


def test_load_from_config_is_deterministic_and_classifier_head(tmp_path, store_dir):
    text = """
    weightflow: 1
    steps:
      a: {op: load, config: {model_type: bert, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                             intermediate_size: 64, vocab_size: 100},
          task: sequence-classification, num_labels: 3, init_seed: 7}
    outputs: {a: out/a}
    """
    path = write_pipeline(tmp_path, text)
    o1, _ = run(path, store_dir)
    o2, _ = run(path, tmp_path / "cache2")
    assert o1.steps[0].digest == o2.steps[0].digest
    sd = read_model(tmp_path / "out" / "a")
    assert sd["classifier.weight"].shape == (3, 32)
    assert config_of(tmp_path / "out" / "a")["architectures"] == ["BertForSequenceClassification"]


def test_pickle_only_directory_is_refused(tmp_path, store_dir):
    import pytest

    from weightflow.dsl.lang.diagnostics import PipelineError

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    path = write_pipeline(tmp_path, f"weightflow: 1\nsteps:\n  m: {{op: load, source: {d}}}\n")
    with pytest.raises(PipelineError) as exc:
        run(path, store_dir)
    text = exc.value.diagnostics[0].format()
    assert "pipeline.yaml:3:" in text and "step 'm'" in text and "pickle" in text


def test_row_chunked_streaming_gives_identical_bytes(tmp_path, tiny_models, store_dir, monkeypatch):
    """Big tensors are processed in row chunks; the result must not depend on the chunking."""
    from weightflow.ops.lib import tensors

    path = make(tmp_path, tiny_models)
    whole, _ = run(path, store_dir)
    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", 100)  # every matrix now spans many chunks
    assert len(list(tensors.row_ranges((256, 64)))) == 256 and len(list(tensors.row_ranges((64,)))) == 1
    chunked, status = run(path, tmp_path / "cache-chunked")
    assert set(status.values()) == {"executed"}
    assert {s.name: s.digest for s in chunked.steps} == {s.name: s.digest for s in whole.steps}
