"""Merging models whose vocabularies differ: ``tokenizer: {source: union | base | STEP}``.

Tiny Llamas with real tokenizers (WordLevel, built here with the ``tokenizers`` library) whose
vocabularies share some words at other ids: rows must be matched by token string (checked by
hand on a few tokens), the merged model must load with its tokenizer, and the rows must equal
mergekit's ``tokenizer_source: union`` / ``base`` output token for token.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import config_of, perturbed_copy, read_model, run, save_tiny_llama, write_pipeline

from weightflow.dsl.lang.diagnostics import PipelineError, WeightflowError

A_TOKENS = ["<unk>", "<s>", "</s>", "apple", "banana", "cherry", "date"]
B_TOKENS = ["<s>", "<unk>", "</s>", "cherry", "egg", "apple", "fig", "grape"]
B_SPECIAL = "<|im_start|>"  # an added special token of B only (id 8)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def save_with_tokenizer(path: Path, tokens: list[str], seed: int, special: list[str] = ()) -> Path:
    """A tiny Llama whose WordLevel tokenizer has ``tokens`` (ids in order) + ``special``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    n = len(tokens) + len(special)
    cfg = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": n, "max_position_embeddings": 32,
           "bos_token_id": tokens.index("<s>"), "eos_token_id": tokens.index("</s>")}
    save_tiny_llama(path, seed=seed, config=cfg)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(special))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))
    return path


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab_models")
    a = save_with_tokenizer(root / "a", A_TOKENS, seed=1)
    b = save_with_tokenizer(root / "b", B_TOKENS, seed=2, special=[B_SPECIAL])
    a2 = perturbed_copy(a, root / "a2", seed=3)  # a fine-tune of a: same tokenizer
    return {"a": a, "b": b, "a2": a2}


@pytest.fixture(scope="module")
def merged(tmp_path_factory, vocab_models):
    tmp = tmp_path_factory.mktemp("vocab_merges")
    m = vocab_models
    text = f"""
weightflow: 1
dtype: float32
steps:
  a: {{op: load, source: {m['a']}}}
  b: {{op: load, source: {m['b']}}}
  a2: {{op: load, source: {m['a2']}}}
  da: {{op: extract-delta, model: a2, base: a}}
  union: {{op: merge, method: linear, models: [a, b], tokenizer: {{source: union}}}}
  on_base: {{op: merge, method: linear, models: [a, b], tokenizer: {{source: base}}}}
  of_b: {{op: merge, method: linear, models: [a, b], tokenizer: {{source: b}}}}
  same_vocab: {{op: merge, method: linear, models: [a, a2], weights: [0.3, 0.7], tokenizer: {{source: base}}}}
  same_vocab_plain: {{op: merge, method: linear, models: [a, a2], weights: [0.3, 0.7]}}
  delta_onto_b_vocab: {{op: merge, method: task-arithmetic, base: a, deltas: [da], lambda: 0.5,
                       tokenizer: {{source: b}}}}
  franken:
    op: merge
    method: passthrough
    slices: [{{model: a, layers: [0, 1]}}, {{model: b, layers: [1, 2]}}]
    tokenizer: {{source: union}}
  slerped: {{op: merge, method: slerp, models: [a, b], t: 0.3, tokenizer: {{source: union}}}}
outputs: {{union: out/union, on_base: out/on_base, of_b: out/of_b, delta_onto_b_vocab: out/delta,
          franken: out/franken, slerped: out/slerped}}
"""
    outcome, status = run(write_pipeline(tmp, text), tmp / "cache")
    assert set(status.values()) == {"executed"}, status
    digests = {s.name: s.digest for s in outcome.steps}
    return tmp / "out", digests


def vocab_of(directory: Path) -> dict[str, int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory).get_vocab()


def row(model: dict, tensor: str, tokens: list[str], token: str):
    return model[tensor][tokens.index(token)]


