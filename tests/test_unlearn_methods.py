"""The unlearning-method registry (ops/unlearn_methods/): one file per method, everything
else derived.  wga, added as one file, matches a hand computation, is deterministic and
unlearns; its name reaches the schema, the op reference and the errors with no other edit;
the keys of the methods that existed before the registry are unchanged."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from conftest import TINY_LLAMA, run, write_pipeline

OLD_METHODS = ("grad-ascent", "grad-diff", "npo", "simnpo", "ssd")
# unlearn's method-specific keys before the registry, as the old code filled them in
OLD_DEFAULTS = {
    "grad-ascent": {"forget_weight": 1.0},
    "grad-diff": {"forget_weight": 1.0, "retain_weight": 1.0},
    "npo": {"forget_weight": 1.0, "retain_weight": 1.0, "beta": 0.1},
    "simnpo": {"forget_weight": 1.0, "retain_weight": 1.0, "beta": 4.5, "gamma": 0.0},
    "ssd": {"alpha": 10.0, "lambda": 1.0},
}
SPECIFIC = ("forget_weight", "retain_weight", "beta", "gamma", "alpha", "lambda")


def _step(tmp_path: Path, fields: str, name: str = "p.yaml"):
    from weightflow.dsl.lang.pipeline import load_pipeline

    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    path = write_pipeline(tmp_path, f"weightflow: 1\nsteps:\n  base: {{op: load, config: {{model_type: llama}}}}\n"
                                    f"  u: {{op: unlearn, model: base, forget: d.jsonl, {fields}}}\n", name)
    return load_pipeline(path).steps["u"]


def _error(tmp_path: Path, fields: str) -> str:
    from weightflow.dsl.lang.diagnostics import PipelineError

    with pytest.raises(PipelineError) as exc:
        _step(tmp_path, fields)
    return str(exc.value)


# -- the registry -----------------------------------------------------------------------

def test_every_module_of_the_package_is_a_method_in_file_order():
    from weightflow.ops import unlearn_methods as um

    files = sorted(p.stem for p in Path(um.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    assert list(um.methods()) == [f.replace("_", "-") for f in files]
    assert {"grad-ascent", "grad-diff", "npo", "simnpo", "ssd", "wga"} <= set(um.methods())


@pytest.mark.parametrize("method", OLD_METHODS)
def test_methods_from_before_the_registry_keep_their_params_and_keys(tmp_path, method):
    """The params that enter the step key: every old key present (null where unused), defaults filled."""
    step = _step(tmp_path, f"method: {method}, retain: d.jsonl")
    params = step.params_json()
    assert {k: params[k] for k in SPECIFIC} == {k: OLD_DEFAULTS[method].get(k) for k in SPECIFIC}
    assert params["retain_loss"] == "nll" and params["learning_rate"] == 1e-5


def test_a_new_key_of_a_new_method_enters_only_its_own_keys():
    """A method file may bring a key of its own: the old methods' keys do not change."""
    from weightflow.ops import unlearn as U
    from weightflow.ops import unlearn_methods as um

    tau = um.UnlearnMethod(name="tau-ascent", doc="``tau-ascent``: a test method.",
                           params={"forget_weight": um.FORGET_WEIGHT, "tau": um.Param(2.0, "a new key", gt=0)},
                           needs_retain="optional", forget_loss=lambda b, o: -b.mean_nll())
    registry = {**um.methods(), "tau-ascent": tau}
    model, current = U.params_model(registry), U.UnlearnParams
    for method in OLD_METHODS + ("wga",):
        raw = {"model": "m", "method": method, "forget": "f.jsonl", "retain": "r.jsonl"}
        dumped = model.model_validate(raw).model_dump(mode="json", by_alias=True)
        assert "tau" not in dumped
        assert dumped == current.model_validate(raw).model_dump(mode="json", by_alias=True)
    own = model.model_validate({"model": "m", "method": "tau-ascent", "forget": "f.jsonl"})
    assert own.model_dump(mode="json", by_alias=True)["tau"] == 2.0
    with pytest.raises(ValueError, match="'tau' does not apply to method npo; it is used by tau-ascent"):
        model.model_validate({"model": "m", "method": "npo", "forget": "f.jsonl", "retain": "r.jsonl", "tau": 1})
    assert "tau" not in U.UnlearnParams.model_fields  # the op itself is untouched


