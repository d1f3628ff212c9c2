"""collect-stats and the data-aware merges (regmean, fisher, adamerging) against plain
implementations written here: RegMean's closed form solved with torch.linalg on the stored
Grams (and, on hand-built data, against least squares on the stacked inputs), Fisher
weighting by hand, Gram matrices and Fisher diagonals recomputed by hooking / differentiating
the model one example at a time."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LLAMA, read_model, run, write_pipeline

PIPE = """
weightflow: 1
name: data-aware
seed: 0
vars: {{alphas: [0.7]}}
steps:
  base: {{op: load, source: {base}}}
  ft_a: {{op: load, source: {ft_a}}}
  ft_b: {{op: load, source: {ft_b}}}
  gram_a: {{op: collect-stats, model: ft_a, kind: gram, data: calib_a.jsonl, batch_size: 3}}
  gram_b: {{op: collect-stats, model: ft_b, kind: gram, data: calib_b.jsonl, batch_size: 4}}
  fisher_a: {{op: collect-stats, model: ft_a, kind: fisher, data: calib_a.jsonl, fisher_labels: empirical}}
  fisher_b: {{op: collect-stats, model: ft_b, kind: fisher, data: calib_b.jsonl, fisher_labels: empirical}}
  regmean:
    op: merge
    method: regmean
    models: [ft_a, ft_b]
    stats: [gram_a, gram_b]
    matrix: {{alpha: "${{vars.alphas}}"}}
  fisher:
    op: merge
    method: fisher
    models: [ft_a, ft_b]
    stats: [fisher_a, fisher_b]
    weights: [1.0, 2.0]
