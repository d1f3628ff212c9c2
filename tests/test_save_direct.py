"""finetune / unlearn / prune-wanda save their model straight from memory into the store
(``models.save_model``): every file is byte-identical to what ``save_pretrained`` followed by
importing that directory gives (the path this replaced), for tied and untied heads, GPT-2's
Conv1D, a BERT classifier and a cast to bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from weightflow.dsl.engine.context import RunContext
from weightflow.ops.lib import models
from weightflow.ops.load import import_directory

SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96}


def _ctx(out: Path) -> RunContext:
    out.mkdir(parents=True)
    return RunContext(step="s", out=out, seed=0, dtype="float32", pipeline_dir=out.parent, names={},
                      shard_bytes=1 << 20, show_progress=False, warn=lambda m: None)


def _finish(ctx: RunContext) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ctx.out.iterdir())}


def _old_path(model, src: Path, out: Path, dtype: str) -> dict[str, bytes]:
    ctx = _ctx(out)
    tmp = out.parent / f"{out.name}-saved"
    model.save_pretrained(tmp, safe_serialization=True)
    for f in src.iterdir():
        if f.name not in models.WEIGHT_SIDE_FILES and not (tmp / f.name).exists():
            (tmp / f.name).write_bytes(f.read_bytes())
    meta = import_directory(tmp, ctx, dtype)
    return {**_finish(ctx), "meta": repr(sorted(meta.items())).encode()}


def _new_path(model, src: Path, out: Path, dtype: str) -> dict[str, bytes]:
    ctx = _ctx(out)
    assert models.saved_state(model) is not None  # the direct path, not the fallback
    meta = models.save_model(model, src, ctx, dtype)
    return {**_finish(ctx), "meta": repr(sorted(meta.items())).encode()}


CASES = {
    "llama-tied": (transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                            tie_word_embeddings=True, **SMALL), transformers.AutoModelForCausalLM),
    "llama-untied": (transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                              tie_word_embeddings=False, **SMALL), transformers.AutoModelForCausalLM),
    "gpt2": (transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, bos_token_id=0,
                                     eos_token_id=0), transformers.AutoModelForCausalLM),
    "bert-classifier": (transformers.BertConfig(hidden_size=32, intermediate_size=64, num_labels=3, **SMALL),
                        transformers.AutoModelForSequenceClassification),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_direct_save_writes_the_bytes_save_pretrained_and_import_wrote(tmp_path, case, dtype):
    cfg, auto = CASES[case]
    torch.manual_seed(0)
    model = auto.from_config(cfg)
    with torch.no_grad():  # weights a training step would have changed, with a zero or two
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        next(iter(model.parameters())).view(-1)[:3] = 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (src / "config.json").write_text("{}\n")  # the input's own config is never copied over the model's
    old = _old_path(model, src, tmp_path / "old", dtype)
    new = _new_path(model, src, tmp_path / "new", dtype)
    assert sorted(old) == sorted(new)
    for name in old:
        assert old[name] == new[name], name
    assert "tokenizer_config.json" in new and any(n.endswith(".safetensors") for n in new)


def test_a_peft_or_quantized_model_takes_the_save_pretrained_path():
    model = transformers.AutoModelForCausalLM.from_config(CASES["llama-tied"][0])
    assert models.saved_state(model) is not None
    model._hf_peft_config_loaded = True
    assert models.saved_state(model) is None
