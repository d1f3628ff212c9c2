"""The opt-in training speed options (group_by_length, packing, target_logits_only, bf16,
adamw_torch_fused): each is in the step key only when on; packing gives the loss of the
unpacked batch (positions restart, attention stays within each example); target_logits_only
gives the loss and gradient of the full-logits path; length-grouped batches are deterministic
and cover every example once per epoch; the default AdamW path is bit-identical to torch's
one-tensor-at-a-time loop."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import run, save_tiny_llama, write_pipeline

FT = """
weightflow: 1
steps:
  base: {{op: load, source: {model}}}
  ft:
    op: finetune
    model: base
    data: train.jsonl
    max_steps: 2
    batch_size: 4
{extra}
"""


def token_rows(n: int, seed: int, lo: int = 3, hi: int = 256) -> list[dict]:
    r = random.Random(seed)
    return [{"input_ids": [r.randrange(lo, hi) for _ in range(r.randrange(3, 20))]} for _ in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("speed") / "llama", seed=0)


def key_of(tmp_path: Path, extra: str, name: str) -> str:
    from weightflow.dsl.engine.keys import key_material, step_key
    from weightflow.dsl.lang.pipeline import load_pipeline

    write_rows(tmp_path / "train.jsonl", token_rows(4, 0))
    path = write_pipeline(tmp_path, FT.format(model="models/x", extra=extra), name=f"{name}.yaml")
    step = load_pipeline(path).steps["ft"]
    return step_key(key_material(step, {"base": "0" * 64}, lambda f: "data", None))


def test_each_option_changes_the_key_only_when_on(tmp_path):
    default = key_of(tmp_path, "", "default")
    options = ("group_by_length", "packing", "target_logits_only", "bf16")
    off = {o: key_of(tmp_path, f"    {o}: false", f"{o}-off") for o in options}
    assert set(off.values()) == {default}  # off is the same recipe as unset: existing keys stay
    on = {o: key_of(tmp_path, f"    {o}: true", f"{o}-on") for o in options}
    on["fused"] = key_of(tmp_path, "    optimizer: adamw_torch_fused", "fused")
    assert len(set(on.values()) | {default}) == 6


# -- packing -------------------------------------------------------------------------

def _examples(rows):
    from weightflow.ops.lib.training import Example

    return [Example(r["input_ids"], list(r["input_ids"])) for r in rows]


def _model(llama: Path):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()


@pytest.mark.parametrize("capacity", [40, 128])
def test_packing_gives_the_loss_and_gradient_of_the_unpacked_batch(llama, capacity):
    import torch

    from weightflow.ops.lib import training as T

    model = _model(llama)
    examples = _examples(token_rows(8, 1))
    packed = T.pack(examples, 0, capacity, "cpu")
    assert packed.input_ids.shape[0] < len(examples)  # fewer rows than examples: really packed
    assert packed.input_ids.shape[1] <= capacity
    # every example's own positions 0..n-1, and no target on the first token of an example
    assert int((packed.position_ids == 0).sum()) >= len(examples)
    assert int((packed.labels != T.IGNORE).sum()) == sum(len(e.ids) - 1 for e in examples)

    def loss_and_grad(batch):
        model.zero_grad(set_to_none=True)
        nll, n_tok, _ = T.sequence_nll(model, batch, "causal-lm")
        loss = T.mean_nll(nll, n_tok)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    padded_loss, padded_grad = loss_and_grad(T.collate(examples, 0, "causal-lm"))
    packed_loss, packed_grad = loss_and_grad(packed)
    # the independent reference: each example alone (no padding, no packing), summed by hand
    with torch.no_grad():
        total, count = 0.0, 0
        for e in examples:
            logits = model(input_ids=torch.tensor([e.ids])).logits[0, :-1]
            target = torch.tensor(e.ids[1:])
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += len(target)
    assert packed_loss == pytest.approx(total / count, rel=1e-5, abs=1e-6)
    assert padded_loss == pytest.approx(total / count, rel=1e-5, abs=1e-6)
    assert torch.allclose(packed_grad, padded_grad, rtol=1e-4, atol=1e-6)


def test_packing_without_position_ids_would_mix_examples(llama):
    """The check that guards packing fails where examples can see each other."""
    import torch

    from weightflow.ops.lib import training as T

    model = _model(llama)
    examples = _examples(token_rows(2, 2))
    T.check_packing(model, "causal-lm", examples, 0)  # Llama isolates them: no error
    packed = T.pack(examples, 0, 64, "cpu")
    with torch.no_grad():
        isolated = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
        mixed = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    n0 = max(len(e.ids) for e in examples)
    assert torch.allclose(isolated[0, :n0], mixed[0, :n0], atol=1e-5)  # the first example sees only itself
    assert not torch.allclose(isolated[0, n0:], mixed[0, n0:], atol=1e-3)  # the second would see the first
    with pytest.raises(Exception, match="packing applies to causal-lm"):
        T.check_packing(model, "sequence-classification", examples, 0)


# -- target_logits_only --------------------------------------------------------------

def _chat_examples(rows, prompt_len):
    """Examples whose first ``prompt_len`` tokens have no target, as prompt/response data gives."""
    from weightflow.ops.lib.training import IGNORE, Example

    return [Example(r["input_ids"], [IGNORE] * prompt_len + r["input_ids"][prompt_len:]) for r in rows
            if len(r["input_ids"]) > prompt_len + 1]


@pytest.mark.parametrize("packed", [False, True])
def test_target_logits_only_gives_the_loss_and_gradient_of_the_full_logits(llama, packed):
    import torch

    from weightflow.ops.lib import training as T

    model = _model(llama)
    examples = _chat_examples(token_rows(8, 5), prompt_len=3)
    batch = T.pack(examples, 0, 64, "cpu") if packed else T.collate(examples, 0, "causal-lm")
    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-2]))

    def loss_and_grad(fn):
        model.zero_grad(set_to_none=True)
        nll, n_tok = fn(batch)
        loss = T.mean_nll(nll, n_tok)
        loss.backward()
        return nll.detach(), n_tok, float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])

    full = loss_and_grad(lambda b: T.sequence_nll(model, b, "causal-lm")[:2])
    ours = loss_and_grad(lambda b: T.target_nll(model, b))
    hook.remove()
    targets = int((batch.labels[:, 1:] != T.IGNORE).sum())
    assert seen == [batch.input_ids.shape[1], targets]  # the head ran on every position, then on targets only
    assert targets < batch.input_ids.numel() * 0.8  # prompts and padding really were left out
    assert torch.equal(full[1], ours[1])
    assert torch.allclose(full[0], ours[0], rtol=1e-5, atol=1e-5)  # per example, not just the total
    assert ours[2] == pytest.approx(full[2], rel=1e-5)
    assert torch.allclose(full[3], ours[3], rtol=1e-4, atol=1e-6)


def test_target_logits_only_refuses_models_that_rescale_their_logits(tmp_path):
    """Cohere multiplies the head's output by logit_scale: the head alone would give another loss."""
    import torch
    import transformers

    from weightflow.ops.lib import training as T

    cfg = transformers.CohereConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25)
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(cfg).eval()
    examples = _chat_examples(token_rows(2, 6), prompt_len=2)
    with pytest.raises(Exception, match="not its LM head applied"):
        T.check_target_logits(model, "causal-lm", examples, 0)
    model.logit_scale = 1.0  # the same model without the rescaling passes
    T.check_target_logits(model, "causal-lm", examples, 0)
    with pytest.raises(Exception, match="target_logits_only applies to causal-lm"):
        T.check_target_logits(model, "sequence-classification", examples, 0)


