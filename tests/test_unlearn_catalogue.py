"""open-unlearning's methods in the unlearn registry: rmu, dpo, idk-dpo, idk-nll, undial,
satimp, ce-u.  Each loss equals a computation written out here (plain Python floats, not
the code under test); the loop hands each method what it asks for (the hidden state of a
layer, the alternate answers, the frozen model); on a tiny Llama that has learnt its
forget and retain answers each method raises the forget NLL and spares the retain NLL as
its paper says (what holds at this scale is asserted, see the notes), and a rerun gives
the same bytes."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_model, run, save_tiny_llama, write_pipeline

NEW = ("ce-u", "dpo", "idk-dpo", "idk-nll", "rmu", "satimp", "undial")
IGNORE = -100


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is many times faster than two on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _methods():
    from weightflow.ops import unlearn_methods as um

    return um.methods()


# -- hand computations (plain floats) -----------------------------------------------------

def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def _targets(logits, labels, skip_first: int = 0) -> list[tuple[list[float], int, tuple]]:
    """(logit row, target id, index of the row) of every scored position of a causal-LM batch:
    token t is predicted by the logits at t−1; the first ``skip_first`` labelled positions of
    each example (counted unshifted, as CE-U counts them) are left out."""
    rows, out = logits.detach().double().tolist(), []
    for b, seq in enumerate(labels.tolist()):
        labelled = [t for t, y in enumerate(seq) if y != IGNORE]
        for t in labelled[skip_first:]:
            if t >= 1:
                out.append((rows[b][t - 1], seq[t], (b, t - 1)))
    return out


def _batch(seed: int = 0, classes: bool = False):
    import torch

    from weightflow.ops import unlearn_methods as um

    g = torch.Generator().manual_seed(seed)
    if classes:
        logits = torch.randn(3, 5, generator=g)
        labels = torch.tensor([4, 0, 2])
        task = "sequence-classification"
    else:
        logits = torch.randn(2, 6, 7, generator=g)
        labels = torch.tensor([[3, 1, 4, 1, 5, 6], [IGNORE, IGNORE, 6, 2, 5, IGNORE]])  # prompt / padding
        task = "causal-lm"
    logits.requires_grad_(True)
    return um.ForgetBatch(nll_sum=None, n_tok=None, logits=logits, labels=labels, task=task), logits, labels


def _grad_of(logits, per_position: list[tuple[tuple, list[float]]]):
    import torch

    want = torch.zeros_like(logits, dtype=torch.float64)
    for at, g in per_position:
        want[at] = torch.tensor(g, dtype=torch.float64)
    return want


@pytest.mark.parametrize("skip", [0, 1, 2])
def test_ce_u_loss_and_gradient_equal_a_hand_computation(skip):
    """CE against the model's own distribution with the true token removed; gradient p − q."""
    import torch

    batch, logits, labels = _batch(seed=1)
    loss = _methods()["ce-u"].forget_loss(batch, {"ignore_first_n_answer_tokens": skip})
    positions = _targets(logits, labels, skip_first=skip)
    total, grads = 0.0, []
    for row, y, at in positions:
        p = _softmax(row)
        rest = sum(math.exp(v) for k, v in enumerate(row) if k != y)
        q = [0.0 if k == y else math.exp(v) / rest for k, v in enumerate(row)]
        total += -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True) if qk)
        grads.append((at, [(pk - qk) / len(positions) for pk, qk in zip(p, q, strict=True)]))
    assert float(loss.detach()) == pytest.approx(total / len(positions), rel=1e-5)
    loss.backward()
    torch.testing.assert_close(logits.grad.double(), _grad_of(logits, grads), rtol=1e-4, atol=1e-7)


def test_ce_u_skips_the_first_answer_token_of_qa_rows_and_none_of_plain_text():
    """Row 0 is plain text (its first labelled position is never predicted), row 1 has a prompt."""
    batch, logits, labels = _batch(seed=1)
    assert len(_targets(logits, labels, 0)) == 5 + 3
    assert len(_targets(logits, labels, 1)) == 5 + 2
    ce_u = _methods()["ce-u"]
    everything = ce_u.forget_loss(batch, {"ignore_first_n_answer_tokens": 10})
    assert float(everything.detach()) == 0.0 and everything.requires_grad  # nothing left: no step, no NaN


