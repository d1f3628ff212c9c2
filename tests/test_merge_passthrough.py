"""``passthrough``: frankenmerges stacked from layer slices, checked against mergekit's passthrough
with ``slices:`` and against a model stacked by hand with transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import config_of, read_model, run, save_tiny_llama, write_pipeline

from weightflow.dsl.lang.diagnostics import PipelineError, WeightflowError

LLAMA4 = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("passthrough_models")
    return {"a": save_tiny_llama(root / "a", seed=10, config=LLAMA4),
            "b": save_tiny_llama(root / "b", seed=11, config=LLAMA4)}


SCALE = '[{pattern: "*o_proj*", value: 0.5}, {pattern: "*", value: 1.0}]'


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, llamas):
    tmp = tmp_path_factory.mktemp("passthrough")
    text = f"""
weightflow: 1
dtype: float32
steps:
  a: {{op: load, source: {llamas['a']}}}
  b: {{op: load, source: {llamas['b']}}}
  franken:
    op: merge
    method: passthrough
    slices:
      - {{model: a, layers: [0, 3]}}
      - {{model: b, layers: [1, 4], scale: {SCALE}}}
  with_base:
    op: merge
    method: passthrough
    base: b
    slices: [{{model: a, layers: [0, 2]}}, {{model: a, layers: [1, 3]}}]
  copy: {{op: merge, method: passthrough, models: [a]}}
  doubled: {{op: merge, method: passthrough, models: [a], scale: 2.0}}