def test_union_rows_map_by_token_string(merged, vocab_models):
    out, _ = merged
    a, b = read_model(vocab_models["a"]), read_model(vocab_models["b"])
    b_tokens = B_TOKENS + [B_SPECIAL]
    ours = read_model(out / "union")
    vocab = vocab_of(out / "union")
    # the base's (first model's) tokens keep their ids; B's new ones follow in B's id order
    assert vocab == {**{t: i for i, t in enumerate(A_TOKENS)}, "egg": 7, "fig": 8, "grape": 9, B_SPECIAL: 10}
    assert config_of(out / "union")["vocab_size"] == 11
    for tensor in (EMBED, HEAD):
        assert ours[tensor].shape == (11, 16)
        for token in ("apple", "cherry", "<s>", "</s>"):  # in both: the average of the two rows
            want = (row(a, tensor, A_TOKENS, token) + row(b, tensor, b_tokens, token)) / 2
            torch.testing.assert_close(ours[tensor][vocab[token]], want)
        for token in ("banana", "date"):  # only in A: A's row (B's view borrows it)
            torch.testing.assert_close(ours[tensor][vocab[token]], row(a, tensor, A_TOKENS, token))
        for token in ("egg", "grape", B_SPECIAL):  # only in B
            torch.testing.assert_close(ours[tensor][vocab[token]], row(b, tensor, b_tokens, token))
    # tensors without a vocabulary axis: the plain average
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(ours[name], (a[name] + b[name]) / 2)


def test_merged_model_loads_with_its_tokenizer(merged, vocab_models):
    import transformers

    out, _ = merged
    tok = transformers.AutoTokenizer.from_pretrained(out / "union")
    assert tok("apple egg grape").input_ids == [3, 7, 9]
    special = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    assert special.get(B_SPECIAL) is True  # B's added special token stays special
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "union")
    assert model.config.vocab_size == 11
    b = read_model(vocab_models["b"])
    torch.testing.assert_close(model.get_input_embeddings().weight[7].detach(), row(b, EMBED, B_TOKENS, "egg"))
    with torch.no_grad():
        logits = model(torch.tensor([tok("apple egg grape").input_ids])).logits
    assert logits.shape == (1, 3, 11) and torch.isfinite(logits).all()


def test_source_step_ships_its_tokenizer_and_remaps_token_ids(merged, vocab_models):
    out, _ = merged
    a, b = read_model(vocab_models["a"]), read_model(vocab_models["b"])
    ours = read_model(out / "of_b")
    assert (out / "of_b" / "tokenizer.json").read_bytes() == (vocab_models["b"] / "tokenizer.json").read_bytes()
    cfg = config_of(out / "of_b")
    assert cfg["vocab_size"] == 9
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 2)  # '<s>' is id 1 in A (the template), 0 in B
    b_tokens = B_TOKENS + [B_SPECIAL]
    assert ours[EMBED].shape == (9, 16)
    for i, token in enumerate(b_tokens):
        want = row(b, EMBED, b_tokens, token)
        if token in A_TOKENS:
            want = (want + row(a, EMBED, A_TOKENS, token)) / 2
        torch.testing.assert_close(ours[EMBED][i], want, msg=token)


def test_base_source_on_one_vocabulary_changes_nothing(merged):
    _, digests = merged
    assert digests["same_vocab"] == digests["same_vocab_plain"]


def test_delta_merge_reads_the_delta_in_its_base_vocabulary(merged, vocab_models):
    """base a + 0.5·(a2 − a) in B's vocabulary: tokens a knows get the delta, B's other tokens
    the row of the tokenizer's model (b) and no delta."""
    import transformers

    out, _ = merged
    a, a2, b = (read_model(vocab_models[k]) for k in ("a", "a2", "b"))
    ours = read_model(out / "delta")
    b_tokens = B_TOKENS + [B_SPECIAL]
    for tensor in (EMBED, HEAD):
        for token in b_tokens:
            if token in A_TOKENS:
                base, fine = row(a, tensor, A_TOKENS, token), row(a2, tensor, A_TOKENS, token)
                want = base + 0.5 * (fine - base)
            else:
                want = row(b, tensor, b_tokens, token)
            torch.testing.assert_close(ours[tensor][b_tokens.index(token)], want, msg=f"{tensor} {token}")
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(ours[name], a[name] + 0.5 * (a2[name] - a[name]))
    assert transformers.AutoTokenizer.from_pretrained(out / "delta").get_vocab() == vocab_of(vocab_models["b"])
    transformers.AutoModelForCausalLM.from_pretrained(out / "delta")