def test_ce_u_on_a_classifier():
    batch, logits, labels = _batch(seed=2, classes=True)
    loss = _methods()["ce-u"].forget_loss(batch, {"ignore_first_n_answer_tokens": 1})
    total = 0.0
    for row, y in zip(logits.detach().double().tolist(), labels.tolist(), strict=True):
        p = _softmax(row)
        rest = sum(math.exp(v) for k, v in enumerate(row) if k != y)
        total += -sum(math.exp(v) / rest * math.log(p[k]) for k, v in enumerate(row) if k != y)
    assert float(loss.detach()) == pytest.approx(total / 3, rel=1e-5)


@pytest.mark.parametrize("beta1, beta2", [(5.0, 1.0), (1.0, 2.0), (0.0, 0.0)])
def test_satimp_loss_and_gradient_equal_a_hand_computation(beta1, beta2):
    """−mean_t w_t·nll_t with w_t = p^β1·(1−p)^β2 held constant; β1 = β2 = 0 is gradient ascent."""
    import torch

    batch, logits, labels = _batch(seed=3)
    loss = _methods()["satimp"].forget_loss(batch, {"beta1": beta1, "beta2": beta2})
    positions = _targets(logits, labels)
    total, grads = 0.0, []
    for row, y, at in positions:
        p = _softmax(row)
        w = p[y] ** beta1 * (1 - p[y]) ** beta2
        total += w * -math.log(p[y])
        grads.append((at, [-(w / len(positions)) * (pk - (k == y)) for k, pk in enumerate(p)]))
    assert float(loss.detach()) == pytest.approx(-total / len(positions), rel=1e-5)
    loss.backward()
    torch.testing.assert_close(logits.grad.double(), _grad_of(logits, grads), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("classes", [False, True])
@pytest.mark.parametrize("beta", [10.0, 0.5])
def test_undial_loss_equals_a_hand_computation(beta, classes):
    """CE between the student and softmax(teacher logits − β on the true token), over targets."""
    import torch

    batch, logits, labels = _batch(seed=4, classes=classes)
    teacher = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
    batch.ref_logits = teacher
    loss = _methods()["undial"].forget_loss(batch, {"beta": beta})
    if classes:
        positions = [(row, y, (b,)) for b, (row, y) in
                     enumerate(zip(logits.detach().double().tolist(), labels.tolist(), strict=True))]
        teachers = teacher.double().tolist()
    else:
        positions = _targets(logits, labels)
        teachers = teacher.double().tolist()
    total = 0.0
    for row, y, at in positions:
        t_row = teachers[at[0]] if classes else teachers[at[0]][at[1]]
        q = _softmax([v - beta * (k == y) for k, v in enumerate(t_row)])
        p = _softmax(row)
        total += -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True))
    assert float(loss.detach()) == pytest.approx(total / len(positions), rel=1e-5)


def _preference_batch(seed: int):
    import torch

    from weightflow.ops import unlearn_methods as um

    g = torch.Generator().manual_seed(seed)
    nll, ref, alt, alt_ref = (torch.rand(4, generator=g) * 20 for _ in range(4))
    batch = um.ForgetBatch(nll_sum=nll, n_tok=torch.tensor([3, 5, 2, 4]), logits=None, labels=None,
                           task="causal-lm", ref_nll_sum=ref, alt_nll_sum=alt, alt_n_tok=torch.tensor([6, 1, 3, 2]),
                           alt_ref_nll_sum=alt_ref)
    return batch, [v.tolist() for v in (nll, ref, alt, alt_ref)]


