"""S3T (issue 16): finetune with shards/slices/sequences trains an S3T composite, s3t-delete
removes rows from it without a gradient step.

Exactness, bit for bit: the composite after a deletion equals a composite trained with the
same schedule and seed whose sequences stop before the deleted slice (``torch.equal`` on the
logits, and the same adapter files).  The rule itself is checked against peft: each shard
model built by peft from the stored adapter files (unmerged LoRA forward), the shards'
probabilities averaged by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run, save_tiny_llama, write_pipeline
from test_metrics_registry import LLAMA, lines, report_of, word_tokenizer, write_lines

import weightflow

TRAIN = "{op: finetune, model: lm, data: train.txt, shards: 2, slices: 2, sequences: 2, lora: {r: 4}, " \
        "max_steps: 2, batch_size: 4, learning_rate: 0.05}"
IDS = torch.tensor([[2, 5, 9, 14, 7, 20, 11], [2, 30, 8, 8, 17, 4, 6]])


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    path = save_tiny_llama(tmp_path_factory.mktemp("s3t") / "lm", seed=5, config=LLAMA)
    word_tokenizer(path, "llama")
    return path


def pipeline(tmp_path: Path, lm: Path, steps: str) -> Path:
    write_lines(tmp_path / "train.txt", lines(16, 3))
    return write_pipeline(tmp_path, f"""
weightflow: 1
seed: 3
steps:
  lm: {{op: load, source: {lm}}}
  s3t: {TRAIN}
{steps}
""")


def obj(store_dir: Path, outcome, step: str) -> Path:
    digest = next(s.digest for s in outcome.steps if s.name == step)
    return store_dir / "objects" / digest[:2] / digest


def spec_of(path: Path) -> dict:
    return json.loads((path / "composite.json").read_text())


def manifest_info(store_dir: Path, outcome, step: str) -> dict:
    digest = next(s.digest for s in outcome.steps if s.name == step)
    (man,) = (store_dir / "manifests" / digest[:2] / digest).glob("*.json")
    return json.loads(man.read_text())["info"]


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return weightflow.load_model(path)(input_ids=IDS).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm) -> dict:
    """One S3T composite, and deletions from it: a row of shard 0's slice 1 (some sequences keep
    a prefix), then rows of both its slices (the shard falls back to the base)."""
    tmp = tmp_path_factory.mktemp("run")
    store = tmp / "cache"
    outcome, status = run(pipeline(tmp, lm, ""), store)
    assert status["s3t"] == "executed"
    spec = spec_of(obj(store, outcome, "s3t"))
    rows = spec["params"]["rows"]
    one, both = rows[0][1][0], [rows[0][0][0], rows[0][1][1]]
    text = (tmp / "pipeline.yaml").read_text() + f"""
  del1: {{op: s3t-delete, model: s3t, rows: [{one}]}}
  del_all: {{op: s3t-delete, model: s3t, rows: [{both[0]}, {both[1]}]}}
  scores: {{op: evaluate, models: [s3t, del1], metrics: [{{perplexity: {{data: train.txt}}}}]}}