# -- length-grouped batches ----------------------------------------------------------

def test_group_by_length_is_deterministic_covers_each_epoch_and_cuts_padding():
    from weightflow.ops.lib import training as T

    r = random.Random(0)
    lengths = [r.randrange(2, 120) for _ in range(203)]

    def epochs(seed, n=3):
        order = T.length_grouped_order(lengths, 8, seed, mega=5)
        per_epoch = -(-len(lengths) // 8)
        return [[next(order) for _ in range(per_epoch)] for _ in range(n)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert a == b and a != c
    for epoch in a:
        assert sorted(i for batch in epoch for i in batch) == list(range(len(lengths)))
    assert a[0] != a[1]  # a fresh order every epoch

    def padding(batches):
        return sum(len(bt) * max(lengths[i] for i in bt) - sum(lengths[i] for i in bt) for bt in batches)

    plain = T.batch_order(len(lengths), 8, 1)
    random_batches = [next(plain) for _ in range(len(a[0]))]
    assert padding(a[0]) < 0.5 * padding(random_batches)


# -- the optimizer ---------------------------------------------------------------------

def test_default_adamw_is_bit_identical_to_the_one_tensor_loop(llama):
    import torch

    from weightflow.ops.lib import training as T
    from weightflow.ops.lib.train_params import TrainParams

    params = TrainParams(learning_rate=1e-3, weight_decay=0.01)

    def trained(make):
        model = _model(llama).train()
        opt = make(model)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def loop(model):
        ps = list(model.parameters())
        return torch.optim.AdamW([{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.01},
                                  {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}],
                                 lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False)

    small_groups = 5000  # also cut into several groups, as big models are
    old = T.FOREACH_GROUP_ELEMENTS
    try:
        T.FOREACH_GROUP_ELEMENTS = small_groups
        ours = trained(lambda m: T.make_optimizer(m, params))
    finally:
        T.FOREACH_GROUP_ELEMENTS = old
    assert torch.equal(ours, trained(loop))
    assert len(T._cut([torch.zeros(3000), torch.zeros(3000), torch.zeros(9000)], small_groups)) == 3


# -- end to end ----------------------------------------------------------------------

def test_finetune_runs_with_every_option_and_records_the_loop_time(tmp_path, store_dir, llama):
    from weightflow.dsl.store.content import Store

    write_rows(tmp_path / "train.jsonl", token_rows(12, 4))
    extra = ("    packing: true\n    group_by_length: true\n    target_logits_only: true\n    bf16: true\n"
             "    optimizer: adamw_torch_fused")
    outcome, status = run(write_pipeline(tmp_path, FT.format(model=llama, extra=extra)), store_dir)
    assert status == {"base": "executed", "ft": "executed"}
    ft = next(s for s in outcome.steps if s.name == "ft")
    info = Store(store_dir).lookup(ft.key).manifest["info"]
    assert [c["step"] for c in info["training_curve"]] == [1, 2]
    assert info["timing"]["train_loop_s"] > 0


@pytest.mark.parametrize("option", ["packing", "target_logits_only"])
def test_causal_lm_options_are_refused_for_classification_before_anything_runs(option):
    from pydantic import ValidationError

    from weightflow.ops.finetune import FinetuneParams

    base = {"model": "base", "data": "train.jsonl"}
    FinetuneParams.model_validate({**base, option: True})  # task auto: decided from the model at run time
    with pytest.raises(ValidationError, match=f"{option}: applies to causal-lm fine-tunes"):
        FinetuneParams.model_validate({**base, "task": "sequence-classification", option: True})