@pytest.mark.parametrize("method", ["dpo", "idk-dpo"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_losses_equal_a_hand_computation(method, beta):
    """−(2/β)·mean log σ(β·((log π_θ − log π_ref)(alternate) − (log π_θ − log π_ref)(forget)))."""
    batch, (nll, ref, alt, alt_ref) = _preference_batch(seed=5)
    loss = _methods()[method].forget_loss(batch, {"beta": beta})
    total = 0.0
    for f, fr, a, ar in zip(nll, ref, alt, alt_ref, strict=True):
        margin = (-a + ar) - (-f + fr)
        total += -math.log(1 / (1 + math.exp(-beta * margin)))
    assert float(loss.detach()) == pytest.approx(2 / beta * total / 4, rel=1e-5)


def test_idk_nll_loss_is_the_token_mean_nll_of_the_refusals():
    batch, (_, _, alt, _) = _preference_batch(seed=6)
    loss = _methods()["idk-nll"].forget_loss(batch, {})
    assert float(loss.detach()) == pytest.approx(sum(alt) / (6 + 1 + 3 + 2), rel=1e-6)


def _hidden_batch(seed: int):
    import torch

    from weightflow.ops import unlearn_methods as um

    g = torch.Generator().manual_seed(seed)
    hidden, ref_hidden = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([[IGNORE, 2, 3, IGNORE], [1, 1, 1, 1]])
    forget = um.ForgetBatch(nll_sum=None, n_tok=None, logits=None, labels=labels, task="causal-lm", seed=seed,
                            hidden=hidden)
    retain = um.RetainBatch(None, None, None, labels, "causal-lm", hidden=hidden, ref_hidden=ref_hidden)
    return forget, retain, hidden.double().tolist(), ref_hidden.double().tolist(), labels.tolist()


def _distance(h, target_of, labels) -> float:
    """mean_b (1/|y_b|)·Σ_t mean_d (h − target)², t over labelled positions."""
    per_example = []
    for b, seq in enumerate(labels):
        ts = [t for t, y in enumerate(seq) if y != IGNORE]
        per_example.append(sum(sum((h[b][t][d] - target_of(b, t, d)) ** 2 for d in range(len(h[b][t])))
                               / len(h[b][t]) for t in ts) / len(ts))
    return sum(per_example) / len(per_example)


@pytest.mark.parametrize("coeff", [20.0, 2.0])
def test_rmu_losses_equal_a_hand_computation(coeff):
    from weightflow.ops.unlearn_methods.rmu import control_vector

    rmu = _methods()["rmu"]
    forget, retain, h, ref_h, labels = _hidden_batch(seed=7)
    u = control_vector(7, 5).double().tolist()
    want = _distance(h, lambda b, t, d: coeff * u[d], labels)
    assert float(rmu.forget_loss(forget, {"steering_coeff": coeff})) == pytest.approx(want, rel=1e-5)
    want = _distance(h, lambda b, t, d: ref_h[b][t][d], labels)
    assert float(rmu.retain_loss(retain, {})) == pytest.approx(want, rel=1e-5)


def test_rmu_steers_to_one_fixed_unit_vector_of_the_seed():
    """u: uniform [0, 1) entries scaled to norm 1 (as WMDP draws it), the same in every
    batch of a step, another for another seed."""
    from weightflow.ops.unlearn_methods.rmu import control_vector

    u = control_vector(0, 64)
    assert math.isclose(float(u.norm()), 1.0, rel_tol=1e-6) and float(u.min()) >= 0
    assert control_vector(0, 64).equal(u) and not control_vector(1, 64).equal(u)


# -- what the loop hands the methods --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import transformers

    path = save_tiny_llama(tmp_path_factory.mktemp("catalogue") / "llama")
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_the_captured_layer_output_is_the_models_hidden_state(tiny_llama):
    """Capture on decoder layer 0 equals transformers' hidden_states[1] (after block 0)."""
    import torch

    from weightflow.ops import unlearn_methods as um

    ids = torch.tensor([[1, 5, 9, 2, 7]])
    name, layer = um.decoder_layer(tiny_llama, 0)
    assert name == "model.layers.0"
    with torch.no_grad(), um.Capture(layer) as tap:
        out = tiny_llama(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(tap.output, out.hidden_states[1], rtol=0, atol=0)


def test_a_layer_out_of_range_is_a_clear_error(tiny_llama):
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops import unlearn_methods as um

    with pytest.raises(OpError, match=r"layer: 7 is out of range: the model has 2 decoder layers \(0..1\)"):
        um.decoder_layer(tiny_llama, 7)


@pytest.mark.parametrize("update, layer, expected", [
    ("down_proj", 1, {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}),
    ("down_proj", 0, {"model.layers.0.mlp.down_proj.weight"}),
    ("mlp", 1, {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")}),
])
def test_rmu_updates_the_mlps_of_layers_l_minus_2_to_l(tiny_llama, update, layer, expected):
    assert _methods()["rmu"].trainable(tiny_llama, {"update": update, "layer": layer}) == expected


def test_rmu_update_all_is_every_parameter(tiny_llama):
    names = {n for n, _ in tiny_llama.named_parameters()}
    assert _methods()["rmu"].trainable(tiny_llama, {"update": "all", "layer": 1}) == names


def test_the_idk_templates_are_tofus_list_and_fixed_per_row_and_seed():
    from weightflow.ops.unlearn_methods import _idk

    assert len(set(_idk.TEMPLATES)) == 100
    assert _idk.TEMPLATES[0] == "I'm not certain about that." and _idk.TEMPLATES[-1] == \
        "I'm not sure I can help with that."
    picks = [_idk.pick(0, i) for i in range(40)]
    assert picks == [_idk.pick(0, i) for i in range(40)] and set(picks) <= set(_idk.TEMPLATES)
    assert len(set(picks)) > 20 and picks != [_idk.pick(1, i) for i in range(40)]


def test_an_alternate_replaces_the_answer_after_the_prompt():
    """QA rows: the response field is replaced; pre-tokenized rows: the prompt (leading
    -100 labels) is kept and the alternate ids follow it."""
    from weightflow.ops import unlearn as U

    class Encoder:
        eos = 99

        def _ids(self, path, i, value, what):
            return value

    class Params:
        response_field = "answer"

    dpo = _methods()["dpo"]
    opts = {"alternate_field": "alternate"}
    row = {"question": "q", "answer": "a", "alternate": "b"}
    assert U._alternate_row(dpo, Encoder(), Params(), Path("f.jsonl"), 0, row, opts, 0) == \
        {"question": "q", "answer": "b", "alternate": "b"}
    row = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8], "alternate": [1, 2, 3]}
    assert U._alternate_row(dpo, Encoder(), Params(), Path("f.jsonl"), 0, row, opts, 0) == \
        {"input_ids": [5, 6, 1, 2, 3], "labels": [IGNORE, IGNORE, 1, 2, 3]}


# -- the params -----------------------------------------------------------------------------

def _pipeline_error(tmp_path: Path, fields: str, data: str = '{"text": "x"}') -> str:
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline

    (tmp_path / "d.jsonl").write_text(data + "\n")
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  base: {op: load, config: {model_type: llama}}\n"
                                    f"  u: {{op: unlearn, model: base, forget: d.jsonl, {fields}}}\n")
    with pytest.raises(PipelineError) as exc:
        load_pipeline(path)
    return str(exc.value)


@pytest.mark.parametrize("fields, fragment", [
    ("method: rmu, retain: d.jsonl, lora: {r: 2}", "'lora' does not apply to method rmu"),
    ("method: rmu, retain: d.jsonl, retain_loss: kl", "'retain_loss' does not apply to method rmu (it has its own"),
    ("method: rmu, retain: d.jsonl, update: attn", "parameter 'update'"),
    ("method: rmu, retain: d.jsonl, layer: -1", "parameter 'layer'"),
    ("method: dpo, retain: d.jsonl, task: sequence-classification",
     "method dpo is defined for task: causal-lm, not sequence-classification"),
    ("method: satimp, retain: d.jsonl, steering_coeff: 2", "'steering_coeff' does not apply to method satimp; "
                                                           "it is used by rmu"),
    ("method: dpo", "method dpo needs 'retain' data"),
    ("method: undial, retain_weight: 1", "method undial needs 'retain' data (or retain_weight: 0)"),
])
def test_the_new_methods_params_are_checked(tmp_path, fields, fragment):
    message = _pipeline_error(tmp_path, fields)
    assert fragment in message and "Traceback" not in message, message


@pytest.mark.parametrize("method, row, fragment", [
    ("dpo", {"question": "q", "answer": "a"}, "line 1 has no field 'alternate' (fields there: answer, question)"),
    ("idk-dpo", {"text": "abc"}, "method idk-dpo needs question/answer data (set prompt_field and response_field)"),
])
def test_data_the_alternates_need_is_checked_before_any_step_runs(tmp_path, method, row, fragment):
    from weightflow.dsl.lang.diagnostics import PipelineError

    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    qa = ", prompt_field: question, response_field: answer" if "question" in row else ""
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  base: {op: load, config: {model_type: llama}}\n"
                                    f"  u: {{op: unlearn, model: base, method: {method}, forget: d.jsonl, "
                                    f"retain: d.jsonl{qa}}}\n")
    with pytest.raises(PipelineError) as exc:
        run(path, tmp_path / "cache")
    assert fragment in str(exc.value) and "pipeline.yaml:4:" in str(exc.value), str(exc.value)


def test_the_keys_of_a_new_method_hold_its_defaults(tmp_path):
    from weightflow.dsl.lang.pipeline import load_pipeline

    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  base: {op: load, config: {model_type: llama}}\n"
                                    "  u: {op: unlearn, model: base, method: rmu, forget: d.jsonl, retain: d.jsonl}\n")
    params = load_pipeline(path).steps["u"].params_json()
    assert {k: params[k] for k in ("layer", "steering_coeff", "update", "forget_weight", "retain_weight")} == \
        {"layer": 7, "steering_coeff": 20.0, "update": "down_proj", "forget_weight": 1.0, "retain_weight": 1.0}
    assert "alternate_field" not in params and "beta1" not in params
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  base: {op: load, config: {model_type: llama}}\n"
                                    "  u: {op: unlearn, model: base, method: undial, forget: d.jsonl}\n", "q.yaml")
    params = load_pipeline(path).steps["u"].params_json()  # retain_weight 0 by default: no retain data needed
    assert (params["retain_weight"], params["beta"], params["forget_weight"]) == (0.0, 10.0, 1.0)