outputs: {{franken: out/franken, with_base: out/with_base, copy: out/copy, doubled: out/doubled}}
"""
    _, status = run(write_pipeline(tmp, text), tmp / "cache")
    assert set(status.values()) == {"executed"}, status
    return tmp / "out"


def mergekit_slices(slices: list[dict], out) -> dict:
    merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed")
    from mergekit.config import MergeConfiguration

    cfg = MergeConfiguration.model_validate({"merge_method": "passthrough", "dtype": "float32",
                                             "slices": [{"sources": [s]} for s in slices]})
    merge.run_merge(cfg, str(out), merge.MergeOptions(cuda=False, copy_tokenizer=False, quiet=True,
                                                     write_model_card=False))
    return read_model(out)


def test_slices_match_mergekit(stacked, llamas, tmp_path):
    theirs = mergekit_slices([
        {"model": str(llamas["a"]), "layer_range": [0, 3]},
        {"model": str(llamas["b"]), "layer_range": [1, 4],
         "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}},
    ], tmp_path / "mk")
    ours = read_model(stacked / "franken")
    assert set(ours) == set(theirs)
    assert "model.layers.5.mlp.up_proj.weight" in ours and "model.layers.6.mlp.up_proj.weight" not in ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    assert config_of(stacked / "franken")["num_hidden_layers"] == 6
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"] == 6


def test_slices_renumber_layers_and_take_ends_as_mergekit(stacked, llamas):
    """Independent of mergekit: layer k of the output is the k-th layer of the ranges, the
    embeddings are the first slice's model's, the norm and head the last slice's."""
    a, b = read_model(llamas["a"]), read_model(llamas["b"])
    ours = read_model(stacked / "franken")
    sources = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    for k, (src, layer) in enumerate(sources):
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(ours[f"model.layers.{k}.{part}"], src[f"model.layers.{layer}.{part}"])
        factor = 0.5 if src is b else 1.0
        assert torch.equal(ours[f"model.layers.{k}.self_attn.o_proj.weight"],
                           src[f"model.layers.{layer}.self_attn.o_proj.weight"] * factor)
    assert torch.equal(ours["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(ours["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(ours["lm_head.weight"], b["lm_head.weight"])


def test_stacked_model_loads_and_matches_a_hand_stacked_model(stacked, llamas):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(stacked / "franken")
    assert model.config.num_hidden_layers == 6
    a = transformers.AutoModelForCausalLM.from_pretrained(llamas["a"])
    b = transformers.AutoModelForCausalLM.from_pretrained(llamas["b"])
    cfg = transformers.AutoConfig.from_pretrained(llamas["a"])
    cfg.num_hidden_layers = 6
    hand = transformers.AutoModelForCausalLM.from_config(cfg)
    hand.model.embed_tokens.load_state_dict(a.model.embed_tokens.state_dict())
    hand.model.norm.load_state_dict(b.model.norm.state_dict())
    hand.lm_head.load_state_dict(b.lm_head.state_dict())
    for k, (src, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        hand.model.layers[k].load_state_dict(src.model.layers[layer].state_dict())
        if src is b:
            with torch.no_grad():
                hand.model.layers[k].self_attn.o_proj.weight.mul_(0.5)
    ids = torch.tensor([[1, 5, 9, 33, 2, 70, 11]])
    with torch.no_grad():
        got, want = model(ids).logits, hand(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_base_gives_embeddings_norm_and_head(stacked, llamas):
    a, b = read_model(llamas["a"]), read_model(llamas["b"])
    ours = read_model(stacked / "with_base")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[name], b[name])
    assert torch.equal(ours["model.layers.2.self_attn.k_proj.weight"], a["model.layers.1.self_attn.k_proj.weight"])
    assert config_of(stacked / "with_base")["num_hidden_layers"] == 4


def test_plain_passthrough_copies_or_scales_one_model(stacked, llamas):
    a = read_model(llamas["a"])
    copy, doubled = read_model(stacked / "copy"), read_model(stacked / "doubled")
    assert set(copy) == set(a)
    for name, t in a.items():
        assert torch.equal(copy[name], t)
        assert torch.equal(doubled[name], t * 2)
    assert config_of(stacked / "copy")["num_hidden_layers"] == 4


def test_per_layer_config_lists_are_sliced(tmp_path, store_dir):
    """Qwen3's layer_types has one entry per layer: it is cut and joined with the layers."""
    import transformers

    cfg = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 96,
           "max_position_embeddings": 64, "sliding_window": 8, "use_sliding_window": True,
           "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}
    qa = save_tiny_llama(tmp_path / "qa", seed=1, config=cfg)
    other = dict(cfg, layer_types=["full_attention"] * 4)
    qb = save_tiny_llama(tmp_path / "qb", seed=2, config=other)
    text = f"""
weightflow: 1
dtype: float32
steps:
  a: {{op: load, source: {qa}}}
  b: {{op: load, source: {qb}}}
  m: {{op: merge, method: passthrough, slices: [{{model: a, layers: [1, 3]}}, {{model: b, layers: [0, 1]}}]}}
outputs: {{m: out/m}}
"""
    run(write_pipeline(tmp_path, text), store_dir)
    got = config_of(tmp_path / "out" / "m")
    assert got["num_hidden_layers"] == 3
    assert got["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "m")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5, 6]])).logits).all()


def _fails(tmp_path, store_dir, llamas, merge: str) -> str:
    text = f"""
weightflow: 1
steps:
  a: {{op: load, source: {llamas['a']}}}
  b: {{op: load, source: {llamas['b']}}}
  m: {{op: merge, method: passthrough, {merge}}}
"""
    with pytest.raises(WeightflowError) as exc:  # PipelineError before running, StepFailed after
        run(write_pipeline(tmp_path, text), store_dir)
    if isinstance(exc.value, PipelineError):
        return "\n".join(d.format() for d in exc.value.diagnostics)
    return str(exc.value)


@pytest.mark.parametrize("merge, says", [
    ("slices: [{model: a, layers: [2, 6]}]", "it has 4 layers"),
    ("slices: [{model: a, layers: [2, 2]}]", "0 <= first < end"),
    ("slices: [{model: a, layers: [0, 2]}], models: [a]", "either slices"),
    ("slices: [{model: nope, layers: [0, 2]}]", "nope"),
    ("models: [a, b]", "models"),
])
def test_bad_slices_are_clear_errors(tmp_path, store_dir, llamas, merge, says):
    text = _fails(tmp_path, store_dir, llamas, merge)
    assert says in text and "step 'm'" in text
    assert "Traceback" not in text


def test_slice_models_are_edges_of_the_graph(tmp_path, llamas):
    from weightflow.dsl.lang.pipeline import load_pipeline

    text = f"""
weightflow: 1
steps:
  a: {{op: load, source: {llamas['a']}}}
  b: {{op: load, source: {llamas['b']}}}
  m: {{op: merge, method: passthrough, slices: [{{model: b, layers: [0, 1]}}, {{model: a, layers: [0, 1]}}]}}
"""
    step = load_pipeline(write_pipeline(tmp_path, text)).steps["m"]
    assert [(e.source, e.field) for e in step.inputs] == [("b", ("slices", 0, "model")),
                                                          ("a", ("slices", 1, "model"))]


def test_bert_encoder_layers_are_sliced(tmp_path, store_dir):
    """BERT names its blocks encoder.layer.N; embeddings and pooler are not layers."""
    import transformers

    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    text = f"""
weightflow: 1
dtype: float32
steps:
  bert: {{op: load, source: {tmp_path / 'bert'}}}
  m: {{op: merge, method: passthrough, slices: [{{model: bert, layers: [2, 4]}}, {{model: bert, layers: [0, 1]}}]}}
outputs: {{m: out/m}}
"""
    run(write_pipeline(tmp_path, text), store_dir)
    src, ours = read_model(tmp_path / "bert"), read_model(tmp_path / "out" / "m")
    for k, layer in enumerate([2, 3, 0]):
        name = "encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(ours[name.format(k)], src[name.format(layer)])
    assert "encoder.layer.3.output.dense.weight" not in ours
    for name in (n for n in src if not n.startswith("encoder.layer.")):
        assert torch.equal(ours[name], src[name])
    model = transformers.AutoModel.from_pretrained(tmp_path / "out" / "m")
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).last_hidden_state).all()