"""
    (tmp / "pipeline.yaml").write_text(text)
    outcome, status = run(tmp / "pipeline.yaml", store)
    assert status == {"lm": "cached", "s3t": "cached", "del1": "executed", "del_all": "executed",
                      "scores": "executed"}
    return {"tmp": tmp, "store": store, "outcome": outcome, "one": one, "both": both,
            "paths": {s: obj(store, outcome, s) for s in ("s3t", "del1", "del_all")}}


def test_schedule_layers_rows_and_sequences(trained):
    p = spec_of(trained["paths"]["s3t"])["params"]
    assert p["sequences"] == [[0, 1], [1, 0]]            # rotations: every slice first once
    assert p["layer_groups"] == [[1], [0]]               # top layer first
    flat = sorted(r for shard in p["rows"] for sl in shard for r in sl)
    assert flat == list(range(16)) and all(len(sl) == 4 for shard in p["rows"] for sl in shard)
    assert p["keep"] == [[2, 2], [2, 2]] and len(p["adapters"]) == 8
    assert sorted(f.name for f in (trained["paths"]["s3t"] / "adapters").glob("*.safetensors")) == \
        sorted(f"s{s}-q{b}-g{g}.safetensors" for s in (0, 1) for b in (0, 1) for g in (0, 1))
    from safetensors import safe_open

    with safe_open(trained["paths"]["s3t"] / "adapters" / "s0-q0-g0.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and all(".layers.1." in n for n in names)  # group 0 = the top block's adapters
    assert all(n.startswith("base_model.model.") and ".lora_" in n for n in names)  # peft's names


def test_deletion_is_exact_bit_for_bit(trained, lm):
    """The composite after deleting a row of shard 0's slice 1 equals a fresh composite trained
    with the same schedule and seed whose shard-0 sequences stop before slice 1."""
    from weightflow.dsl.engine.context import RunContext
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.ops.lib import s3t

    p_del = spec_of(trained["paths"]["del1"])["params"]
    # slice 1 is position 1 of order [0, 1] and position 0 of order [1, 0]
    assert p_del["keep"] == [[1, 0], [2, 2]]
    pipe = load_pipeline(trained["tmp"] / "pipeline.yaml")
    params = pipe.steps["s3t"].params
    out = trained["tmp"] / "reference"
    out.mkdir()
    ctx = RunContext(step="ref", out=out, seed=3, dtype="float32", pipeline_dir=trained["tmp"], names={},
                     shard_bytes=1 << 30, show_progress=False, warn=lambda m: None)
    s3t.fit(lm, params, ctx, "causal-lm", stop={(0, 0): 1, (0, 1): 0})
    ref = spec_of(out)["params"]
    assert ref["keep"] == p_del["keep"] and ref["adapters"] == p_del["adapters"]
    assert torch.equal(logits(trained["paths"]["del1"]), logits(out))
    assert not torch.equal(logits(trained["paths"]["del1"]), logits(trained["paths"]["s3t"]))


def peft_shard_lp(base: Path, composite: Path, shard: int, seq: int, groups: int) -> torch.Tensor:
    """A shard model as peft builds it from the stored files (LoRA unmerged), log-probabilities."""
    import tempfile

    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if groups:
        with tempfile.TemporaryDirectory() as tmp:
            tensors = {}
            for g in range(groups):
                tensors |= load_file(composite / "adapters" / f"s{shard}-q{seq}-g{g}.safetensors")
            save_file(tensors, f"{tmp}/adapter_model.safetensors")
            (Path(tmp) / "adapter_config.json").write_text((composite / "adapters" / "adapter_config.json").read_text())
            model = PeftModel.from_pretrained(model, tmp).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=IDS).logits.float(), -1)


def test_the_rule_is_the_shard_ensemble_peft_computes(trained, lm):
    full, gone = trained["paths"]["s3t"], trained["paths"]["del_all"]
    # all stages active: each shard answers with sequence 0 and both groups
    want = torch.logsumexp(torch.stack([peft_shard_lp(lm, full, s, 0, 2) for s in (0, 1)]), 0) - math.log(2)
    torch.testing.assert_close(logits(full), want, atol=1e-5, rtol=1e-5)
    # shard 0 lost every sequence's first slice: the base model answers for it
    base_lp = peft_shard_lp(lm, gone, 0, 0, 0)
    want = torch.logsumexp(torch.stack([base_lp, peft_shard_lp(lm, gone, 1, 0, 2)]), 0) - math.log(2)
    torch.testing.assert_close(logits(gone), want, atol=1e-5, rtol=1e-5)


def test_evaluate_scores_the_composites(trained):
    rep = report_of(trained["store"], trained["outcome"])
    full, deleted = (r[0]["values"]["token_perplexity"] for r in rep["results"])
    assert math.isfinite(full) and math.isfinite(deleted) and full != deleted


def test_the_schedule_by_itself():
    from weightflow.ops.lib import s3t

    assert s3t.sequence_orders(4, 2) == [[0, 1, 2, 3], [2, 3, 0, 1]]
    assert s3t.sequence_orders(3, 3) == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert s3t.layer_groups(5, 2) == [[2, 3, 4], [0, 1]]
    assert s3t.group_of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight", [[2, 3, 4], [0, 1]]) == 0
    assert s3t.group_of("base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight",
                        [[2, 3, 4], [0, 1]]) == 1
    assert s3t.group_of("base_model.model.score.weight", [[1], [0]]) == 0
    parts = s3t.assign(23, 2, 3, seed=7)
    assert sorted(i for shard in parts for sl in shard for i in sl) == list(range(23))
    assert [[len(sl) for sl in shard] for shard in parts] == [[4, 4, 4], [4, 4, 3]]
    assert parts == s3t.assign(23, 2, 3, seed=7) != s3t.assign(23, 2, 3, seed=8)
    assert s3t.chosen([1, 3, 3, 0]) == 1


def test_plan_deletion_with_string_ids():
    """keep after a deletion, computed from the positions by hand; rows are matched as text."""
    from weightflow.ops.lib import s3t

    orders = s3t.sequence_orders(3, 3)
    params = {"shards": 2, "slices": 3, "sequences": orders, "layer_groups": [[2], [1], [0]],
              "rows": [[["a", "b"], ["c"], ["d", "7"]], [["e"], ["f"], ["g"]]], "keep": [[3, 3, 3], [3, 3, 3]],
              "adapters": {s3t.adapter_name(s, b, g): "x" for s in (0, 1) for b in range(3) for g in range(3)},
              "id_field": "name", "deleted_rows": [], "untrained_rows": ["z"]}
    new, info = s3t.plan_deletion(params, ["c", 7, "z"])
    # slices 1 and 2 of shard 0 hit: cut = the first position of either, per order
    want = [min(o.index(1), o.index(2)) for o in orders]
    assert new["keep"] == [want, [3, 3, 3]] == [[1, 0, 0], [3, 3, 3]]
    assert new["rows"][0] == [["a", "b"], [], ["d"]] and new["untrained_rows"] == []
    assert info["shards"][0]["chosen_sequence"] == 0 and info["never_trained_on"] == ["z"]
    assert set(new["adapters"]) == {"s0-q0-g0"} | {s3t.adapter_name(1, b, g) for b in range(3) for g in range(3)}
    with pytest.raises(Exception, match="its id_field 'name' values"):
        s3t.plan_deletion(params, ["nobody"])


def test_deletion_touches_only_the_affected_shard(trained):
    full, del1, gone = (trained["paths"][s] for s in ("s3t", "del1", "del_all"))
    kept = sorted(f.name for f in (del1 / "adapters").glob("*.safetensors"))
    assert kept == ["s0-q0-g0.safetensors"] + [f"s1-q{b}-g{g}.safetensors" for b in (0, 1) for g in (0, 1)]
    for name in kept:  # the kept adapters are the trained ones, byte for byte
        assert (del1 / "adapters" / name).read_bytes() == (full / "adapters" / name).read_bytes()
    assert (del1 / "base" / "model.safetensors").read_bytes() == (full / "base" / "model.safetensors").read_bytes()
    p = spec_of(del1)["params"]
    assert p["deleted_rows"] == [trained["one"]]
    assert trained["one"] not in p["rows"][0][1] and p["rows"][1] == spec_of(full)["params"]["rows"][1]
    info = manifest_info(trained["store"], trained["outcome"], "del1")["deletion"]
    assert info["untouched_shards"] == [1] and info["dropped_adapters"] == 3
    assert info["slices_kept_per_shard"] == [1, 2]
    (s0,) = info["shards"]
    assert (s0["shard"], s0["slices_hit"], s0["chosen_sequence"], s0["slices_kept"]) == (0, [1], 0, 1)
    assert s0["dropped"] == ["s0-q0-g1", "s0-q1-g0", "s0-q1-g1"]
    info = manifest_info(trained["store"], trained["outcome"], "del_all")["deletion"]
    assert "base model" in info["shards"][0]["note"] and spec_of(gone)["params"]["keep"] == [[0, 0], [2, 2]]
    assert sorted(f.name for f in (gone / "adapters").glob("*.safetensors")) == \
        [f"s1-q{b}-g{g}.safetensors" for b in (0, 1) for g in (0, 1)]


def test_deleting_again_and_from_a_rows_file(tmp_path, trained, lm):
    """Deleting from the deleted composite: the row already gone is noted, rows from a file
    (ids as text) are matched to the positions."""
    write_lines(tmp_path / "forget.txt", [str(trained["both"][1])])
    text = (trained["tmp"] / "pipeline.yaml").read_text().replace("train.txt", str(trained["tmp"] / "train.txt"))
    text += f"""
  again: {{op: s3t-delete, model: del1, rows: [{trained['one']}]}}
  from_file: {{op: s3t-delete, model: del1, rows_file: forget.txt}}