"""


def _calibration(tmp_path):
    g = torch.Generator().manual_seed(7)
    for name, n in (("calib_a.jsonl", 7), ("calib_b.jsonl", 9)):
        lines = []
        for _ in range(n):
            length = int(torch.randint(3, 12, (1,), generator=g))
            lines.append(json.dumps({"input_ids": torch.randint(0, 256, (length,), generator=g).tolist()}))
        (tmp_path / name).write_text("\n".join(lines) + "\n")


def _ids(tmp_path, name):
    return [json.loads(line)["input_ids"] for line in (tmp_path / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_models):
    """The pipeline above, run once: (pipeline dir, store dir, {step: StepStatus})."""
    tmp = tmp_path_factory.mktemp("data_aware")
    _calibration(tmp)
    path = write_pipeline(tmp, PIPE.format(**{k: str(v) for k, v in tiny_models.items()}))
    outcome, status = run(path, tmp / "cache")
    assert set(status.values()) == {"executed"}, status
    return tmp, path, {s.name: s for s in outcome.steps}


def _entry(ran, step):
    from weightflow.dsl.store.content import Store

    tmp, _, steps = ran
    return Store(tmp / "cache").lookup(steps[step].key)


def _model(path):
    from weightflow.ops.lib.models import load_model

    return load_model(path)


# -- collect-stats ---------------------------------------------------------------------

def test_gram_is_xtx_of_every_linear_input_hooked_one_example_at_a_time(ran, tiny_models):
    tmp, _, _ = ran
    grams = read_model(_entry(ran, "gram_a").path)
    model = _model(tiny_models["ft_a"])
    seen: dict[str, list] = {}
    def keep(_m, inp, _o, n):
        seen.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1]))
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: keep(_m, inp, _o, n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ids in _ids(tmp, "calib_a.jsonl"):  # unbatched: no padding to leave out
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    assert set(grams) == {f"{n}.weight" for n in seen}
    for n, xs in seen.items():
        x = torch.cat(xs).double()
        expected = x.T @ x / x.shape[0]
        assert torch.allclose(grams[f"{n}.weight"].double(), expected, rtol=1e-4, atol=1e-5), n
    meta = _entry(ran, "gram_a").manifest
    assert meta["kind"] == "Stats"


def test_fisher_diagonal_is_mean_squared_gradient_of_the_log_likelihood(ran, tiny_models):
    tmp, _, _ = ran
    fisher = read_model(_entry(ran, "fisher_b").path)
    model = _model(tiny_models["ft_b"])
    examples = _ids(tmp, "calib_b.jsonl")
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ids in examples:
        model.zero_grad()
        x = torch.tensor([ids])
        # HF's mean next-token cross-entropy times the number of predicted tokens: −log p(text)
        (model(x, labels=x).loss * (len(ids) - 1)).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad ** 2
    assert set(fisher) == set(acc)
    for n, a in acc.items():
        assert torch.allclose(fisher[n], a / len(examples), rtol=1e-3, atol=1e-9), n


def test_stats_kinds_are_checked_and_exported_raw(ran, tmp_path, tiny_models, cli):
    tmp, path, _ = ran
    # a Gram step where Fisher stats are expected: a clear error, at run time
    bad = write_pipeline(tmp, (tmp / "pipeline.yaml").read_text().replace(
        "stats: [fisher_a, fisher_b]", "stats: [gram_a, gram_b]"), name="bad.yaml")
    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.diagnostics import WeightflowError
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    with pytest.raises(WeightflowError, match="fisher needs fisher statistics.*'gram_a' holds gram"):
        Runner(load_pipeline(bad), Store(tmp / "cache"), targets=["fisher"], log=lambda m: None).run()
    # a Model where Stats are expected: a type error before anything runs
    wrong = write_pipeline(tmp, (tmp / "pipeline.yaml").read_text().replace(
        "stats: [gram_a, gram_b]", "stats: [ft_a, gram_b]"), name="wrong.yaml")
    rc, out, err = cli("validate", wrong)
    assert rc != 0 and "Stats" in err + out
    rc, out, err = cli("show", path, "gram_a", "--cache-dir", tmp / "cache")
    assert rc == 0, err
    assert "-> Stats" in out and "stats     gram (15 tensors" in out and "over 7 examples" in out
    rc, out, err = cli("export", path, "gram_a", tmp_path / "exported", "--cache-dir", tmp / "cache")
    assert rc == 0, err
    assert (tmp_path / "exported" / "stats.safetensors").is_file()
    assert torch.equal(read_model(tmp_path / "exported")["model.layers.0.mlp.down_proj.weight"],
                       read_model(_entry(ran, "gram_a").path)["model.layers.0.mlp.down_proj.weight"])


# -- regmean ---------------------------------------------------------------------------

def test_regmean_closed_form_on_hand_built_grams_is_least_squares_on_stacked_inputs():
    from weightflow.ops.lib.stats import regmean_weight

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3)]  # nn.Linear's [out, in]
    grams = [x.T @ x for x in xs]
    merged, exact = regmean_weight(ws, grams, alpha=1.0)
    assert exact
    # min Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²: one least-squares problem on the stacked inputs
    a = torch.cat(xs)
    b = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    expected = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(merged, expected, atol=1e-10)
    # alpha scales the off-diagonal entries only; alpha 0 is a per-input weighted average
    merged0, _ = regmean_weight(ws, grams, alpha=0.0)
    d = torch.stack([gr.diagonal() for gr in grams])                       # [models, in]
    by_hand = sum(w * di for w, di in zip(ws, d, strict=True)) / d.sum(0)  # per input column
    assert torch.allclose(merged0, by_hand, atol=1e-12)


def test_regmean_merge_equals_the_closed_form_on_the_stored_grams(ran, tiny_models):
    merged = read_model(_entry(ran, "regmean@alpha=0.7").path)
    ga, gb = (read_model(_entry(ran, s).path) for s in ("gram_a", "gram_b"))
    a, b = read_model(tiny_models["ft_a"]), read_model(tiny_models["ft_b"])
    assert set(merged) == set(a)
    linear = 0
    for name, w in merged.items():
        if name in ga:
            grams = []
            for g in (ga[name].double(), gb[name].double()):
                s = 0.7 * g
                s.diagonal().copy_(g.diagonal())
                grams.append(s)
            rhs = grams[0] @ a[name].double().T + grams[1] @ b[name].double().T
            expected = torch.linalg.solve(grams[0] + grams[1], rhs).T
            assert torch.allclose(w.double(), expected, rtol=1e-4, atol=1e-5), name
            linear += 1
        else:
            assert torch.allclose(w, (a[name] + b[name]) / 2, atol=1e-7), name
    assert linear == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head


def test_a_sweep_over_alpha_reuses_the_cached_grams(ran):
    tmp, path, _ = ran
    sweep = write_pipeline(tmp, path.read_text().replace("alphas: [0.7]", "alphas: [0.7, 0.3]"), name="sweep.yaml")
    _, status = run(sweep, tmp / "cache")
    assert status["gram_a"] == status["gram_b"] == "cached"
    assert status["regmean@alpha=0.7"] == "cached"
    assert status["regmean@alpha=0.3"] == "executed"
    counts = {s: list(status.values()).count(s) for s in set(status.values())}
    assert counts == {"cached": len(status) - 1, "executed": 1}


# -- fisher ----------------------------------------------------------------------------

def test_fisher_merge_is_the_fisher_weighted_average_by_hand(ran, tiny_models):
    merged = read_model(_entry(ran, "fisher").path)
    fa, fb = (read_model(_entry(ran, s).path) for s in ("fisher_a", "fisher_b"))
    a, b = read_model(tiny_models["ft_a"]), read_model(tiny_models["ft_b"])
    eps = 1e-6
    norm_a = sum(float((t.double() ** 2).sum()) for t in fa.values()) ** 0.5
    norm_b = sum(float((t.double() ** 2).sum()) for t in fb.values()) ** 0.5
    inv_a, inv_b = 1 / (norm_a + eps), 1 / (norm_b + eps)
    ca, cb = 1.0 * inv_a / (inv_a + inv_b), 2.0 * inv_b / (inv_a + inv_b)
    for name, w in merged.items():
        wa, wb = ca * (fa[name].double() + eps), cb * (fb[name].double() + eps)
        expected = (wa * a[name].double() + wb * b[name].double()) / (wa + wb)
        assert torch.allclose(w.double(), expected, rtol=1e-5, atol=1e-7), name
    # where one model's Fisher dominates, the merge follows that model
    name = "model.layers.1.mlp.down_proj.weight"
    ratio = fa[name] / (fa[name] + fb[name] + 1e-30)
    near_a = ratio > 0.99
    if near_a.any():
        assert torch.allclose(merged[name][near_a], a[name][near_a], atol=5e-3)


def test_fisher_params_are_checked():
    from pydantic import TypeAdapter

    from weightflow.ops.merge import MergeParams

    adapter = TypeAdapter(MergeParams)
    with pytest.raises(ValueError, match="one per model"):
        adapter.validate_python({"method": "fisher", "models": ["a", "b", "c"], "stats": ["fa", "fb"]})
    with pytest.raises(ValueError, match="must be > 0"):
        adapter.validate_python({"method": "fisher", "models": ["a", "b"], "stats": ["fa", "fb"],
                                 "weights": [1, 0]})
    p = adapter.validate_python({"method": "regmean", "models": ["a", "b"], "stats": ["ga", "gb"],
                                 "reduce_non_diagonal_ratio": 0.4})
    assert p.alpha == 0.4
    with pytest.raises(ValueError, match="less than or equal to 1"):
        adapter.validate_python({"method": "regmean", "models": ["a", "b"], "stats": ["ga", "gb"], "alpha": 2})


# -- adamerging ------------------------------------------------------------------------

ADA = """
weightflow: 1
name: ada
seed: 3
steps:
  base: {{op: load, source: {base}}}
  ft_a: {{op: load, source: {ft_a}}}
  ft_b: {{op: load, source: {ft_b}}}
  delta_a: {{op: extract-delta, model: ft_a, base: base}}
  delta_b: {{op: extract-delta, model: ft_b, base: base}}
  ada:
    op: merge
    method: adamerging
    base: base
    deltas: [delta_a, delta_b]
    data: [calib_a.jsonl, {{data: calib_b.jsonl, samples: 5}}]
    steps: 12
    lr: 0.05
    batch_size: 4
