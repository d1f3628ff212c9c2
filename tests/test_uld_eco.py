"""ULD and ECO as unlearn methods that output Composites (issue 16).

ULD (Ji et al. 2024) trains a small assistant on the reversed objectives and outputs the
``contrast`` composite target − alpha·assistant; ECO (Liu et al. 2024) trains a prompt
classifier and outputs the ``guarded`` composite that corrupts flagged prompts' embeddings.
Their losses equal computations written out here in plain floats; on a tiny Llama that has
learnt its forget and retain answers each composite raises the forget NLL and keeps the
retain NLL (ECO: exactly, unflagged inputs are untouched); the ULD composite is scored by
perplexity, multiple-choice accuracy and refusal in one evaluate step, exported and
reloaded; a rerun gives the same digests."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from conftest import run, save_tiny_llama, write_pipeline
from test_unlearn_catalogue import _methods, one_thread, save_char_tokenizer  # noqa: F401 (one_thread: autouse)

IGNORE = -100


# -- the losses against plain-float computations ---------------------------------------------

def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _fixed_batch():
    import torch

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float32)
    labels = torch.tensor([[2, 4, 1, 6, 3], [IGNORE, IGNORE, 5, 0, IGNORE]])  # plain text / prompt + padding
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    return logits.requires_grad_(True), labels, mask


def test_uld_forget_loss_is_the_token_mean_nll():
    """The assistant remembers the forget set: L_forget = mean over target tokens of −log p."""
    import torch

    from weightflow.ops import unlearn_methods as um
    from weightflow.ops.lib import training as T

    logits, labels, mask = _fixed_batch()
    batch = T.Batch(torch.zeros_like(labels), mask, labels)
    # the loop computes nll_sum/n_tok with sequence_nll; feed it the fixed logits directly
    lg, lb = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, 7), lb.reshape(-1), ignore_index=IGNORE,
                                            reduction="none").view(lb.shape)
    fb = um.ForgetBatch(nll.sum(1), (lb != IGNORE).sum(1), logits, batch.labels, "causal-lm")
    got = float(_methods()["uld"].forget_loss(fb, {}).detach())
    rows = logits.detach().double().tolist()
    terms = [-_log_softmax(rows[b][t - 1])[y] for b, seq in enumerate(labels.tolist())
             for t, y in enumerate(seq) if y != IGNORE and t >= 1]
    assert len(terms) == 4 + 2
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_uld_retain_loss_is_the_kl_from_uniform_over_attended_positions():
    """ULD's UniformLossFunc: KL(U ‖ p) = Σ_v (1/V)(log(1/V) − log p(v)) per position, averaged
    over every attended position (prompt tokens too; padding out); zero for a flat model."""
    import torch

    from weightflow.ops import unlearn_methods as um

    logits, labels, mask = _fixed_batch()
    rb = um.RetainBatch(None, None, logits, labels, "causal-lm", attention_mask=mask)
    loss = _methods()["uld"].retain_loss(rb, {})
    rows, V = logits.detach().double().tolist(), 7
    terms = [sum((1 / V) * (math.log(1 / V) - lp) for lp in _log_softmax(rows[b][t]))
             for b in range(2) for t in range(5) if mask[b, t]]
    assert len(terms) == 9
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    flat = um.RetainBatch(None, None, torch.zeros(2, 5, 7), labels, "causal-lm", attention_mask=mask)
    assert float(_methods()["uld"].retain_loss(flat, {})) == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # gradient of (1/N)Σ_t (−1/V Σ_v log p_t(v)) w.r.t. the logits: (p − 1/V)/N
    p = torch.softmax(logits.detach().double(), -1)
    want = (p - 1 / V) * mask[..., None] / len(terms)
    torch.testing.assert_close(logits.grad.double(), want, rtol=1e-5, atol=1e-8)


def test_the_assistant_is_the_targets_first_layers():
    import torch
    import transformers
    from conftest import TINY_LLAMA

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.uld import build_assistant

    cfg = dict(TINY_LLAMA)
    cfg.pop("model_type")
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    a = build_assistant(target, 1)
    assert a.config.num_hidden_layers == 1 and len(a.model.layers) == 1 and target.config.num_hidden_layers == 2
    ts = target.state_dict()
    for name, t in a.state_dict().items():
        assert torch.equal(t, ts[name]), name
    assert set(ts) - set(a.state_dict()) == {n for n in ts if n.startswith("model.layers.1.")}
    with pytest.raises(OpError, match="between 1 and the target's 2"):
        build_assistant(target, 3)


# -- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    ({"method": "eco"}, "needs 'classifier'"),
    ({"method": "eco", "classifier": "c"}, "strength: search needs 'holdout'"),
    ({"method": "eco", "classifier": "c", "strength": 1.0, "holdout": "h.jsonl"}, "'holdout' applies only"),
    ({"method": "eco", "classifier": "c", "strength": 1.0, "threshold": 1.5}, "threshold"),
    ({"method": "uld", "retain_loss": "kl"}, "retain_loss"),
    ({"method": "uld", "top_logit_filter": 1.0}, "top_logit_filter"),
    ({"method": "grad-diff", "assistant_layers": 2}, "does not apply to method grad-diff"),
    ({"method": "eco", "classifier": "c", "strength": 1.0, "lora": {"r": 4}}, "lora"),
])
def test_bad_keys_are_clear_errors(extra, message):
    from pydantic import ValidationError

    from weightflow.ops import unlearn as U

    with pytest.raises(ValidationError, match=message):
        U.UnlearnParams.model_validate({"model": "m", "forget": "f.jsonl", "retain": "r.jsonl", **extra})


def test_the_output_kind_follows_the_method():
    from weightflow.dsl.lang.spec import Kind
    from weightflow.ops import unlearn as U

    def kind(**kw):
        return U.OP.kind_of(U.UnlearnParams.model_validate({"model": "m", "forget": "f.jsonl", "retain": "r.jsonl",
                                                             **kw}))
    assert kind(method="uld") == kind(method="eco", classifier="c", strength=1.0) == Kind.COMPOSITE
    assert kind(method="npo") == Kind.MODEL
    assert Kind.COMPOSITE in U.OP.outputs and "- ``uld``" in U.OP.doc and "- ``eco``" in U.OP.doc


# -- on a tiny model ------------------------------------------------------------------------------

def _clf(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(5)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=128, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny Llama (character tokenizer) learns "who is xyz?" -> abcde... (the forget set) and
    "what is xyz?" -> fghij... (retain); more "who" questions it never sees are the holdout.
    uld and eco unlearn the first kind; evaluate scores the ULD composite; the unlearn steps
    run again (--force) for the determinism check."""
    from weightflow.dsl.store.content import Store

    root = tmp_path_factory.mktemp("uld_eco")
    save_char_tokenizer(save_tiny_llama(root / "model"))
    _clf(root / "clf")
    r = random.Random(0)

    def word(n: int, letters: str) -> str:
        return "".join(r.choice(letters) for _ in range(n))

    def qa(q: str, a: str, n: int) -> list[dict]:
        return [{"question": f"{q} is {word(3, 'abcdefghij')}?", "answer": a + word(3, a)} for _ in range(n)]

    sets = {"forget": qa("who", "abcde", 8), "retain": qa("what", "fghij", 16), "holdout": qa("who", "abcde", 8)}
    sets["all"] = sets["forget"] + sets["retain"]
    for name, rows in sets.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (root / "text.txt").write_text("".join(f"{x['question']}{x['answer']}\n" for x in sets["retain"][:6]))
    (root / "prompts.txt").write_text("".join(f"{x['question']}\n" for x in sets["forget"][:3]))
    mc = [{"text": x["question"], "choices": [x["answer"], "zzzzzzzz"], "label": 0} for x in sets["retain"][:6]]
    (root / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    qa_keys = "prompt_field: question, response_field: answer"
    path = write_pipeline(root, f"""
weightflow: 1
steps:
  base: {{op: load, source: ./model}}
  clf: {{op: load, source: ./clf}}
  known: {{op: finetune, model: base, data: all.jsonl, {qa_keys}, max_steps: 50, learning_rate: 0.01,
          batch_size: 8, lr_scheduler: constant}}
  uld: {{op: unlearn, method: uld, model: known, forget: forget.jsonl, retain: retain.jsonl, {qa_keys},
        assistant_layers: 1, max_steps: 30, batch_size: 8, learning_rate: 0.005, lr_scheduler: constant}}
  eco: {{op: unlearn, method: eco, model: known, forget: forget.jsonl, retain: retain.jsonl, {qa_keys},
        classifier: clf, threshold: 0.9, strength: search, holdout: holdout.jsonl, max_steps: 30, batch_size: 8,
        learning_rate: 0.01, lr_scheduler: constant}}
  scores:
    op: evaluate
    models: [known, uld]
    metrics:
      - perplexity: {{data: text.txt}}
      - accuracy: {{data: mc.jsonl}}
      - refusal: {{prompts: prompts.txt, max_new_tokens: 6, markers: [a b c]}}
outputs: {{uld: out/uld}}
""")
    first, _ = run(path, root / "cache")
    store = Store(root / "cache")
    entries = {s.name: store.lookup(s.key) for s in first.steps}
    again, status = run(path, root / "cache", force=["uld", "eco"])
    return {"root": root, "entries": entries, "first": first, "again": again, "status": status}


def _info(built, step: str) -> dict:
    return built["entries"][step].manifest["info"]


def _rise(built, step: str) -> dict[str, float]:
    return {k: v["after"] - v["before"] for k, v in _info(built, step)["losses"].items()}


def test_the_known_model_learnt_both_sets(built):
    losses = _info(built, "uld")["losses"]
    assert losses["forget"]["before"] < 1.0 and losses["retain"]["before"] < 1.0, losses


def test_uld_outputs_a_contrast_composite(built):
    entry = built["entries"]["uld"]
    assert entry.manifest["kind"] == "Composite"
    spec = json.loads((entry.path / "composite.json").read_text())
    assert spec["rule"] == "contrast" and spec["components"] == {"target": "target", "assistant": "assistant"}
    assert spec["params"] == {"alpha": 0.8, "top_logit_filter": 0.01, "min_kept_fraction": 0.01, "preserve_mass": True}
    assistant = json.loads((entry.path / "assistant" / "config.json").read_text())
    assert assistant["num_hidden_layers"] == 1
    # the target is the input model's stored files, unchanged
    known = built["entries"]["known"].path
    assert (entry.path / "target" / "model.safetensors").read_bytes() == (known / "model.safetensors").read_bytes()


def test_uld_raises_the_forget_nll_and_keeps_the_retain_nll(built):
    """The paper: the logit difference forgets (forget NLL up) and keeps utility (retain NLL
    close to the target's), because the assistant learnt the forget answers and is flat on retain."""
    rise = _rise(built, "uld")
    assert rise["forget"] > 1.0 and abs(rise["retain"]) < 0.2 * rise["forget"], rise
    assistant = _info(built, "uld")["trained_model_losses"]
    assert assistant["forget"]["after"] < assistant["forget"]["before"]  # it remembered the forget set
    assert assistant["retain"]["after"] > assistant["retain"]["before"]  # and forgot the retain set


def test_eco_classifier_flags_forget_prompts_only(built):
    flagged = _info(built, "eco")["eco"]["flagged"]
    assert flagged["forget"] == 1.0 and flagged["retain"] == 0.0, flagged


def test_eco_raises_the_forget_nll_and_leaves_retain_inputs_untouched(built):
    import torch

    import weightflow

    rise = _rise(built, "eco")
    losses, info = _info(built, "eco")["losses"], _info(built, "eco")["eco"]
    # flagged forget prompts are corrupted at the searched strength: the forget NLL reaches the holdout level
    assert rise["forget"] > 0.3 and losses["forget"]["after"] >= info["search"]["holdout_nll"] * (1 - 1e-6), losses
    assert rise["retain"] == pytest.approx(0.0, abs=1e-6), rise
    entry = built["entries"]["eco"]
    assert entry.manifest["kind"] == "Composite"
    spec = json.loads((entry.path / "composite.json").read_text())
    assert spec["rule"] == "guarded" and spec["params"]["threshold"] == 0.9
    comp = weightflow.load_model(entry.path)
    target = weightflow.load_model(built["entries"]["known"].path)
    tok = weightflow.load_tokenizer(entry.path)
    retain = [json.loads(x) for x in (built["root"] / "retain.jsonl").read_text().splitlines()]
    ids = tok([x["question"] + x["answer"] for x in retain[:4]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = comp(input_ids=ids).logits
        want = torch.log_softmax(target(input_ids=ids).logits.float(), -1)
    assert not comp.last_flagged.any()
    assert torch.equal(got, want)


def test_eco_search_picks_a_strength_and_records_it(built):
    """f(σ) = 1 − L_f(σ)/L_h: the strength is the smallest evaluated one whose corrupted forget
    NLL reaches the holdout level, bracketed closely by one that does not."""
    info = _info(built, "eco")["eco"]
    search = info["search"]
    spec = json.loads((built["entries"]["eco"].path / "composite.json").read_text())
    assert search["reached"] and spec["params"]["strength"] == search["strength"] == info["strength"]
    level, evals = search["holdout_nll"], search["evaluated"]
    for e in evals:  # every evaluation is recorded, f computed as documented
        assert e["f"] == pytest.approx(1 - e["forget_nll"] / level)
    hits = [e["strength"] for e in evals if e["f"] <= 0]
    misses = [e["strength"] for e in evals if e["f"] > 0]
    assert search["strength"] == min(hits) and misses and max(misses) < search["strength"] < 1.5 * max(misses)
    assert len(search["trace"]) > 1  # it took Newton steps from σ = 0.1 before reaching the level
    # the unseen "who" answers are harder than the memorised ones
    assert level > _info(built, "eco")["losses"]["forget"]["before"]


def test_the_uld_composite_is_scored_by_perplexity_accuracy_and_refusal(built):
    digest = next(s.digest for s in built["first"].steps if s.name == "scores")
    report = json.loads((built["entries"]["scores"].path / "report.json").read_text())
    assert built["entries"]["scores"].digest == digest
    known, uld = report["results"]
    ppl = [r[0]["values"]["token_perplexity"] for r in (known, uld)]
    assert all(math.isfinite(v) for v in ppl) and ppl[1] < 1.5 * ppl[0], ppl  # retain text: kept
    assert known[1]["values"]["acc"] == 1.0 and uld[1]["values"]["acc"] == 1.0  # retain answers: kept
    # the "refusal" marker here is the forget answers' prefix (the character tokenizer decodes "a b c"):
    # the known model gives it to every forget prompt, the ULD composite to none
    rate = [r[2]["values"]["refusal_rate"] for r in (known, uld)]
    assert rate == [1.0, 0.0], rate


def test_the_uld_composite_is_exported_and_reloaded_with_equal_logits(built):
    import torch

    import weightflow

    exported = built["root"] / "out" / "uld"
    assert (exported / "composite.json").is_file() and (exported / "assistant" / "config.json").is_file()
    ids = torch.tensor([[2, 5, 9, 14, 7, 20, 11], [2, 30, 8, 8, 17, 4, 6]])
    with torch.no_grad():
        a = weightflow.load_model(exported)(input_ids=ids).logits
        b = weightflow.load_model(built["entries"]["uld"].path)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_uld_filter_keeps_ulds_minimum_number_of_tokens(built, tmp_path):
    """ULD's relative-top filter: contrast the tokens K with p_T ≥ f·max p_T, and at least the
    int(min_kept_fraction·V) most likely ones (ULD: ``min(max + log f, k-th largest)``); K
    shares the target's mass p_T(K) (preserve_mass), the other tokens keep p_T."""
    import torch
    import transformers

    import weightflow

    src = built["entries"]["uld"].path
    d = tmp_path / "c"
    shutil.copytree(src, d)
    spec = json.loads((d / "composite.json").read_text())
    spec["params"].update(top_logit_filter=0.5, min_kept_fraction=0.2)
    (d / "composite.json").write_text(json.dumps(spec))
    ids = torch.tensor([[2, 5, 9, 14, 7, 20, 11]])
    with torch.no_grad():
        got = weightflow.load_model(d)(input_ids=ids).logits
        lp = [torch.log_softmax(transformers.AutoModelForCausalLM.from_pretrained(d / n)(input_ids=ids).logits, -1)
              for n in ("target", "assistant")]
    lp_t, lp_a = lp
    V = lp_t.shape[-1]
    kth = lp_t.sort(-1, descending=True).values[..., int(0.2 * V) - 1:int(0.2 * V)]
    keep = lp_t >= torch.minimum(lp_t.max(-1, keepdim=True).values + math.log(0.5), kth)
    assert int(keep.sum(-1).min()) >= int(0.2 * V) and not bool(keep.all())
    p_t, mixed = lp_t.exp(), (lp_t - 0.8 * lp_a).exp()
    kept_mass = (p_t * keep).sum(-1, keepdim=True)
    want = torch.where(keep, kept_mass * mixed * keep / (mixed * keep).sum(-1, keepdim=True), p_t)
    torch.testing.assert_close(got.exp(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(1, 7))


def test_a_rerun_gives_the_same_digests(built):
    assert built["status"]["uld"] == built["status"]["eco"] == "executed"
    digests = [{s.name: s.digest for s in o.steps} for o in (built["first"], built["again"])]
    assert digests[0] == digests[1]
