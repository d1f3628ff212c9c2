"""The task-vector merge methods (sce, della-linear, breadcrumbs-ties, arcee_fusion, ram,
ramplus_tl) equal mergekit 0.1.5's on tiny models, and the merge op takes mergekit's
spelling of every method name.

mergekit is a test-only reference; this module skips cleanly where it is absent.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturbed_copy, read_model, run, write_pipeline

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed")

NAME = "model.layers.0.mlp.up_proj.weight"


def mergekit(config: dict, out) -> dict:
    from mergekit.config import MergeConfiguration

    cfg = MergeConfiguration.model_validate({"dtype": "float32", **config})
    opts = mergekit_merge.MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=True, quiet=True,
                                       write_model_card=False)
    mergekit_merge.run_merge(cfg, str(out), opts)
    return read_model(out)


def compare(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].to(ours[name].dtype), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def sparse_copy(src, dst, seed: int, keep: float, scale: float = 0.02):
    """``src`` changed on a random ``keep`` fraction of each tensor's elements, and moved by
    less than 1e-5 (RAM's default epsilon) on another 10%: agents that touch few weights."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, t in load_file(src / "model.safetensors").items():
        u = torch.rand(t.shape, generator=g)
        noise = scale * torch.randn(t.shape, generator=g)
        tiny = 5e-6 * (2 * torch.rand(t.shape, generator=g) - 1)
        out[n] = t + torch.where(u < keep, noise, torch.where(u < keep + 0.1, tiny, torch.zeros(())))
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.glob("*.json"):
        (dst / f.name).write_text(f.read_text())
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("tv_models")
    m = {k: str(v) for k, v in tiny_models.items()}
    m["ft_c"] = str(perturbed_copy(tiny_models["base"], root / "ft_c", seed=5, scale=0.035))
    m["sp_a"] = str(sparse_copy(tiny_models["base"], root / "sp_a", seed=6, keep=0.3))
    m["sp_b"] = str(sparse_copy(tiny_models["base"], root / "sp_b", seed=7, keep=0.4, scale=0.03))
    return m


def loads(m: dict, names=("ft_a", "ft_b", "ft_c", "sp_a", "sp_b")) -> str:
    """Steps loading the base and ``names``, and each one's delta ``d_NAME``."""
    return "\n".join(f"  {k}: {{op: load, source: {m[k]}}}" for k in ("base", *names)) \
        + "\n" + "\n".join(f"  d_{k}: {{op: extract-delta, model: {k}, base: base}}" for k in names)


MERGES = {
    "sce_all": "{op: merge, method: sce, base: base, deltas: [d_ft_a, d_ft_b, d_ft_c]}",
    "sce_top": "{op: merge, method: sce, base: base, deltas: [d_ft_a, d_ft_b, d_ft_c], select_topk: 0.3}",
    "crumbs": "{op: merge, method: breadcrumbs-ties, base: base, deltas: [d_ft_a, d_ft_b, d_ft_c], "
              "weights: [1.0, -0.6, 0.8], density: 0.5, gamma: 0.05}",
    "crumbs_norm": "{op: merge, method: breadcrumbs_ties, base: base, deltas: [d_ft_a, d_ft_b], "
                   "weights: [0.7, 0.4], density: 0.4, gamma: 0.1, normalize: true, rescale: true}",
    "fusion": "{op: merge, method: arcee_fusion, base: base, models: [ft_a]}",
    "ram": "{op: merge, method: ram, base: base, deltas: [d_sp_a, d_sp_b]}",
    "ram_eps": "{op: merge, method: ram, base: base, deltas: [d_sp_a, d_sp_b, d_ft_c], epsilon: 0.01}",
    "ramplus": "{op: merge, method: ramplus_tl, base: base, deltas: [d_sp_a, d_sp_b]}",
    "ramplus_wide": "{op: merge, method: ramplus_tl, base: base, deltas: [d_sp_a, d_sp_b], r: 0.5, alpha: 1.0}",
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory, models):
    tmp = tmp_path_factory.mktemp("tv_merged")
    steps = "\n".join(f"  {k}: {v}" for k, v in MERGES.items())
    outputs = ", ".join(f"{k}: out/{k}" for k in MERGES)
    text = f"weightflow: 1\ndtype: float32\nsteps:\n{loads(models)}\n{steps}\noutputs: {{{outputs}}}\n"
    outcome, status = run(write_pipeline(tmp, text), tmp / "cache")
    assert all(status[k] != "failed" for k in MERGES), outcome.logs
    return tmp, models


def ours(merged, step: str) -> dict:
    return read_model(merged[0] / "out" / step)


def changes(result: dict, base_dir: str) -> None:
    """The comparison is not vacuous: the merge moved the base."""
    base = read_model(base_dir)
    assert not torch.equal(result[NAME], base[NAME])


@pytest.mark.parametrize("step,topk", [("sce_all", 1.0), ("sce_top", 0.3)])
def test_sce_matches_mergekit(merged, step, topk):
    tmp, m = merged
    theirs = mergekit({"merge_method": "sce", "base_model": m["base"], "parameters": {"select_topk": topk},
                       "models": [{"model": m[k]} for k in ("ft_a", "ft_b", "ft_c")]}, tmp / f"mk_{step}")
    got = ours(merged, step)
    compare(got, theirs)
    changes(got, m["base"])
    if topk < 1:  # about 1 - 0.3 of the elements (least varying) keep the base's values
        same = (got[NAME] == read_model(m["base"])[NAME]).float().mean()
        assert 0.65 < float(same) < 0.75


@pytest.mark.parametrize("step,deltas,weights,density,gamma,normalize,rescale", [
    ("crumbs", ("ft_a", "ft_b", "ft_c"), [1.0, -0.6, 0.8], 0.5, 0.05, False, False),
    ("crumbs_norm", ("ft_a", "ft_b"), [0.7, 0.4], 0.4, 0.1, True, True),
])
def test_breadcrumbs_ties_matches_mergekit(merged, step, deltas, weights, density, gamma, normalize, rescale):
    tmp, m = merged
    theirs = mergekit({"merge_method": "breadcrumbs_ties", "base_model": m["base"],
                       "parameters": {"normalize": normalize, "rescale": rescale},
                       "models": [{"model": m[k], "parameters": {"weight": w, "density": density, "gamma": gamma}}
                                  for k, w in zip(deltas, weights, strict=True)]}, tmp / f"mk_{step}")
    got = ours(merged, step)
    compare(got, theirs)
    changes(got, m["base"])


def test_arcee_fusion_matches_mergekit(merged):
    tmp, m = merged
    theirs = mergekit({"merge_method": "arcee_fusion", "base_model": m["base"],
                       "models": [{"model": m["base"]}, {"model": m["ft_a"]}]}, tmp / "mk_fusion")
    got = ours(merged, "fusion")
    compare(got, theirs)
    base, a = read_model(m["base"]), read_model(m["ft_a"])
    fused = got[NAME] == a[NAME]
    assert fused.any() and (got[NAME] == base[NAME]).any()  # some elements fused, others kept
    assert float(fused.float().mean()) < 0.5  # only the outliers of importance


@pytest.mark.parametrize("step,method,deltas,params", [
    ("ram", "ram", ("sp_a", "sp_b"), {}),
    ("ram_eps", "ram", ("sp_a", "sp_b", "ft_c"), {"epsilon": 0.01}),
    ("ramplus", "ramplus_tl", ("sp_a", "sp_b"), {}),
    ("ramplus_wide", "ramplus_tl", ("sp_a", "sp_b"), {"r": 0.5, "alpha": 1.0}),
])
def test_ram_matches_mergekit(merged, step, method, deltas, params):
    tmp, m = merged
    theirs = mergekit({"merge_method": method, "base_model": m["base"], "parameters": params,
                       "models": [{"model": m[k]} for k in deltas]}, tmp / f"mk_{step}")
    got = ours(merged, step)
    compare(got, theirs)
    changes(got, m["base"])


def test_ram_keeps_unique_changes_and_averages_shared(merged):
    """RAM by hand on one tensor: unique changes whole, shared ones averaged, RAM+ scales the
    unique ones by 1 + r·clamp(shared/unique, 0, alpha)."""
    _, m = merged
    base, a, b = (read_model(m[k])[NAME] for k in ("base", "sp_a", "sp_b"))
    ta, tb = a - base, b - base
    na, nb = ta.abs() > 1e-5, tb.abs() > 1e-5
    expected = torch.where(na & nb, (ta + tb) / 2, torch.where(na, ta, torch.where(nb, tb, torch.zeros(()))))
    torch.testing.assert_close(ours(merged, "ram")[NAME], base + expected, rtol=1e-5, atol=1e-6)
    rho_a = float((na & nb).sum()) / float((na & ~nb).sum())
    assert 0.2 < rho_a < 1.0  # so alpha 0.2 clamps it and alpha 1 does not
    scale_a, scale_b = (1 + 0.5 * float((na & nb).sum()) / float((n & ~o).sum()) for n, o in ((na, nb), (nb, na)))
    wide = torch.where(na & nb, (ta + tb) / 2,
                       torch.where(na, ta * scale_a, torch.where(nb, tb * scale_b, torch.zeros(()))))
    torch.testing.assert_close(ours(merged, "ramplus_wide")[NAME], base + wide, rtol=1e-5, atol=1e-6)


# -- della-linear: mergekit draws its masks with torch.bernoulli, weightflow from its own
# per-(seed, delta, tensor) streams, so the two only agree once both draw the same numbers:
# here both take u_k = frac((k + 1)·φ) for the k-th element of a tensor (a low-discrepancy
# sequence), keeping the element where u_k < its keep probability.

GOLDEN = (5 ** 0.5 - 1) / 2


def _draws(start: int, stop: int) -> torch.Tensor:
    k = torch.arange(start, stop, dtype=torch.float64) + 1
    return torch.frac(k * GOLDEN).to(torch.float32)


@pytest.fixture
def same_draws(monkeypatch):
    import weightflow.ops.lib.sparsify as sparsify

    monkeypatch.setattr(sparsify, "random_uniform", lambda seed, key, name, start, stop: _draws(start, stop))
    monkeypatch.setattr(torch, "bernoulli", lambda probs: (_draws(0, probs.numel()).reshape(probs.shape)
                                                             < probs).to(probs.dtype))


def test_della_linear_matches_mergekit_with_the_same_draws(tmp_path, models, same_draws):
    m = models
    text = f"""weightflow: 1
dtype: float32
steps:
{loads(m, ("ft_a", "ft_b", "ft_c"))}
  dl: {{op: merge, method: della-linear, base: base, deltas: [d_ft_a, d_ft_b], weights: [1.0, 0.5],
       density: 0.6, epsilon: 0.2, lambda: 0.9}}
  dl_norm: {{op: merge, method: della_linear, base: base, deltas: [d_ft_a, d_ft_b, d_ft_c],
            weights: [0.5, 0.3, -0.4], density: 0.4, normalize: true}}
outputs: {{dl: out/dl, dl_norm: out/dl_norm}}
"""
    outcome, status = run(write_pipeline(tmp_path, text), tmp_path / "cache")
    assert status["dl"] == status["dl_norm"] == "executed", outcome.logs
    theirs = mergekit({"merge_method": "della_linear", "base_model": m["base"], "parameters": {"lambda": 0.9},
                       "models": [{"model": m[k], "parameters": {"weight": w, "density": 0.6, "epsilon": 0.2}}
                                  for k, w in (("ft_a", 1.0), ("ft_b", 0.5))]}, tmp_path / "mk_dl")
    got = read_model(tmp_path / "out" / "dl")
    compare(got, theirs)
    changes(got, m["base"])
    theirs = mergekit({"merge_method": "della_linear", "base_model": m["base"], "parameters": {"normalize": True},
                       "models": [{"model": m[k], "parameters": {"weight": w, "density": 0.4}}
                                  for k, w in (("ft_a", 0.5), ("ft_b", 0.3), ("ft_c", -0.4))]}, tmp_path / "mk_dln")
    compare(read_model(tmp_path / "out" / "dl_norm"), theirs)


def test_della_linear_draws_by_magnitude_and_is_della_without_consensus(tmp_path, models):
    """With the real draws: about `density` of the elements survive, the larger ones more
    often (density ± epsilon/2 in the top and bottom half of each row), and della-linear is
    della with sign_consensus: false under the same rescale (the same masks)."""
    m = models
    text = f"""weightflow: 1
dtype: float32
steps:
{loads(m, ("ft_a", "ft_b"))}
  dl: {{op: merge, method: della-linear, base: base, deltas: [d_ft_a], density: 0.5, epsilon: 0.3,
       rescale: false}}
  dl_dare: {{op: merge, method: della-linear, base: base, deltas: [d_ft_a, d_ft_b], density: 0.5,
            rescale: dare}}
  della_sum: {{op: merge, method: della, base: base, deltas: [d_ft_a, d_ft_b], density: 0.5,
              sign_consensus: false}}
outputs: {{dl: out/dl, dl_dare: out/dl_dare, della_sum: out/della_sum}}
"""
    run(write_pipeline(tmp_path, text), tmp_path / "cache")
    base, a = read_model(m["base"]), read_model(m["ft_a"])
    got = read_model(tmp_path / "out" / "dl")
    kept = torch.cat([(got[n] != base[n]).reshape(-1) for n in got if got[n].dim() == 2]).float()
    assert abs(float(kept.mean()) - 0.5) < 0.01
    delta = (a[NAME] - base[NAME]).abs()
    big = delta >= delta.median(dim=1, keepdim=True).values
    kept = (got[NAME] != base[NAME])
    assert abs(float(kept[big].float().mean()) - 0.65) < 0.03
    assert abs(float(kept[~big].float().mean()) - 0.35) < 0.03
    torch.testing.assert_close(got[NAME][kept], a[NAME][kept])  # rescale: false keeps values as they are
    compare(read_model(tmp_path / "out" / "dl_dare"), read_model(tmp_path / "out" / "della_sum"))


# -- method-name aliases -------------------------------------------------------------------

ALIAS_PAIRS = [
    ("task-arithmetic", "task_arithmetic", "deltas: [da, db], weights: [1.0, 0.5]"),
    ("dare-ties", "dare_ties", "deltas: [da, db], density: 0.5"),
    ("dare-linear", "dare_linear", "deltas: [da, db], density: 0.5"),
    ("della-linear", "della_linear", "deltas: [da, db], density: 0.5, rescale: true"),
    ("breadcrumbs-ties", "breadcrumbs_ties", "deltas: [da, db], density: 0.5"),
    ("model_stock", "model-stock", "models: [a, b]"),
    ("arcee_fusion", "arcee-fusion", "models: [a]"),
]


def _pipeline(tmp_path, models, method: str, rest: str, name: str):
    from weightflow.dsl.lang.pipeline import load_pipeline

    text = f"""weightflow: 1
seed: 3
steps:
  base: {{op: load, source: {models['base']}}}
  a: {{op: load, source: {models['ft_a']}}}
  b: {{op: load, source: {models['ft_b']}}}
  da: {{op: extract-delta, model: a, base: base}}
  db: {{op: extract-delta, model: b, base: base}}
  m: {{op: merge, method: {method}, base: base, {rest}}}
"""
    return load_pipeline(write_pipeline(tmp_path, text, name))


@pytest.mark.parametrize("canonical,alias,rest", ALIAS_PAIRS)
def test_mergekit_spelling_is_the_same_step(tmp_path, models, canonical, alias, rest):
    from weightflow.dsl.engine.planner import Planner
    from weightflow.dsl.store.content import Store

    one = _pipeline(tmp_path, models, canonical, rest, "one.yaml")
    two = _pipeline(tmp_path, models, alias, rest, "two.yaml")
    p1, p2 = one.steps["m"].params, two.steps["m"].params
    assert p1.method == p2.method == canonical
    assert type(p1) is type(p2)
    assert one.steps["m"].params_json() == two.steps["m"].params_json()
    assert json.dumps(p2.model_dump(mode="json", by_alias=True)).count(alias) == 0
    digests = {s: "0" * 64 for s in ("base", "a", "b", "da", "db")}
    store = Store(tmp_path / "cache")
    assert Planner(one, store).key_of("m", digests) == Planner(two, store).key_of("m", digests)
    # the pipeline's seed fills in for the alias spelling as for the canonical one
    if "seed" in type(p1).model_fields:
        assert p1.seed == p2.seed == 3


def test_unknown_method_lists_the_canonical_names(tmp_path, models):
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.ops.merge_methods import methods

    with pytest.raises(PipelineError) as info:
        _pipeline(tmp_path, models, "della_lineer", "deltas: [da], density: 0.5", "bad.yaml")
    text = str(info.value)
    assert "bad.yaml:9:" in text and "unknown method 'della_lineer'" in text, text
    assert "did you mean 'della_linear'" in text or "did you mean 'della-linear'" in text, text
    listed = text.split("expected one of: ", 1)[1].splitlines()[0].split(", ")
    assert sorted(listed) == sorted(methods()), listed  # canonical names, no aliases
    # a misspelt parameter under an alias spelling is reported against that method's params
    with pytest.raises(PipelineError, match="unknown parameter 'densty'.*did you mean 'density'"):
        _pipeline(tmp_path, models, "dare_ties", "deltas: [da], densty: 0.5", "bad2.yaml")


def test_aliases_in_registry_docs_and_schema(cli):
    from jsonschema import Draft202012Validator

    from weightflow.dsl.lang.opdocs import ops_json
    from weightflow.ops.merge_methods import MergeMethod, canonical_name, methods
    from weightflow.ops.merge_methods.ties import TiesParams

    assert canonical_name("dare_ties") == "dare-ties" and canonical_name("model-stock") == "model_stock"
    assert canonical_name("nope") is None
    import pickle

    from weightflow.ops.merge import OP

    given = OP.adapter.validate_python({"method": "dare_ties", "base": "b", "deltas": ["d"], "density": 0.5})
    assert pickle.loads(pickle.dumps(given)) == given  # the accepting class can be found by name
    assert MergeMethod("x-y", TiesParams, run=lambda *a: {}, aliases=("xy",)).spellings == ("x-y", "xy", "x_y")
    variants = [v["variant"] for op in ops_json() if op["name"] == "merge" for v in op["variants"]]
    assert variants == list(methods())  # documented once, by the canonical name
    rc, out, _ = cli("schema")
    assert rc == 0
    schema = json.loads(out)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    doc = {"weightflow": 1, "steps": {
        "base": {"op": "load", "source": "./m"}, "a": {"op": "load", "source": "./a"},
        "d": {"op": "extract-delta", "model": "a", "base": "base"},
        "m": {"op": "merge", "method": "breadcrumbs_ties", "base": "base", "deltas": ["d"], "density": 0.5}}}
    assert not list(validator.iter_errors(doc))
    doc["steps"]["m"]["method"] = "breadcrumbs__ties"
    assert list(validator.iter_errors(doc))


def test_rescale_takes_mergekit_booleans():
    from weightflow.ops.merge import OP

    common = {"base": "b", "deltas": ["d"], "density": 0.5}
    assert OP.adapter.validate_python({"method": "della_linear", **common, "rescale": True}).rescale == "l1"
    assert OP.adapter.validate_python({"method": "della-linear", **common, "rescale": False}).rescale == "none"
    assert OP.adapter.validate_python({"method": "breadcrumbs_ties", **common}).rescale == "none"
    for bad in ({"method": "della-linear", **common, "density": 0.9, "epsilon": 0.2},
                {"method": "sce", "base": "b", "deltas": ["d"], "select_topk": 0},
                {"method": "ramplus_tl", "base": "b", "deltas": ["d"], "alpha": -1},
                {"method": "arcee_fusion", "base": "b", "models": ["a", "c"]},
                {"method": "breadcrumbs-ties", **common, "rescale": "dare"}):
        with pytest.raises(ValueError):
            OP.adapter.validate_python(bad)


# -- the per-tensor pieces, in many row chunks, against mergekit's own kernels -------------

class _Delta:
    """A stand-in for a DeltaInput holding one tensor ``w`` in memory."""

    def __init__(self, t):
        self.t, self.ckpt = t, {"w"}

    def chunk(self, name, lo, hi, shape):
        return self.t[lo:hi]


def _merge_in_chunks(fit, combine, taus):
    from weightflow.ops.merge_methods._task_vectors import DeltaTensor

    tensor = DeltaTensor("w", tuple(taus[0].shape), [_Delta(t) for t in taus])
    state = fit(tensor)
    return torch.cat([combine(state, chunks, j) for j, chunks in enumerate(tensor.chunks())])


@pytest.mark.parametrize("scale,topk", [(0.02, 1.0), (0.02, 0.4), (1e-4, 0.4)])
def test_sce_in_row_chunks_matches_mergekit_kernel(monkeypatch, scale, topk):
    """Many row chunks (the top-k and its ties carried across them, the mask used twice), and
    at scale 1e-4 mergekit's uniform weights (total mass below 1e-6)."""
    from types import SimpleNamespace

    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.sce import sce_merge

    import weightflow.ops.lib.tensors as tensors
    from weightflow.ops.merge_methods import sce

    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", 96)  # 4 rows of 24 per chunk
    g = torch.Generator().manual_seed(11)
    base = torch.zeros(40, 24)  # sce reads only the task vectors; a zero base adds no rounding
    taus = [scale * k * torch.randn(40, 24, generator=g) for k in (1.0, 1.5, 0.7)]
    if scale < 1e-3:
        assert sum(float(t.square().mean()) for t in taus) < 1e-6  # the uniform branch
    got = _merge_in_chunks(sce._fit(SimpleNamespace(select_topk=topk)), sce.combine, taus)
    group = TensorGroup.from_tensors([base, *(base + t for t in taus)], base_index=0)
    theirs = sce_merge.merge_group(group, select_topk=topk, int8_mask=False) - base
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-6 * scale / 0.02)
    if topk < 1:
        assert float((got == 0).float().mean()) == pytest.approx(1 - topk, abs=0.01)


