"""extract-lora: a delta as LoRA factors B·A, read as dense by every later op, exported
as a PEFT adapter that peft loads onto the base (issue 15).

Expected values come from an SVD computed here with ``torch.linalg.svd``, from the raw
factor tensors in the stored safetensors file, and from peft's own merge."""

from __future__ import annotations

import json

import pytest
from conftest import read_model, run, write_pipeline

PIPE = """
weightflow: 1
name: lora
steps:
  base: {{op: load, source: {base}}}
  ft: {{op: load, source: {ft_a}}}
  d: {{op: extract-delta, model: ft, base: base}}
  lora: {{op: extract-lora, delta: d, rank: 4}}
  full: {{op: extract-lora, delta: d, rank: 100000, others: keep}}
  energy: {{op: extract-lora, delta: d, energy: 0.5, include: ["*.mlp.*"]}}
  thresh: {{op: extract-lora, delta: d, sv_threshold: 0.15, rank: 6, include: ["*self_attn*"]}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [lora], lambda: 0.5}}
"""


@pytest.fixture(scope="module")
def project(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    path = write_pipeline(tmp, PIPE.format(**{k: str(v) for k, v in tiny_models.items()}))
    outcome, status = run(path, tmp / "cache")
    assert set(status.values()) == {"executed"}, status
    from weightflow.dsl.store.content import Store

    store = Store(tmp / "cache")
    entries = {s.name: store.lookup(s.key) for s in outcome.steps}
    return tmp, path, entries


def _raw(entry) -> dict:
    """Every stored tensor of a delta as safetensors holds it (factors under their own names)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(entry.path.glob("delta*.safetensors")):
        out.update(load_file(f))
    return out


def _svd(d):
    import torch

    return torch.linalg.svd(d.double(), full_matrices=False)


def test_factors_are_the_truncated_svd_and_their_error_is_reported(project):
    import torch

    _, _, e = project
    delta = read_model(e["d"].path)
    raw = _raw(e["lora"])
    dense = read_model(e["lora"].path)
    errors = e["lora"].manifest["info"]["relative_error"]
    two_d = [n for n, t in delta.items() if t.dim() == 2]
    assert set(dense) == set(two_d) == set(errors)  # others: drop (norms are 1-D)
    for n in two_d:
        a, b = raw[f"{n}::lora_A"], raw[f"{n}::lora_B"]
        assert a.shape == (4, delta[n].shape[1]) and b.shape == (delta[n].shape[0], 4)
        # read back as the dense product of the stored factors
        torch.testing.assert_close(dense[n].double(), b.double() @ a.double(), rtol=0, atol=1e-6)
        u, s, vh = _svd(delta[n])
        best = (u[:, :4] * s[:4]) @ vh[:4]                          # Eckart–Young optimum
        torch.testing.assert_close(dense[n].double(), best, rtol=0, atol=1e-5)
        expected = float(s[4:].square().sum().sqrt() / s.square().sum().sqrt())
        assert errors[n] == pytest.approx(expected, rel=1e-4)
        measured = float((delta[n].double() - dense[n].double()).norm() / delta[n].double().norm())
        assert errors[n] == pytest.approx(measured, rel=1e-4)


def test_full_rank_reconstructs_exactly_and_others_keep_stays_dense(project):
    import torch

    _, _, e = project
    delta, full = read_model(e["d"].path), read_model(e["full"].path)
    assert set(full) == set(delta)
    for n, t in delta.items():
        if t.dim() == 2:
            torch.testing.assert_close(full[n], t, rtol=0, atol=1e-6 * float(t.abs().max()))
            assert e["full"].manifest["info"]["relative_error"][n] < 1e-6
        else:
            assert torch.equal(full[n], t)  # kept as it was
    ranks = json.loads((e["full"].path / "weightflow.json").read_text())["ranks"]
    assert ranks == {n: min(t.shape) for n, t in delta.items() if t.dim() == 2}


def test_energy_and_threshold_pick_the_rank_from_the_spectrum(project):
    import torch

    _, _, e = project
    delta = read_model(e["d"].path)
    for step, rule in (("energy", "energy"), ("thresh", "threshold")):
        meta = json.loads((e[step].path / "weightflow.json").read_text())
        assert meta["ranks"], step
        for n, r in meta["ranks"].items():
            s = _svd(delta[n])[1]
            if rule == "energy":
                frac = torch.cumsum(s * s, 0) / (s * s).sum()
                want = int((frac < 0.5).sum()) + 1
            else:
                want = min(6, int((s > 0.15).sum()))
            assert r == want, (step, n)
    assert all(".mlp." in n for n in json.loads((e["energy"].path / "weightflow.json").read_text())["ranks"])


def test_merge_reads_the_factors_as_the_dense_delta(project):
    import torch

    _, _, e = project
    base, merged, lora = read_model(e["base"].path), read_model(e["merged"].path), read_model(e["lora"].path)
    for n, w in base.items():
        want = (w.double() + 0.5 * lora[n].double()).float() if n in lora else w
        torch.testing.assert_close(merged[n], want, rtol=0, atol=1e-7)


def test_peft_loads_the_export_and_merges_to_base_plus_ba(project, tmp_path, cli):
    import torch
    import transformers
    from peft import PeftModel

    tmp, path, e = project
    target = tmp_path / "adapter"
    rc, out, err = cli("export", path, "lora", target, "--cache-dir", tmp / "cache", "--format", "peft")
    assert rc == 0, err
    config = json.loads((target / "adapter_config.json").read_text())
    lora = read_model(e["lora"].path)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert sorted(config["target_modules"]) == sorted(n.removesuffix(".weight") for n in lora)
    assert "model.embed_tokens" in config["target_modules"]  # an nn.Embedding: peft's lora_embedding_A/B
    base = transformers.AutoModelForCausalLM.from_pretrained(e["base"].path, dtype=torch.float32)
    want = {n: t.clone() for n, t in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, target).merge_and_unload().state_dict()
    for n, w in want.items():
        expected = w.double() + lora[n].double() if n in lora else w.double()
        torch.testing.assert_close(merged[n].double(), expected, rtol=0, atol=1e-5)
    assert any(not torch.equal(merged[n], want[n]) for n in lora)
    assert "for the output of step `base`" in (target / "README.md").read_text()  # the card names the base


def test_a_dense_export_writes_the_product(project, tmp_path, cli):
    import torch
    from safetensors.torch import load_file

    tmp, path, e = project
    target = tmp_path / "dense"
    rc, _, err = cli("export", path, "lora", target, "--cache-dir", tmp / "cache")
    assert rc == 0, err
    got = {}
    for f in target.glob("*.safetensors"):
        got.update(load_file(f))
    lora = read_model(e["lora"].path)
    assert set(got) == set(lora)
    for n in lora:
        assert torch.equal(got[n], lora[n])


def test_peft_export_of_a_delta_with_dense_tensors_is_a_clear_error(project, tmp_path, cli):
    tmp, path, _ = project
    rc, _, err = cli("export", path, "full", tmp_path / "x", "--cache-dir", tmp / "cache", "--format", "peft")
    assert rc != 0 and "others: keep" in err and "Traceback" not in err


def test_randomized_svd_is_seeded_and_close_to_the_optimum():
    import torch

    from weightflow.ops.extract_lora import ExtractLoraParams, factor, relative_error

    g = torch.Generator().manual_seed(0)
    d = torch.randn(120, 16, generator=g) @ torch.randn(16, 80, generator=g)
    d += 0.01 * torch.randn(120, 80, generator=g)  # rank 16 plus noise
    params = ExtractLoraParams(delta="d", rank=10, randomized=True)
    a1, b1, used = factor(d, params, seed=7)
    a2, b2, _ = factor(d, params, seed=7)
    assert used and torch.equal(a1, a2) and torch.equal(b1, b2)
    exact = ExtractLoraParams(delta="d", rank=10, randomized=False)
    ae, be, used_exact = factor(d, exact, seed=7)
    assert not used_exact
    assert relative_error(d, a1, b1) <= relative_error(d, ae, be) * 1.02


@pytest.mark.parametrize(("params", "message"), [
    ({}, "needs 'rank'"),
    ({"sv_threshold": 0.1, "energy": 0.9}, "not both"),
    ({"energy": 0.9, "randomized": True}, "randomized: true needs 'rank'"),
    ({"rank": 0}, "greater than or equal to 1"),
    ({"energy": 1.5}, "less than or equal to 1"),
])
def test_bad_params_are_clear_errors(params, message):
    from pydantic import ValidationError

    from weightflow.ops.extract_lora import ExtractLoraParams

    with pytest.raises(ValidationError, match=message):
        ExtractLoraParams(delta="d", **params)


def test_factors_match_mergekit_extract_lora(project):
    """mergekit-extract-lora's decomposition (max rank and --sv-epsilon) of the same delta
    gives the same rank and the same product B·A."""
    import torch

    pytest.importorskip("mergekit")
    from mergekit.scripts.extract_lora import TaskVectorDecompositionTask

    _, _, e = project
    delta, ours = read_model(e["d"].path), read_model(e["thresh"].path)
    ranks = json.loads((e["thresh"].path / "weightflow.json").read_text())["ranks"]
    task = TaskVectorDecompositionTask.model_construct(max_rank=6, sv_epsilon=0.15, distribute_scale=True,
                                                       transpose=False)
    assert ranks
    for n in ranks:
        a, b = task.execute(delta[n])
        assert a.shape[0] == ranks[n], n
        torch.testing.assert_close(ours[n], b @ a, rtol=0, atol=2e-6)


def test_show_lists_the_factored_tensors_with_their_rank(project):
    from weightflow.dsl.present.tensor_stats import summarize

    _, _, e = project
    summary = summarize(e["lora"].path, "Delta")
    dense = read_model(e["lora"].path)
    rows = {r["name"]: r for r in summary["per_tensor"]}
    assert set(rows) == set(dense)
    for n, t in dense.items():
        assert rows[n]["storage"] == "lora r=4" and rows[n]["stored_bytes"] == 4 * 4 * sum(t.shape)
        assert rows[n]["l2"] == pytest.approx(float(t.double().norm()), rel=1e-6)