def test_passthrough_slices_of_two_vocabularies(merged, vocab_models):
    out, _ = merged
    a, b = read_model(vocab_models["a"]), read_model(vocab_models["b"])
    ours = read_model(out / "franken")
    vocab = vocab_of(out / "franken")
    b_tokens = B_TOKENS + [B_SPECIAL]
    # embeddings from the first slice's model (a), head from the last slice's (b), both in the union
    torch.testing.assert_close(ours[EMBED][vocab["banana"]], row(a, EMBED, A_TOKENS, "banana"))
    torch.testing.assert_close(ours[EMBED][vocab["egg"]], row(b, EMBED, b_tokens, "egg"))  # a lacks it
    torch.testing.assert_close(ours[HEAD][vocab["apple"]], row(b, HEAD, b_tokens, "apple"))
    torch.testing.assert_close(ours[HEAD][vocab["date"]], row(a, HEAD, A_TOKENS, "date"))  # b lacks it
    assert torch.equal(ours["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert config_of(out / "franken")["vocab_size"] == 11


def test_slerp_in_the_union_vocabulary(merged):
    import transformers

    out, _ = merged
    assert read_model(out / "slerped")[EMBED].shape == (11, 16)
    transformers.AutoModelForCausalLM.from_pretrained(out / "slerped")


def test_a_base_row_fills_a_model_lacking_the_token(vocab_models):
    """With a base (model_stock, nearswap), a model lacking a token gets the base's row for it,
    not the mean of every model that has it (mergekit's order of rules)."""
    from weightflow.dsl.engine.context import Artifact, Inputs
    from weightflow.dsl.lang.spec import Kind
    from weightflow.ops.lib.tensors import Checkpoint
    from weightflow.ops.lib.vocab import TokenizerBuilt, VocabSurgery

    arts = {k: Artifact(Kind.MODEL, f"digest-{k}", vocab_models[k], k) for k in ("a", "a2", "b")}
    inputs = Inputs({("base",): arts["a"], ("models", 0): arts["a2"], ("models", 1): arts["b"]})
    ctx = SimpleNamespace(info={}, log=lambda m: None, warn=lambda m: None, dtype="float32")
    s = VocabSurgery(inputs, SimpleNamespace(tokenizer=TokenizerBuilt(source="union")), ctx)
    view_b = s.view(Checkpoint(vocab_models["b"]), arts["b"])
    view_a2 = s.view(Checkpoint(vocab_models["a2"]), arts["a2"])
    a, a2, b = (read_model(vocab_models[k]) for k in ("a", "a2", "b"))
    banana, egg = s.vocab["banana"], s.vocab["egg"]
    got = view_b.get(EMBED)
    torch.testing.assert_close(got[banana], row(a, EMBED, A_TOKENS, "banana"))  # base, not mean(a, a2)
    assert not torch.allclose(got[banana], (row(a, EMBED, A_TOKENS, "banana") + row(a2, EMBED, A_TOKENS, "banana")) / 2)
    torch.testing.assert_close(view_a2.get(EMBED)[egg], row(b, EMBED, B_TOKENS, "egg"))  # base lacks it: b's
    torch.testing.assert_close(view_a2.get(EMBED, 3, 5), view_a2.get(EMBED)[3:5])  # row ranges agree
    s.close()


def mergekit_merge(config: dict, out: Path) -> dict:
    merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed")
    from mergekit.config import MergeConfiguration

    merge.run_merge(MergeConfiguration.model_validate(config), str(out),
                    merge.MergeOptions(cuda=False, quiet=True, write_model_card=False))
    return read_model(out)


@pytest.mark.parametrize("source, step, base", [("union", "union", None), ("base", "on_base", "a"),
                                                 ("model b", "of_b", None)])
def test_rows_match_mergekit_token_for_token(merged, vocab_models, tmp_path, source, step, base):
    out, _ = merged
    if source == "model b":
        source = str(vocab_models["b"])
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": source,
           "models": [{"model": str(vocab_models[k]), "parameters": {"weight": 1.0}} for k in ("a", "b")]}
    if base:
        cfg["base_model"] = str(vocab_models[base])
    theirs = mergekit_merge(cfg, tmp_path / "mk")
    ours = read_model(out / step)
    v_ours, v_theirs = vocab_of(out / step), vocab_of(tmp_path / "mk")
    assert set(v_ours) == set(v_theirs)  # mergekit's union ids follow a hash map's order: match by string
    assert set(ours) == set(theirs)
    for name in ours:
        if name in (EMBED, HEAD):
            for token, i in v_ours.items():
                torch.testing.assert_close(ours[name][i], theirs[name][v_theirs[token]], msg=f"{name} {token}")
        else:
            torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_params_json_without_tokenizer_is_unchanged(tmp_path, vocab_models):
    """Step keys hash params_json: without `tokenizer:` it is exactly what it was before the field."""
    from weightflow.dsl.lang.pipeline import load_pipeline

    m = vocab_models
    text = f"""
weightflow: 1
steps:
  a: {{op: load, source: {m['a']}}}
  a2: {{op: load, source: {m['a2']}}}
  da: {{op: extract-delta, model: a2, base: a}}
  lin: {{op: merge, method: linear, models: [a, a2], weights: [0.3, 0.7]}}
  ties: {{op: merge, method: ties, base: a, deltas: [da], density: 0.5}}
  tok: {{op: merge, method: linear, models: [a, a2], tokenizer: {{source: a2}}}}
"""
    steps = load_pipeline(write_pipeline(tmp_path, text)).steps
    assert steps["lin"].params_json() == {"dtype": "float32", "method": "linear", "models": ["a", "a2"],
                                          "weights": [0.3, 0.7], "normalize": True}
    assert steps["ties"].params_json() == {"dtype": "float32", "base": "a", "deltas": ["da"], "weights": None,
                                           "lambda": 1.0, "vocab": "error", "method": "ties", "density": 0.5,
                                           "normalize": True, "trim_scope": "tensor"}
    assert steps["tok"].params_json()["tokenizer"] == {"source": "a2"}
    assert ("a2", ("tokenizer", "source")) in [(e.source, e.field) for e in steps["tok"].inputs]


def _error(tmp_path, store_dir, vocab_models, steps: str, extra_models: dict | None = None) -> str:
    m = {**vocab_models, **(extra_models or {})}
    loads = "\n".join(f"  {k}: {{op: load, source: {v}}}" for k, v in m.items())
    text = f"weightflow: 1\nsteps:\n{loads}\n{steps}\n"
    with pytest.raises(WeightflowError) as exc:
        run(write_pipeline(tmp_path, text), store_dir)
    if isinstance(exc.value, PipelineError):
        return "\n".join(d.format() for d in exc.value.diagnostics)
    return str(exc.value)


def test_vocab_and_tokenizer_together_is_an_error(tmp_path, store_dir, vocab_models):
    text = _error(tmp_path, store_dir, vocab_models, "  da: {op: extract-delta, model: a2, base: a}\n"
                  "  m: {op: merge, method: ties, base: a, deltas: [da], density: 0.5, vocab: pad, "
                  "tokenizer: {source: union}}")
    assert "not both" in text and "step 'm'" in text


def test_unknown_tokenizer_step_is_an_error(tmp_path, store_dir, vocab_models):
    text = _error(tmp_path, store_dir, vocab_models,
                  "  m: {op: merge, method: linear, models: [a, b], tokenizer: {source: nope}}")
    assert "nope" in text and "step 'm'" in text


def test_model_without_tokenizer_files_is_a_clear_error(tmp_path, store_dir, vocab_models):
    bare = save_tiny_llama(tmp_path / "bare", seed=5, config={
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 12, "max_position_embeddings": 32})
    text = _error(tmp_path, store_dir, vocab_models,
                  "  m: {op: merge, method: linear, models: [a, bare], tokenizer: {source: union}}",
                  {"bare": bare})
    assert "no tokenizer files" in text and "'bare'" in text and "Traceback" not in text


def test_delta_of_an_unseen_base_is_a_clear_error(tmp_path, store_dir, vocab_models):
    text = _error(tmp_path, store_dir, vocab_models,
                  "  da: {op: extract-delta, model: a2, base: a}\n"
                  "  m: {op: merge, method: task-arithmetic, base: b, deltas: [da], tokenizer: {source: base}}")
    assert "taken against a base that is not a model of this step" in text


def test_vocabulary_views_do_not_depend_on_row_chunks(tmp_path, store_dir, vocab_models, monkeypatch):
    from weightflow.ops.lib import tensors

    m = vocab_models
    text = f"""
weightflow: 1
steps:
  a: {{op: load, source: {m['a']}}}
  b: {{op: load, source: {m['b']}}}
  u: {{op: merge, method: linear, models: [b, a], weights: [0.2, 0.8], tokenizer: {{source: union}}}}
"""
    path = write_pipeline(tmp_path, text)
    whole, _ = run(path, store_dir)
    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", 40)  # embeddings now span several row chunks
    chunked, _ = run(path, tmp_path / "cache2")
    assert [s.digest for s in whole.steps] == [s.digest for s in chunked.steps]


@pytest.mark.parametrize("source, valid", [("union", True), ("base", True), ("some_step", True), (3, False)])
def test_json_schema_takes_every_tokenizer_source(source, valid):
    """An editor checking with the exported schema accepts a keyword (which also reads as a
    step name) as well as a step name."""
    import jsonschema

    from weightflow.dsl.lang.schema import language_schema

    doc = {"weightflow": 1, "steps": {
        "a": {"op": "load", "source": "./a"},
        "m": {"op": "merge", "method": "linear", "models": ["a"], "tokenizer": {"source": source}}}}
    errors = list(jsonschema.Draft202012Validator(language_schema()).iter_errors(doc))
    assert (not errors) == valid


def test_fine_tune_with_added_tokens_merges_as_mergekit(tmp_path, store_dir, vocab_models):
    """mergekit's most reported case: a fine-tune that added tokens, merged onto its base by task
    arithmetic.  In weightflow: bring the base into the fine-tune's vocabulary (a passthrough
    with ``tokenizer:``; the new rows are the fine-tune's), take the delta against that, merge."""
    import transformers

    plus = tmp_path / "a_plus"
    tok = transformers.AutoTokenizer.from_pretrained(vocab_models["a"])
    tok.add_tokens(["<tool>", "</tool>"], special_tokens=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(vocab_models["a"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    torch.manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(plus)
    tok.save_pretrained(plus)
    text = f"""
weightflow: 1
dtype: float32
steps:
  a: {{op: load, source: {vocab_models['a']}}}
  plus: {{op: load, source: {plus}}}
  a_big: {{op: merge, method: passthrough, models: [a], tokenizer: {{source: plus}}}}
  d: {{op: extract-delta, model: plus, base: a_big}}
  m: {{op: merge, method: task-arithmetic, base: a_big, deltas: [d], weights: [0.5]}}
outputs: {{m: out/m}}
"""
    run(write_pipeline(tmp_path, text), store_dir)
    theirs = mergekit_merge({"merge_method": "task_arithmetic", "dtype": "float32", "tokenizer_source": "union",
                             "base_model": str(vocab_models["a"]),
                             "models": [{"model": str(plus), "parameters": {"weight": 0.5}}]}, tmp_path / "mk")
    ours = read_model(tmp_path / "out" / "m")
    v_ours, v_theirs = vocab_of(tmp_path / "out" / "m"), vocab_of(tmp_path / "mk")
    assert set(v_ours) == set(v_theirs) and len(v_ours) == len(A_TOKENS) + 2
    for name in ours:
        if name in (EMBED, HEAD):
            for token, i in v_ours.items():
                torch.testing.assert_close(ours[name][i], theirs[name][v_theirs[token]], msg=f"{name} {token}")
        else:
            torch.testing.assert_close(ours[name], theirs[name], msg=name)
    plus_model = read_model(plus)  # the added tokens' rows: the fine-tune's (no delta for them)
    torch.testing.assert_close(ours[EMBED][v_ours["<tool>"]], plus_model[EMBED][v_ours["<tool>"]])
