"""weightflow's linear, task-arithmetic and ties merges equal mergekit's (float32 rounding).

mergekit is a test-only reference (`pip install '.[compare]'`, installed by `make test`);
this module skips cleanly where it is absent.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_model, run, write_pipeline

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed")


def mergekit(config: dict, out) -> dict:
    from mergekit.config import MergeConfiguration

    cfg = MergeConfiguration.model_validate(config)
    opts = mergekit_merge.MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=True, quiet=True,
                                       write_model_card=False)
    mergekit_merge.run_merge(cfg, str(out), opts)
    return read_model(out)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("vs_mergekit")
    m = {k: str(v) for k, v in tiny_models.items()}
    text = f"""
weightflow: 1
dtype: float32
steps:
  base: {{op: load, source: {m['base']}}}
  a: {{op: load, source: {m['ft_a']}}}
  b: {{op: load, source: {m['ft_b']}}}
  da: {{op: extract-delta, model: a, base: base}}
  db: {{op: extract-delta, model: b, base: base}}
  linear: {{op: merge, method: linear, models: [base, a, b], weights: [0.2, 0.5, 0.3], normalize: true}}
  task_arithmetic: {{op: merge, method: task-arithmetic, base: base, deltas: [da, db], weights: [1.0, 0.5],
                    lambda: 0.8}}
  ties: {{op: merge, method: ties, base: base, deltas: [da, db], weights: [1.0, 0.5], density: 0.5}}
  ties_sum: {{op: merge, method: ties, base: base, deltas: [da, db], weights: [0.7, -0.4], density: 0.3,
             normalize: false}}
  ties_each: {{op: merge, method: ties, base: base, deltas: [da, db], weights: [1.0, 0.5], density: [0.9, 0.2]}}
outputs: {{linear: out/linear, task_arithmetic: out/task_arithmetic, ties: out/ties, ties_sum: out/ties_sum,
          ties_each: out/ties_each}}
"""
    run(write_pipeline(tmp, text), tmp / "cache")
    return tmp, m


def compare(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].to(ours[name].dtype), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_linear_matches_mergekit(merged):
    tmp, m = merged
    theirs = mergekit({"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": True},
                       "models": [{"model": m["base"], "parameters": {"weight": 0.2}},
                                  {"model": m["ft_a"], "parameters": {"weight": 0.5}},
                                  {"model": m["ft_b"], "parameters": {"weight": 0.3}}]}, tmp / "mk_linear")
    compare(read_model(tmp / "out" / "linear"), theirs)


def test_task_arithmetic_matches_mergekit(merged):
    tmp, m = merged
    theirs = mergekit({"merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "float32",
                       "parameters": {"lambda": 0.8},
                       "models": [{"model": m["ft_a"], "parameters": {"weight": 1.0}},
                                  {"model": m["ft_b"], "parameters": {"weight": 0.5}}]}, tmp / "mk_ta")
    compare(read_model(tmp / "out" / "task_arithmetic"), theirs)


@pytest.mark.parametrize("step,weights,density,normalize", [
    ("ties", [1.0, 0.5], 0.5, True),
    ("ties_sum", [0.7, -0.4], 0.3, False),
])
def test_ties_matches_mergekit(merged, step, weights, density, normalize):
    tmp, m = merged
    theirs = mergekit({"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
                       "parameters": {"normalize": normalize},
                       "models": [{"model": m["ft_a"], "parameters": {"weight": weights[0], "density": density}},
                                  {"model": m["ft_b"], "parameters": {"weight": weights[1], "density": density}}]},
                      tmp / f"mk_{step}")
    ours = read_model(tmp / "out" / step)
    compare(ours, theirs)
    # and the comparison is not vacuous: the merge really trimmed and changed the base
    base = read_model(m["base"])
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_ties_with_a_density_per_delta_matches_mergekit(merged):
    """mergekit's per-model density ([0.9, 0.2] here) is weightflow's per-delta density list."""
    tmp, m = merged
    theirs = mergekit({"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
                       "models": [{"model": m["ft_a"], "parameters": {"weight": 1.0, "density": 0.9}},
                                  {"model": m["ft_b"], "parameters": {"weight": 0.5, "density": 0.2}}]},
                      tmp / "mk_ties_each")
    ours = read_model(tmp / "out" / "ties_each")
    compare(ours, theirs)
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"],
                           read_model(tmp / "out" / "ties")["model.layers.0.mlp.up_proj.weight"])


@pytest.fixture(scope="module")
def merged_whole(tmp_path_factory, tiny_models):
    """model_stock (per tensor and filter-wise) and nearswap, each added as one method file."""
    tmp = tmp_path_factory.mktemp("vs_mergekit_whole")
    m = {k: str(v) for k, v in tiny_models.items()}
    text = f"""
weightflow: 1
dtype: float32
steps:
  base: {{op: load, source: {m['base']}}}
  a: {{op: load, source: {m['ft_a']}}}
  b: {{op: load, source: {m['ft_b']}}}
  stock: {{op: merge, method: model_stock, base: base, models: [a, b]}}
  stock_rows: {{op: merge, method: model_stock, base: base, models: [a, b], filter_wise: true}}
  swap: {{op: merge, method: nearswap, base: base, models: [a], t: 0.01}}
outputs: {{stock: out/stock, stock_rows: out/stock_rows, swap: out/swap}}
"""
    run(write_pipeline(tmp, text), tmp / "cache")
    return tmp, m


@pytest.mark.parametrize("step,filter_wise", [("stock", False), ("stock_rows", True)])
def test_model_stock_matches_mergekit(merged_whole, step, filter_wise):
    tmp, m = merged_whole
    theirs = mergekit({"merge_method": "model_stock", "base_model": m["base"], "dtype": "float32",
                       "parameters": {"filter_wise": filter_wise},
                       "models": [{"model": m["base"]}, {"model": m["ft_a"]}, {"model": m["ft_b"]}]},
                      tmp / f"mk_{step}")
    ours = read_model(tmp / "out" / step)
    compare(ours, theirs)
    base, a = read_model(m["base"]), read_model(m["ft_a"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ours[name], base[name]) and not torch.equal(ours[name], a[name])


def test_nearswap_matches_mergekit(merged_whole):
    tmp, m = merged_whole
    theirs = mergekit({"merge_method": "nearswap", "base_model": m["base"], "dtype": "float32",
                       "parameters": {"t": 0.01},
                       "models": [{"model": m["base"]}, {"model": m["ft_a"]}]}, tmp / "mk_swap")
    ours = read_model(tmp / "out" / "swap")
    compare(ours, theirs)
    base, a = read_model(m["base"]), read_model(m["ft_a"])
    name = "model.layers.0.mlp.up_proj.weight"
    near = (base[name] - a[name]).abs() <= 0.01  # these take a's value exactly
    assert near.any() and (~near).any()
    torch.testing.assert_close(ours[name][near], a[name][near])
