"""Export formats other tools read: a Delta as dense safetensors with the model's tensor names
(the default) or in the compact bitmask encoding; a LoRA-trained model as a PEFT adapter that
peft loads onto the base and that gives the fine-tuned model's logits."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from conftest import read_model, run, save_tiny_llama, write_pipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MARKER = "weightflow-export.json"
SMALL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64, "max_position_embeddings": 64}



def lock(path) -> dict:
    return yaml.safe_load(path.with_suffix(".lock").read_text())["steps"]


def obj(store_dir, digest):
    return store_dir / "objects" / digest[:2] / digest


def toy_model(path, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["Toy"]}))
    return path


@pytest.fixture
def dare_project(tmp_path, store_dir):
    """A DARE-pruned delta (stored sparse, sharded) and its unpruned source, run once."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 200, generator=g), "v": torch.randn(128, 64, generator=g),
            "b": torch.randn(16, generator=g)}
    ft = {k: t + 0.1 * torch.randn(t.shape, generator=g) for k, t in base.items()}
    b, f = toy_model(tmp_path / "base", base), toy_model(tmp_path / "ft", ft)
    path = write_pipeline(tmp_path, f"""
weightflow: 1
seed: 3
steps:
  base: {{op: load, source: {b}}}
  ft: {{op: load, source: {f}}}
  d: {{op: extract-delta, model: ft, base: base}}
  p: {{op: dare-prune, delta: d, drop_rate: 0.9, exclude: [w]}}
outputs: {{p: out/p}}
""")
    # two shards: the sparse v and b in the first, w (excluded from DARE: stored dense) in the second
    run(path, store_dir, shard_bytes=100_000)
    return path


def test_delta_exports_dense_by_default_with_the_model_tensor_names(dare_project, store_dir, tmp_path, cli):
    stored = obj(store_dir, lock(dare_project)["p"]["digest"])
    assert any("::mask" in k for f in stored.glob("delta*.safetensors") for k in load_file(f))  # stored sparse
    want = read_model(stored)  # decoded by weightflow's own reader
    for out in (tmp_path / "out" / "p", tmp_path / "exported"):  # `outputs:` and `weightflow export`
        if out.name == "exported":
            rc, _, err = cli("export", dare_project, "p", out, "--cache-dir", store_dir)
            assert rc == 0, err
        shards = sorted(out.glob("delta*.safetensors"))
        assert len(shards) > 1
        got = {}
        for f in shards:  # plain safetensors: readable by safetensors alone, no weightflow metadata
            with safe_open(str(f), framework="pt") as fh:
                assert "weightflow.sparse" not in (fh.metadata() or {})
                got.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
        assert set(got) == {"w", "v", "b"}
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), name
        assert (got["v"] != 0).float().mean().item() == pytest.approx(0.1, abs=0.02)  # still DARE-pruned
        index = json.loads((out / "delta.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == {"w", "v", "b"}
        assert all((out / f).is_file() for f in index["weight_map"].values())
        marker = json.loads((out / MARKER).read_text())
        assert marker["format"] == "dense" and marker["digest"] == stored.name


def test_delta_exports_as_stored_with_format_bitmask(dare_project, store_dir, tmp_path, cli):
    stored = obj(store_dir, lock(dare_project)["p"]["digest"])
    dense_dir, packed_dir = tmp_path / "dense", tmp_path / "packed"
    assert cli("export", dare_project, "p", dense_dir, "--cache-dir", store_dir)[0] == 0
    rc, out, err = cli("export", dare_project, "p", packed_dir, "--cache-dir", store_dir, "--format", "bitmask")
    assert rc == 0, err
    assert "as bitmask" in out
    for f in stored.glob("delta*.safetensors"):  # the store's encoding, byte for byte
        assert (packed_dir / f.name).read_bytes() == f.read_bytes()
    size = {d: sum(f.stat().st_size for f in d.glob("delta*.safetensors")) for d in (dense_dir, packed_dir)}
    v_dense = 128 * 64 * 4
    assert size[dense_dir] - size[packed_dir] > 0.8 * v_dense  # v's 90% zeros are not stored
    assert any("v::mask" in load_file(f) for f in packed_dir.glob("delta*.safetensors"))
    assert json.loads((packed_dir / MARKER).read_text())["format"] == "bitmask"
    # the same digest in another format is not "up to date": the directory is rewritten
    rc, out, err = cli("export", dare_project, "p", packed_dir, "--cache-dir", store_dir, "--format", "dense")
    assert rc == 0 and "up to date" not in out, err
    assert json.loads((packed_dir / MARKER).read_text())["format"] == "dense"
    assert not any("::" in k for f in packed_dir.glob("delta*.safetensors") for k in load_file(f))


def test_formats_that_do_not_fit_the_step_are_clear_errors(dare_project, store_dir, tmp_path, cli):
    cases = [("base", "bitmask", "compact encoding of a Delta"), ("p", "peft", "LoRA adapter of a trained model"),
             ("d", "peft", "produces a Delta")]
    for step, fmt, why in cases:
        target = tmp_path / f"x-{step}-{fmt}"
        rc, _, err = cli("export", dare_project, step, target, "--cache-dir", store_dir, "--format", fmt)
        assert rc == 2, err
        assert f"--format {fmt}" in err and why in err and f"step '{step}'" in err, err
        assert "Traceback" not in err and not target.exists()


# -- PEFT -------------------------------------------------------------------------------

def token_rows(n: int, seed: int, vocab: int, labels: bool = False) -> list[dict]:
    r = random.Random(seed)
    rows = [{"input_ids": [r.randrange(1, vocab) for _ in range(10)]} for _ in range(n)]
    if labels:
        for i, row in enumerate(rows):
            row["label"] = i % 2
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def logits(model, rows) -> torch.Tensor:
    """One example at a time (a classifier without a pad token takes batches of one)."""
    with torch.no_grad():
        return torch.cat([model(torch.tensor([r["input_ids"]])).logits for r in rows])


@pytest.fixture(scope="module")
def lora_project(tmp_path_factory):
    """Two LoRA fine-tunes of one tiny Llama (one keeps its adapter), a LoRA classifier with a
    trained head (modules_to_save), and a full fine-tune; run once."""
    root = tmp_path_factory.mktemp("lora")
    store_dir = root / "cache"
    base = save_tiny_llama(root / "base", seed=0, config=SMALL)
    write_jsonl(root / "train.jsonl", token_rows(16, 0, 64))
    write_jsonl(root / "labelled.jsonl", token_rows(16, 1, 64, labels=True))
    lora = "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"
    path = write_pipeline(root, f"""
weightflow: 1
seed: 0
steps:
  base: {{op: load, source: {base}}}
  lora: {{op: finetune, model: base, data: train.jsonl, max_steps: 6, learning_rate: 0.02, batch_size: 4,
          lora: {lora}}}
  kept: {{op: finetune, model: base, data: train.jsonl, max_steps: 6, learning_rate: 0.02, batch_size: 4,
          lora: {{r: 2, alpha: 4, target_modules: [o_proj], keep_adapter: true}}}}
  full: {{op: finetune, model: base, data: train.jsonl, max_steps: 2, learning_rate: 0.01, batch_size: 4}}
  cls_base: {{op: load, source: {base}, task: sequence-classification, num_labels: 2}}
  cls: {{op: finetune, model: cls_base, data: labelled.jsonl, max_steps: 6, learning_rate: 0.02,
         batch_size: 4, lora: {lora}}}
""")
    run(path, store_dir)
    return path, store_dir


def test_lora_model_exports_as_a_peft_adapter_that_reproduces_its_logits(lora_project, tmp_path, cli):
    import transformers
    from peft import PeftModel

    path, store_dir = lora_project
    steps = lock(path)
    target = tmp_path / "adapter"
    rc, out, err = cli("export", path, "lora", target, "--cache-dir", store_dir, "--format", "peft")
    assert rc == 0, err
    assert "rank-r SVD" in err  # merged weights only: recovered, and the log says how
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors", MARKER]
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    names = list(load_file(target / "adapter_model.safetensors"))
    assert names and all(n.startswith("base_model.model.model.layers.") and ".lora_" in n for n in names)
    assert len(names) == 2 * 2 * 2  # (A, B) x (q_proj, v_proj) x 2 layers
    base_dir = obj(store_dir, steps["base"]["digest"])
    tuned = transformers.AutoModelForCausalLM.from_pretrained(obj(store_dir, steps["lora"]["digest"])).eval()
    adapted = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), target).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    rows = token_rows(4, 9, 64)
    want, got, before = logits(tuned, rows), logits(adapted, rows), logits(base, rows)
    assert (want - before).abs().max() > 1e-3  # the fine-tune did change the outputs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    card = (target / "README.md").read_text()
    assert "library_name: peft" in card and "base_model_relation" not in card  # a local base: no hub id
    assert "PeftModel.from_pretrained" in card and "`base`" in card