# -- on a tiny model --------------------------------------------------------------------------

def save_char_tokenizer(path: Path) -> None:
    """One token per printable ASCII character (and ’, which one refusal template has)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    chars = [chr(c) for c in range(32, 127)] + ["\u2019"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


# (method, learning rate, extra keys); 10 steps of batch 6 each
RECIPES = {
    # ce-u and undial have no retain term: at larger rates the shared prompt structure lets the
    # forget push reach the retain answers too (at 0.005 and 0.002 the retain NLL rose by half
    # and by a third of the forget rise)
    "ce-u": (0.001, ""),
    "satimp": (0.005, ""),
    "undial": (0.001, ""),
    "dpo": (0.005, ""),
    "idk-dpo": (0.005, ""),
    "idk-nll": (0.005, ""),
    "rmu": (0.01, ", layer: 1"),
}


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory):
    """A tiny Llama with a character tokenizer learns answers to two kinds of question
    ("who is xyz?" -> abcde..., "what is xyz?" -> fghij...; the first are the forget set),
    then each method unlearns the first kind for 10 steps; the unlearn steps run again
    (--force) for the determinism check."""
    from weightflow.dsl.store.content import Store

    root = tmp_path_factory.mktemp("unlearned")
    r = random.Random(0)

    def word(n: int, letters: str) -> str:
        return "".join(r.choice(letters) for _ in range(n))

    forget = [{"question": f"who is {word(3, 'abcdefghij')}?", "answer": "abcde" + word(3, "abcde"),
               "alternate": "vwxyz" + word(3, "vwxyz")} for _ in range(8)]
    retain = [{"question": f"what is {word(3, 'abcdefghij')}?", "answer": "fghij" + word(3, "fghij")}
              for _ in range(16)]
    for name, rows in (("forget", forget), ("retain", retain), ("all", forget + retain)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    qa = "prompt_field: question, response_field: answer"
    steps = "\n".join(
        f"  {m.replace('-', '_')}: {{op: unlearn, method: {m}, model: known, forget: forget.jsonl, "
        f"retain: retain.jsonl, {qa}, max_steps: 10, batch_size: 6, learning_rate: {lr}{extra}}}"
        for m, (lr, extra) in RECIPES.items())
    path = write_pipeline(root, f"""