def test_methods_sharing_a_key_must_agree_on_its_bounds():
    from weightflow.ops import unlearn_methods as um

    other = um.UnlearnMethod(name="x", doc="", params={"beta": um.Param(1.0, "b", ge=0)},
                             forget_loss=lambda b, o: b.nll_sum)
    first = next(n for n, m in um.methods().items() if "beta" in m.params)  # the first method using it
    with pytest.raises(ValueError, match=f"'beta' of method x has other bounds than in {first}"):
        um.keys({**um.methods(), "x": other})


# -- derived from the registry: wga is there with no other edit ------------------------------

def test_wga_is_in_the_schema_the_op_reference_and_the_doc():
    from weightflow.dsl.lang.opdocs import ops_json, ops_markdown, ops_text
    from weightflow.dsl.lang.schema import language_schema
    from weightflow.ops import unlearn_methods as um

    names = list(um.methods())
    schema = language_schema()
    step = _unlearn_step(schema)
    method = step["properties"]["method"]
    enum = next(a["enum"] for a in [method, *method.get("anyOf", [])] if "enum" in a)
    assert enum == names and "wga" in enum
    assert "wga: exponent β" in step["properties"]["beta"]["description"]
    text = ops_text().split("unlearn (v1)", 1)[1].split("\n\n", 1)[0]
    assert "'wga'" in text and "wga: exponent β of the token weights" in text
    needing = ", ".join(n for n, m in um.methods().items() if m.needs_retain is True)
    assert "grad-diff, " in needing and f"(needed by {needing})" in text
    doc = next(o["doc"] for o in ops_json() if o["name"] == "unlearn")
    for name in names:
        assert f"- ``{name}``" in doc
    assert "Weighted Gradient Ascent" in doc and "Weighted Gradient Ascent" in ops_markdown()
    committed = json.loads((Path(__file__).resolve().parent.parent / "pipelines" / "weightflow.schema.json")
                           .read_text())
    assert _unlearn_step(committed) == json.loads(json.dumps(step)), \
        "pipelines/weightflow.schema.json is stale: run `weightflow schema > pipelines/weightflow.schema.json`"


def _unlearn_step(schema: dict) -> dict:
    return next(s["then"] for s in schema["properties"]["steps"]["additionalProperties"]["allOf"]
                if s["if"]["properties"]["op"]["const"] == "unlearn")


def test_wga_params_are_validated_like_the_others(tmp_path):
    params = _step(tmp_path, "method: wga, retain: d.jsonl").params_json()
    assert {k: params[k] for k in SPECIFIC} == {"forget_weight": 1.0, "retain_weight": 1.0, "beta": 1.0,
                                                "gamma": None, "alpha": None, "lambda": None}
    assert _step(tmp_path, "method: wga, retain: d.jsonl, beta: 2", "q.yaml").params_json()["beta"] == 2.0
    assert "method wga needs 'retain' data (or retain_weight: 0)" in _error(tmp_path, "method: wga")
    assert "'gamma' does not apply to method wga; it is used by simnpo" in \
        _error(tmp_path, "method: wga, retain: d.jsonl, gamma: 1")
    from weightflow.ops import unlearn_methods as um

    users = ", ".join(n for n, m in um.methods().items() if "beta" in m.params)
    assert "npo, simnpo, " in users and users.endswith("wga")
    assert f"'beta' does not apply to method grad-diff; it is used by {users}" in \
        _error(tmp_path, "method: grad-diff, retain: d.jsonl, beta: 1")
    assert "parameter 'beta': input should be greater than 0" in _error(tmp_path, "method: wga, retain: d.jsonl, "
                                                                                   "beta: 0")