def test_a_stored_adapter_is_exported_as_it_was_trained(lora_project, tmp_path, cli):
    path, store_dir = lora_project
    stored = obj(store_dir, lock(path)["kept"]["digest"]) / "adapter"
    target = tmp_path / "kept"
    rc, _, err = cli("export", path, "kept", target, "--cache-dir", store_dir, "--format", "peft")
    assert rc == 0, err
    assert "lora.keep_adapter" in err
    assert (target / "adapter_model.safetensors").read_bytes() == (stored / "adapter_model.safetensors").read_bytes()
    assert json.loads((target / "adapter_config.json").read_text())["target_modules"] == ["o_proj"]


def test_lora_classifier_exports_its_trained_head_with_the_adapter(lora_project, tmp_path, cli):
    import transformers
    from peft import PeftModel

    path, store_dir = lora_project
    steps = lock(path)
    target = tmp_path / "cls"
    rc, _, err = cli("export", path, "cls", target, "--cache-dir", store_dir, "--format", "peft")
    assert rc == 0, err
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"]
    cls = transformers.AutoModelForSequenceClassification
    base_dir = obj(store_dir, steps["cls_base"]["digest"])
    tuned = cls.from_pretrained(obj(store_dir, steps["cls"]["digest"])).eval()
    adapted = PeftModel.from_pretrained(cls.from_pretrained(base_dir), target).eval()
    rows = token_rows(4, 5, 64)
    assert (logits(tuned, rows) - logits(cls.from_pretrained(base_dir).eval(), rows)).abs().max() > 1e-4
    torch.testing.assert_close(logits(adapted, rows), logits(tuned, rows), rtol=1e-4, atol=1e-5)
    assert "pipeline_tag: text-classification" in (target / "README.md").read_text()


def test_peft_format_needs_a_lora_trained_model(lora_project, tmp_path, cli):
    path, store_dir = lora_project
    for step, why in (("full", "needs a model trained with LoRA"), ("base", "needs a model trained with LoRA")):
        target = tmp_path / step
        rc, _, err = cli("export", path, step, target, "--cache-dir", store_dir, "--format", "peft")
        assert rc == 2 and why in err and f"step '{step}'" in err and "lora:" in err, err
        assert "Traceback" not in err and not target.exists()