weightflow: 1
steps:
  base: {{op: load, source: ./model}}
  known: {{op: finetune, model: base, data: all.jsonl, {qa}, max_steps: 50, learning_rate: 0.01,
          batch_size: 8, lr_scheduler: constant}}
{steps}
""")
    # The model is built and the pipeline run in strict reproducibility mode, in a fresh
    # process (it must be set before torch is imported): a 50-step fine-tune then 10
    # unlearning steps of a tiny model amplify last-bit differences, and platform mode's bits
    # (the random initialisation included) depend on the CPU's vector ISA: the CE-U check
    # that passed on an AVX-512 machine failed on an AVX2 one (retain rise 2.0 against a
    # forget rise of 2.2).  Strict runs the same bits on every machine (repro.apply sets and
    # unsets the variables that matter, whatever this process has), so what is asserted
    # below is one outcome everywhere.
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--strict-child", str(path),
                           str(root / "cache"), ",".join(m.replace("-", "_") for m in RECIPES)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    store = Store(root / "cache")
    entries = {name: store.lookup(key) for name, key in result["keys"].items()}
    return {"entries": entries, **result}


def _info(unlearned, method: str) -> dict:
    return unlearned["entries"][method.replace("-", "_")].manifest["info"]


def _rise(unlearned, method: str) -> dict[str, float]:
    losses = _info(unlearned, method)["losses"]
    return {k: v["after"] - v["before"] for k, v in losses.items()}


def test_the_known_model_learnt_both_sets(unlearned):
    losses = _info(unlearned, "ce-u")["losses"]
    assert losses["forget"]["before"] < 1.0 and losses["retain"]["before"] < 1.0, losses


def test_every_method_gives_the_same_bytes_when_run_again(unlearned):
    status = unlearned["status"]
    assert all(status[m.replace("-", "_")] == "executed" for m in RECIPES), status
    digests = [unlearned["first"], unlearned["again"]]
    assert digests[0] == digests[1]
    assert len({digests[0][m.replace("-", "_")] for m in RECIPES}) == len(RECIPES)  # each did something else


def test_ce_u_raises_the_forget_nll_far_more_than_the_retain_nll(unlearned):
    """CE-U has no retain term: the retain NLL rises too (shared prompt structure), but the
    forget NLL rises several times more."""
    rise = _rise(unlearned, "ce-u")
    assert rise["forget"] > 0.5 and rise["forget"] > 3 * rise["retain"], rise


def test_satimp_raises_the_forget_nll_and_keeps_the_retain_nll(unlearned):
    """With open-unlearning's defaults (forget weight 0.1, weights p^5·(1 − p)) the forget
    push is small next to the retain term, so the retain NLL even falls a little."""
    rise = _rise(unlearned, "satimp")
    assert rise["forget"] > 0.3 and rise["retain"] < 0.05, rise


def test_undial_raises_the_forget_nll_and_spares_the_retain_nll(unlearned):
    """No retain term by default; the adjusted-logit target keeps every other token's
    distribution, so the retain NLL moves much less."""
    rise = _rise(unlearned, "undial")
    assert rise["forget"] > 0.3 and rise["retain"] < rise["forget"] / 3, rise


@pytest.mark.parametrize("method", ["dpo", "idk-dpo"])
def test_dpo_prefers_the_alternate_and_keeps_the_retain_nll(unlearned, method):
    """At the first step θ = π_ref, so the loss is (2/β)·log 2; then the alternate answer
    gains on the forget answer (their NLL gap shrinks) and the retain NLL stays close."""
    info = _info(unlearned, method)
    assert info["training_curve"][0]["forget_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    rise = _rise(unlearned, method)
    assert rise["forget"] > 0.5 and rise["alternate"] < rise["forget"] - 0.5 and abs(rise["retain"]) < 0.3, rise


def test_idk_nll_learns_to_refuse_and_forgets(unlearned):
    rise = _rise(unlearned, "idk-nll")
    assert rise["alternate"] < -1.0 and rise["forget"] > 0.5 and abs(rise["retain"]) < 0.3, rise


def test_rmu_forgets_through_the_chosen_parameters_only(unlearned):
    """Steering layer 1's output on forget tokens raises the forget NLL; the retain term
    (0 at the first step, θ = π_ref) keeps the retain NLL close; only the MLP output
    projections of layers 0..1 change."""
    info = _info(unlearned, "rmu")
    assert info["training_curve"][0]["retain_loss"] == 0.0
    assert info["rmu"] == {"updated_tensors": 2, "updated_parameters": 2 * 64 * 128}
    rise = _rise(unlearned, "rmu")
    assert rise["forget"] > 0.2 and rise["retain"] < rise["forget"] / 3, rise
    before = read_model(unlearned["entries"]["known"].path)
    after = read_model(unlearned["entries"]["rmu"].path)
    changed = {n for n in before if not before[n].equal(after[n])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_the_new_methods_are_listed_in_the_op_doc():
    from weightflow.ops import unlearn as U

    for name in NEW:
        assert f"- ``{name}``" in U.OP.doc


def _strict_child(path: Path, cache: Path, forced: list[str]) -> None:
    """In strict mode: build the tiny model next to the pipeline, run the pipeline, then run
    it again forcing ``forced``; print the keys, both runs' digests and the second run's
    statuses as one JSON line."""
    from weightflow.dsl.engine import repro

    repro.apply("strict")  # before torch is imported, as the CLI does
    import torch  # noqa: F401

    repro.configure_torch("strict")
    save_char_tokenizer(save_tiny_llama(path.parent / "model"))
    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    def once(force=()):
        return Runner(load_pipeline(path), Store(cache), force=list(force), reproducible="strict",
                      log=lambda m: None).run()

    first = once()
    again = once(forced)
    print(json.dumps({"keys": {s.name: s.key for s in first.steps},
                      "first": {s.name: s.digest for s in first.steps},
                      "again": {s.name: s.digest for s in again.steps},
                      "status": {s.name: s.status for s in again.steps}}))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--strict-child":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _strict_child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(","))