"""
    store_dir = trained["store"]  # s3t and del1 are cached there
    outcome, status = run(write_pipeline(tmp_path, text), store_dir, targets=["again", "from_file"])
    assert status["again"] == "executed" and status["from_file"] == "executed"
    info = manifest_info(store_dir, outcome, "again")["deletion"]
    assert info["already_deleted"] == [trained["one"]] and info["dropped_adapters"] == 0
    assert torch.equal(logits(obj(store_dir, outcome, "again")), logits(trained["paths"]["del1"]))
    # both[1] is in shard 0's slice 1 too: nothing more to drop, the row is removed from the record
    p = spec_of(obj(store_dir, outcome, "from_file"))["params"]
    assert p["keep"] == [[1, 0], [2, 2]] and p["deleted_rows"] == [trained["one"], str(trained["both"][1])]


def test_deterministic_two_runs_same_bytes(tmp_path, trained, lm):
    outcome, status = run(pipeline(tmp_path, lm, f"  del1: {{op: s3t-delete, model: s3t, rows: [{trained['one']}]}}"),
                          tmp_path / "other-store")
    assert status["s3t"] == status["del1"] == "executed"
    for step in ("s3t", "del1"):
        mine, theirs = obj(tmp_path / "other-store", outcome, step), trained["paths"][step]
        assert mine.name == theirs.name  # the same content digest
        files = sorted(f.relative_to(theirs) for f in theirs.rglob("*") if f.is_file())
        assert files == sorted(f.relative_to(mine) for f in mine.rglob("*") if f.is_file())
        for f in files:
            if f.name != "weightflow.json":
                assert (mine / f).read_bytes() == (theirs / f).read_bytes(), f


def test_a_plain_finetune_dumps_its_params_as_before():
    from weightflow.ops.finetune import S3T_KEYS, FinetuneParams, _Inputs
    from weightflow.ops.lib.train_params import TrainParams

    class Before(TrainParams, _Inputs):  # finetune's params as they were before S3T
        pass

    given = {"model": "lm", "data": "train.txt", "lora": {"r": 4}, "max_steps": 2}
    dump = FinetuneParams.model_validate(given).model_dump(mode="json", by_alias=True)
    assert dump == Before.model_validate(given).model_dump(mode="json", by_alias=True)
    assert not set(S3T_KEYS) & set(dump)
    s3t = FinetuneParams.model_validate({**given, "slices": 2}).model_dump(mode="json", by_alias=True)
    assert s3t["slices"] == 2 and "shards" not in s3t


def _errors(tmp_path, lm, steps: str, store_dir):
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline

    path = pipeline(tmp_path, lm, steps)
    try:
        load_pipeline(path)
    except PipelineError as exc:
        return str(exc)
    from weightflow.dsl.lang.diagnostics import StepFailed

    with pytest.raises((StepFailed, PipelineError)) as exc:  # failed at run time, or in the preflight
        run(path, store_dir, targets=["x"])
    return exc.value


@pytest.mark.parametrize("step, message", [
    ("  x: {op: finetune, model: lm, data: train.txt, slices: 2}", "trains LoRA adapters"),
    ("  x: {op: finetune, model: lm, data: train.txt, shards: 2, lora: {r: 4}}", "need 'slices'"),
    ("  x: {op: finetune, model: lm, data: train.txt, slices: 2, sequences: 3, lora: {r: 4}}",
     "sequences (3) must be at most slices (2)"),
    ("  x: {op: s3t-delete, model: lm, rows: [1]}", "Composite"),
    ("  x: {op: s3t-delete, model: s3t}", "exactly one of the two"),
])
def test_bad_settings_are_clear_validation_errors(tmp_path, lm, store_dir, step, message):
    err = _errors(tmp_path, lm, step, store_dir)
    assert isinstance(err, str) and message in err and "Traceback" not in err


def test_unknown_rows_and_non_s3t_composites_fail_clearly(tmp_path, trained, lm):
    from weightflow.dsl.lang.diagnostics import StepFailed
    from weightflow.dsl.lang.pipeline import load_pipeline

    text = (trained["tmp"] / "pipeline.yaml").read_text().replace("train.txt", str(trained["tmp"] / "train.txt"))
    text += """
  ens: {op: compose, rule: ensemble, members: [lm, lm]}
  bad_rows: {op: s3t-delete, model: s3t, rows: [3, 99, nope]}
  not_s3t: {op: s3t-delete, model: ens, rows: [1]}