@pytest.mark.parametrize("given, close", [("wgaa", "wga"), ("grad_diff", "grad-diff"), ("simpno", "simnpo")])
def test_an_unknown_method_says_what_was_meant_and_lists_the_methods(tmp_path, given, close):
    from weightflow.ops import unlearn_methods as um

    message = _error(tmp_path, f"method: {given}")
    assert f"unknown method '{given}' (did you mean '{close}'?)" in message, message
    assert f"expected one of: {', '.join(um.methods())}" in message and "wga" in message
    assert "p.yaml:4:" in message and "Traceback" not in message


# -- wga's loss ------------------------------------------------------------------------------

def _batch(task: str, seed: int = 0):
    import torch

    from weightflow.ops import unlearn_methods as um

    g = torch.Generator().manual_seed(seed)
    if task == "causal-lm":
        logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float32)
        labels = torch.tensor([[3, 1, 4, 1, 5], [2, 6, -100, -100, -100]])  # padding / no loss: -100
    else:
        logits = torch.randn(3, 4, generator=g, dtype=torch.float32)
        labels = torch.tensor([2, 0, 3])
    logits.requires_grad_(True)
    return um.ForgetBatch(nll_sum=None, n_tok=None, logits=logits, labels=labels, task=task), logits, labels


def _by_hand(logits, labels, task: str, beta: float) -> tuple[float, list]:
    """−mean over target tokens of p^β·(−log p), and d/dlogits with p^β held constant."""
    rows = logits.detach().double().tolist()
    targets = []  # (logit row, target id, where the row is)
    if task == "causal-lm":
        for b, seq in enumerate(labels.tolist()):
            for t in range(1, len(seq)):
                if seq[t] != -100:
                    targets.append((rows[b][t - 1], seq[t], (b, t - 1)))
    else:
        targets = [(rows[b], y, (b,)) for b, y in enumerate(labels.tolist())]
    total, grads = 0.0, []
    for row, y, at in targets:
        z = math.log(sum(math.exp(v) for v in row))
        nll = z - row[y]
        weight = math.exp(-nll) ** beta
        total += weight * nll
        softmax = [math.exp(v - z) for v in row]
        # d(−w·nll/n)/dlogit_k = −(w/n)·(softmax_k − [k = y]), w constant
        grads.append((at, [-(weight / len(targets)) * (s - (k == y)) for k, s in enumerate(softmax)]))
    return -total / len(targets), grads


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_wga_loss_equals_a_hand_computation(task, beta):
    import torch

    from weightflow.ops import unlearn_methods as um

    wga = um.methods()["wga"]
    batch, logits, labels = _batch(task)
    loss = wga.forget_loss(batch, {"beta": beta})
    expected, grads = _by_hand(logits, labels, task, beta)
    assert loss.dim() == 0 and float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    loss.backward()
    want = torch.zeros_like(logits, dtype=torch.float64)
    for at, g in grads:
        want[at] = torch.tensor(g, dtype=torch.float64)
    torch.testing.assert_close(logits.grad.double(), want, rtol=1e-4, atol=1e-7)  # the weight is not differentiated


def test_wga_with_beta_0_is_gradient_ascent_and_the_loss_is_deterministic():
    import torch

    from weightflow.ops import unlearn_methods as um

    methods = um.methods()
    batch, logits, labels = _batch("causal-lm", seed=3)
    nll, mask = batch.token_nll()
    batch.nll_sum, batch.n_tok = nll.sum(1), mask.sum(1)
    a = methods["wga"].forget_loss(batch, {"beta": 1.5})
    b = methods["wga"].forget_loss(batch, {"beta": 1.5})
    assert torch.equal(a, b)
    ga = methods["grad-ascent"].forget_loss(batch, {})
    torch.testing.assert_close(methods["wga"].forget_loss(batch, {"beta": 1e-12}), ga)


# -- wga on a tiny model ------------------------------------------------------------------------

def _token_rows(n: int, seed: int, lo: int, hi: int, length: int = 12) -> list[dict]:
    r = random.Random(seed)
    return [{"input_ids": [r.randrange(lo, hi) for _ in range(length)]} for _ in range(n)]