def test_ramplus_tl_in_row_chunks_matches_mergekit_kernel(monkeypatch):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.ram import ramplus_tl_merge

    import weightflow.ops.lib.tensors as tensors
    from weightflow.ops.merge_methods import ramplus_tl

    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", 100)
    g = torch.Generator().manual_seed(12)
    base = torch.randn(30, 50, generator=g)
    taus = [torch.where(torch.rand(30, 50, generator=g) < keep, torch.randn(30, 50, generator=g), torch.zeros(()))
            for keep in (0.2, 0.5, 0.05)]
    p = ramplus_tl.RamPlusTLParams(method="ramplus_tl", base="b", deltas=["x", "y", "z"], r=0.3, alpha=0.5)
    got = _merge_in_chunks(ramplus_tl._fit(p), ramplus_tl._combine(p), taus)
    group = TensorGroup.from_tensors([base, *(base + t for t in taus)], base_index=0)
    theirs = ramplus_tl_merge.merge_group(group, r=0.3, alpha=0.5, epsilon=1e-5) - base
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-6)
    # no unique and no shared changes: a scale of 1, where mergekit's 0/0 is NaN at epsilon 0
    q = ramplus_tl.RamPlusTLParams(method="ramplus_tl", base="b", deltas=["x"], epsilon=0)
    assert ramplus_tl.unique_scale(0, 0, q) == 1.0
    assert ramplus_tl.unique_scale(7, 0, q) == pytest.approx(1 + 0.1 * 0.2)


def test_order_statistics_and_fence_match_a_sort_and_mergekit():
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion

    from weightflow.ops.merge_methods._task_vectors import order_statistics
    from weightflow.ops.merge_methods.arcee_fusion import fence

    g = torch.Generator().manual_seed(13)
    x = torch.cat([torch.randn(5000, generator=g) * 1e-3, torch.zeros(40), -torch.zeros(7),
                   torch.full((30,), 0.25), torch.randn(300, generator=g) * 1e4])
    x = x[torch.randperm(x.numel(), generator=g)]
    chunks = lambda: iter(x.split(777))  # noqa: E731
    ranks = [0, 1, 17, x.numel() // 2, x.numel() - 1]
    expected = torch.sort(x).values[ranks].tolist()
    assert order_statistics(chunks, ranks) == expected
    imp = x.abs() * torch.rand(x.shape, generator=g)  # importances are >= 0 up to rounding
    theirs = DynamicThresholdFusion().calculate_dynamic_threshold(imp)
    assert fence(lambda: iter(imp.split(500)), imp.numel()) == float(theirs)