"""
    path = write_pipeline(tmp_path, text)
    load_pipeline(path)  # valid: the errors are the data's
    for target, message in (("bad_rows", "2 row id(s) the S3T composite was not trained with: 99, 'nope'"),
                            ("not_s3t", "needs an S3T composite (a finetune step with slices:); this one is "
                                        "a 'ensemble' composite")):
        with pytest.raises(StepFailed) as exc:
            run(path, trained["store"], targets=[target])
        assert f"step '{target}' failed" in str(exc.value) and message in str(exc.value)


def test_too_few_layers_or_examples_or_duplicate_ids(tmp_path, lm, store_dir):
    err = _errors(tmp_path, lm, "  x: {op: finetune, model: lm, data: train.txt, slices: 3, lora: {r: 4}}",
                  store_dir)
    assert "step 'x' failed" in str(err) and "the model has 2 layer(s), fewer than slices: 3" in str(err)
    err = _errors(tmp_path, lm, "  x: {op: finetune, model: lm, data: train.txt, shards: 9, slices: 2, "
                  "lora: {r: 4}}", store_dir)
    assert "at least shards × slices = 18 training examples" in str(err)
    (tmp_path / "named.jsonl").write_text("".join(json.dumps({"text": t, "name": f"n{i % 5}"}) + "\n"
                                                  for i, t in enumerate(lines(8, 1))))
    err = _errors(tmp_path, lm, "  x: {op: finetune, model: lm, data: named.jsonl, slices: 2, id_field: name, "
                  "lora: {r: 4}}", store_dir)
    assert "examples 0 and 5 have the same id 'n0' (id_field 'name' must be unique)" in str(err)


def test_a_classifier_ensemble_with_its_head_in_the_top_group(tmp_path, store_dir):
    """Sequence classification: the new head is part of the base (seeded) and trained with group 0;
    deleting a row of the only sequence's first slice leaves that shard the base model."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from test_metrics_registry import WORDS

    torch.manual_seed(4)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=len(WORDS) + 4, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    word_tokenizer(tmp_path / "clf", "bert")
    rows = [{"text": t, "label": "cat" if "cat" in t else "other"} for t in lines(12, 8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = None
    text = f"""
weightflow: 1
seed: 2
steps:
  clf: {{op: load, source: {tmp_path / 'clf'}}}
  s3t: {{op: finetune, model: clf, data: train.jsonl, shards: 2, slices: 2, lora: {{r: 4}}, max_steps: 2,
        batch_size: 4, learning_rate: 0.05}}
"""
    outcome, _ = run(write_pipeline(tmp_path, text), store_dir)
    full = obj(store_dir, outcome, "s3t")
    first = spec_of(full)["params"]["rows"][0][0][0]
    outcome, _ = run(write_pipeline(tmp_path, text + f"  d: {{op: s3t-delete, model: s3t, rows: [{first}]}}\n"),
                     store_dir)
    gone = obj(store_dir, outcome, "d")
    assert spec_of(gone)["params"]["keep"] == [[0], [2]]
    model = weightflow.load_model(gone)
    assert type(model).__name__.endswith("ForSequenceClassification")

    def probs(m) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(m(input_ids=IDS[:, :5] % cfg.vocab_size).logits.float(), -1)

    def shard1() -> torch.nn.Module:
        m = transformers.AutoModelForSequenceClassification.from_pretrained(gone / "base", dtype=torch.float32)
        tmp = tmp_path / "adapter"
        tmp.mkdir()
        save_file(load_file(gone / "adapters" / "s1-q0-g0.safetensors") |
                  load_file(gone / "adapters" / "s1-q0-g1.safetensors"), tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text((gone / "adapters" / "adapter_config.json").read_text())
        return PeftModel.from_pretrained(m, tmp).eval()

    base = transformers.AutoModelForSequenceClassification.from_pretrained(gone / "base", dtype=torch.float32).eval()
    assert any("classifier" in k for k in load_file(gone / "adapters" / "s1-q0-g0.safetensors"))
    want = (probs(base) + probs(shard1())) / 2
    torch.testing.assert_close(torch.exp(model(input_ids=IDS[:, :5] % cfg.vocab_size).logits.detach()), want,
                               atol=1e-5, rtol=1e-5)
    assert spec_of(full)["params"]["untrained_rows"] == []