def test_wga_raises_the_forget_loss_more_than_the_retain_loss_and_is_reproducible(tmp_path):
    """A tiny Llama first fits forget + retain sequences; 15 wga steps then raise the forget
    NLL well above the retain NLL's change; the same pipeline in a fresh cache gives the same bits."""
    from weightflow.dsl.store.content import Store

    forget, retain = _token_rows(16, seed=0, lo=0, hi=128), _token_rows(32, seed=1, lo=128, hi=256)
    for name, rows in (("forget", forget), ("retain", retain), ("all", forget + retain)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {{op: load, config: {json.dumps(TINY_LLAMA)}}}
          known: {{op: finetune, model: base, data: all.jsonl, max_steps: 30, learning_rate: 0.005,
                  batch_size: 16, lr_scheduler: constant}}
          wga: {{op: unlearn, method: wga, model: known, forget: forget.jsonl, retain: retain.jsonl,
                max_steps: 15, learning_rate: 0.001, batch_size: 8}}
        """)
    first, _ = run(path, tmp_path / "cache1")
    step = next(s for s in first.steps if s.name == "wga")
    info = Store(tmp_path / "cache1").lookup(step.key).manifest["info"]
    losses = info["losses"]
    rise = {k: losses[k]["after"] - losses[k]["before"] for k in ("forget", "retain")}
    assert rise["forget"] > 0.5 and rise["forget"] > 5 * max(rise["retain"], 0.0), rise
    assert info["summary"]["method"] == "wga" and len(info["training_curve"]) == 15
    assert {"forget_loss", "forget_nll", "retain_loss"} <= set(info["training_curve"][0])
    second, status = run(path, tmp_path / "cache2")
    assert set(status.values()) == {"executed"}
    assert {s.name: (s.key, s.digest) for s in first.steps} == {s.name: (s.key, s.digest) for s in second.steps}


def test_the_manifest_losses_are_measured_on_at_most_64_evenly_spaced_rows(tmp_path):
    """A retain set of 100 rows is measured on 64 of them (recorded), and the loss is the
    evaluation of exactly those rows: the rows at i*100//64."""
    from weightflow.dsl.store.content import Store
    from weightflow.ops import unlearn
    from weightflow.ops.lib import training as T

    assert unlearn._measured_rows(list(range(10))) == list(range(10))
    picked = unlearn._measured_rows(list(range(100)))
    assert len(picked) == unlearn.MEASURE_ROWS == 64 and picked[:3] == [0, 1, 3] and picked[-1] == 98
    forget, retain = _token_rows(8, seed=0, lo=0, hi=128), _token_rows(100, seed=1, lo=128, hi=256)
    for name, rows in (("forget", forget), ("retain", retain)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {{op: load, config: {json.dumps(TINY_LLAMA)}}}
          u: {{op: unlearn, method: grad-diff, model: base, forget: forget.jsonl, retain: retain.jsonl,
              max_steps: 2, learning_rate: 0.001, batch_size: 8}}
        """)
    result, _ = run(path, tmp_path / "cache")
    store = Store(tmp_path / "cache")
    by_name = {s.name: s for s in result.steps}
    info = store.lookup(by_name["u"].key).manifest["info"]
    assert info["losses_measured_on"] == {"forget": {"rows": 8, "of": 8}, "retain": {"rows": 64, "of": 100}}
    model = T.load_model(store.lookup(by_name["base"].key).path, "causal-lm", None)
    examples = [T.Example(list(r["input_ids"]), list(r["input_ids"])) for r in retain]
    chosen = [examples[i * 100 // 64] for i in range(64)]
    expected = T.evaluate(model, chosen, 8, 0, "causal-lm")["loss"]
    assert abs(info["losses"]["retain"]["before"] - expected) < 1e-6
    assert abs(T.evaluate(model, examples, 8, 0, "causal-lm")["loss"] - expected) > 1e-6  # the sample matters