"""


def test_adamerging_lowers_entropy_is_deterministic_and_applies_its_coefficients(tmp_path, tiny_models):
    _calibration(tmp_path)
    path = write_pipeline(tmp_path, ADA.format(**{k: str(v) for k, v in tiny_models.items()}))
    outcome, status = run(path, tmp_path / "cache")
    assert status["ada"] == "executed"
    step = next(s for s in outcome.steps if s.name == "ada")
    from weightflow.dsl.store.content import Store

    entry = Store(tmp_path / "cache").lookup(step.key)
    info = entry.manifest["info"]
    assert sum(info["entropy_after"]) < sum(info["entropy_before"])
    coef = info["coefficients"]
    assert any(abs(c - 0.3) > 1e-3 for cs in coef.values() for c in cs)  # it learned something
    assert all(0.0 <= c <= 1.0 for cs in coef.values() for c in cs)
    # the merged model is base + Σ λ τ with the coefficients it reports
    base, a, b = (read_model(tiny_models[k]) for k in ("base", "ft_a", "ft_b"))
    merged = read_model(entry.path)
    for name, w in merged.items():
        la, lb = coef[name]
        expected = base[name] + la * (a[name] - base[name]) + lb * (b[name] - base[name])
        assert torch.allclose(w, expected, atol=1e-5), name
    # the same inputs and seed give the same bytes, in a fresh store
    again, _ = run(path, tmp_path / "cache2")
    assert next(s for s in again.steps if s.name == "ada").digest == step.digest


def test_adamerging_needs_one_kind_of_task_vectors():
    from pydantic import TypeAdapter

    from weightflow.ops.merge import MergeParams

    adapter = TypeAdapter(MergeParams)
    with pytest.raises(ValueError, match="exactly one of them"):
        adapter.validate_python({"method": "adamerging", "base": "b", "data": "x.jsonl"})
    p = adapter.validate_python({"method": "adamerging", "base": "b", "models": ["m"], "data": "x.jsonl"})
    assert p.data[0].data == "x.jsonl" and p.init == 0.3 and p.granularity == "layer"


def test_classifier_fisher_expected_and_empirical_by_hand(tmp_path):
    import transformers

    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    clf = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**cfg, num_labels=3, pad_token_id=0))
    clf.save_pretrained(tmp_path / "clf")
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 256, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist(),
             "label": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(5)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        name: clf-fisher
        steps:
          clf: {{op: load, source: {tmp_path / "clf"}}}
          expected: {{op: collect-stats, model: clf, kind: fisher, data: data.jsonl}}
          empirical: {{op: collect-stats, model: clf, kind: fisher, data: data.jsonl, fisher_labels: empirical}}
        """)
    outcome, status = run(path, tmp_path / "cache")
    assert set(status.values()) == {"executed"}
    from weightflow.dsl.store.content import Store

    got = {s.name: read_model(Store(tmp_path / "cache").lookup(s.key).path) for s in outcome.steps if s.name != "clf"}
    model = _model(tmp_path / "clf")
    want_expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    want_empirical = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for r in rows:
        x = torch.tensor([r["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(x).logits[0], -1)
        for y in range(3):
            model.zero_grad()
            model(x, labels=torch.tensor([y])).loss.backward()  # cross-entropy = −log p(y | x)
            for n, p in model.named_parameters():
                want_expected[n] += probs[y] * p.grad ** 2 / len(rows)
                if y == r["label"]:
                    want_empirical[n] += p.grad ** 2 / len(rows)
    for n in want_expected:
        assert torch.allclose(got["expected"][n], want_expected[n], rtol=1e-3, atol=1e-10), n
        assert torch.allclose(got["empirical"][n], want_empirical[n], rtol=1e-3, atol=1e-10), n
