"""`weightflow import mergekit`: a mergekit config becomes a pipeline that makes mergekit's tensors.

Each case is a mergekit example config written here; the test imports it (the CLI, as a user
runs it), runs the weightflow pipeline, runs mergekit 0.1.5 on the same tiny models and
compares every tensor (float32 rounding, as tests/test_vs_mergekit.py).  Methods whose
weightflow module is not there are skipped, naming it.  DARE and DELLA draw random masks
(weightflow's seed vs mergekit's torch RNG), so they are compared exactly at density 1 and in
distribution below it.  The error cases and the translation's own logic (gradients, filters,
precedence) need no torch; the command itself must not import it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import TINY_LLAMA, perturbed_copy, read_model, run, save_tiny_llama

from weightflow.dsl.cli import main
from weightflow.dsl.lang import mergekit_import as mki

LAYERS = 4  # t = 0, 1/3, 2/3, 1: gradients interpolate between their entries
F32 = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A 4-layer tiny Llama base and two perturbed copies (stand-ins for fine-tunes)."""
    root = tmp_path_factory.mktemp("mk_models")
    base = save_tiny_llama(root / "base", seed=0, config=dict(TINY_LLAMA, num_hidden_layers=LAYERS))
    return {"base": str(base), "a": str(perturbed_copy(base, root / "ft_a", seed=1)),
            "b": str(perturbed_copy(base, root / "ft_b", seed=2))}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mk_store")  # shared: the load steps are cached across cases


def cli(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def mergekit(config: dict, out: Path) -> dict:
    mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed")
    from mergekit.config import MergeConfiguration

    opts = mergekit_merge.MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=True, quiet=True,
                                       write_model_card=False)
    mergekit_merge.run_merge(MergeConfiguration.model_validate(config), str(out), opts)
    return read_model(out)


def imported(tmp: Path, config: dict, store: Path, *extra) -> tuple[dict, str]:
    """Write ``config`` as a mergekit YAML file, import it with the CLI, run the pipeline;
    the merged tensors and the pipeline text."""
    src = tmp / "merge.yml"
    src.write_text(yaml.safe_dump(config, sort_keys=False))
    rc, out, err = cli("import", "mergekit", src, "-o", tmp / "pipeline.yaml", "--out-dir", "merged", *extra)
    assert rc == 0, err
    run(tmp / "pipeline.yaml", store)
    return read_model(tmp / "merged"), (tmp / "pipeline.yaml").read_text()


def compare(ours: dict, theirs: dict, rtol: float, atol: float) -> None:
    import torch

    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        torch.testing.assert_close(ours[name], theirs[name], rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def not_vacuous(ours: dict, m: dict) -> None:
    """The merge changed something: it is neither the base nor any one input."""
    import torch

    name = "model.layers.1.mlp.up_proj.weight"
    for k in ("base", "a", "b"):
        assert not torch.equal(ours[name].float(), read_model(Path(m[k]))[name].float()), k


def need(method: str) -> None:
    if method not in mki.supported_methods():
        pytest.skip(f"weightflow has no merge method for mergekit's {method} yet "
                    f"(ops/merge_methods/{mki.METHODS[method].weightflow.replace('-', '_')}.py)")


# -- mergekit example configs, one per method (m: the model paths) ------------------------

def _models(m, *entries):
    return [{"model": m[k], **({"parameters": p} if p else {})} for k, p in entries]


SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]

CASES = {
    # the README slerp: one slice over every layer, gradients per filter
    "slerp": lambda m: {"merge_method": "slerp", "base_model": m["base"], "dtype": "float32",
                        "slices": [{"sources": [{"model": m["base"], "layer_range": [0, LAYERS]},
                                                {"model": m["a"], "layer_range": [0, LAYERS]}]}],
                        "parameters": {"t": SLERP_T}},
    # per-model filtered weights falling through to the top-level weight
    "linear": lambda m: {"merge_method": "linear", "dtype": "float32",
                         "parameters": {"weight": 0.3, "normalize": True},
                         "models": _models(m, ("base", None),
                                           ("a", {"weight": [{"filter": "mlp", "value": 0.8}]}),
                                           ("b", {"weight": [0.2, 0.9]}))},
    # per-model weight gradient, shared density gradient, int8_mask (no effect on values)
    "ties": lambda m: {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
                       "parameters": {"normalize": True, "int8_mask": True, "density": [1, 0.7, 0.1]},
                       "models": _models(m, ("base", None), ("a", {"weight": 1.0}),
                                         ("b", {"weight": [0, 0.3, 0.7, 1]}))},
    # mergekit's README TIES example's shape: a density per model, one of them a gradient
    "ties_per_model": lambda m: {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
                                 "parameters": {"normalize": True},
                                 "models": _models(m, ("a", {"weight": 1.0, "density": [1, 0.7, 0.1]}),
                                                   ("b", {"weight": 0.5, "density": 0.4}))},
    # normalize: true on a plain sum, lambda
    "task_arithmetic": lambda m: {"merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "float32",
                                  "parameters": {"normalize": True, "lambda": 0.8},
                                  "models": _models(m, ("a", {"weight": 1.0}), ("b", {"weight": 0.5}))},
    "dare_ties": lambda m: {"merge_method": "dare_ties", "base_model": m["base"], "dtype": "float32",
                            "models": _models(m, ("base", None), ("a", {"weight": 0.7, "density": 1.0}),
                                              ("b", {"weight": -0.4, "density": 1.0}))},
    # a frankenmerge: stacked slices (one model twice), one scaled by a filtered gradient
    "passthrough": lambda m: {"merge_method": "passthrough", "dtype": "float32",
                              "slices": [{"sources": [{"model": m["a"], "layer_range": [0, 2]}]},
                                         {"sources": [{"model": m["b"], "layer_range": [1, 4],
                                                       "parameters": {"scale": [{"filter": "o_proj",
                                                                                 "value": [0.5, 1.5]},
                                                                                {"value": 1.0}]}}]},
                                         {"sources": [{"model": m["a"], "layer_range": [3, 4]}]}]},
    # the long tail (slow)
    "nearswap": lambda m: {"merge_method": "nearswap", "base_model": m["base"], "dtype": "float32",
                           "parameters": {"t": 0.01}, "models": _models(m, ("base", None), ("a", None))},
    "model_stock": lambda m: {"merge_method": "model_stock", "base_model": m["base"], "dtype": "float32",
                              "models": _models(m, ("base", None), ("a", None), ("b", None))},
    "nuslerp": lambda m: {"merge_method": "nuslerp", "dtype": "float32",
                          "models": _models(m, ("a", {"weight": 0.3}), ("b", {"weight": 0.7}))},
    "nuslerp_base": lambda m: {"merge_method": "nuslerp", "base_model": m["base"], "dtype": "float32",
                               "parameters": {"nuslerp_flatten": False},
                               "models": _models(m, ("a", {"weight": 0.6}), ("b", {"weight": 0.4}))},
    "multislerp": lambda m: {"merge_method": "multislerp", "base_model": m["base"], "dtype": "float32",
                             "models": _models(m, ("a", {"weight": 0.5}), ("b", {"weight": [0.2, 0.8]}))},
    "karcher": lambda m: {"merge_method": "karcher", "dtype": "float32", "parameters": {"max_iter": 20},
                          "models": _models(m, ("base", None), ("a", None), ("b", None))},
    "arcee_fusion": lambda m: {"merge_method": "arcee_fusion", "base_model": m["base"], "dtype": "float32",
                               "models": _models(m, ("base", None), ("a", None))},
    "dare_linear": lambda m: {"merge_method": "dare_linear", "base_model": m["base"], "dtype": "float32",
                              "parameters": {"density": 1.0, "normalize": True},
                              "models": _models(m, ("a", {"weight": 0.7}), ("b", {"weight": 0.2}))},
    "breadcrumbs": lambda m: {"merge_method": "breadcrumbs", "base_model": m["base"], "dtype": "float32",
                              "parameters": {"density": 0.8, "gamma": 0.05},
                              "models": _models(m, ("a", {"weight": 0.6}), ("b", {"weight": [0.4, 1.0]}))},
    "breadcrumbs_full": lambda m: {"merge_method": "breadcrumbs", "base_model": m["base"], "dtype": "float32",
                                   "models": _models(m, ("a", {"weight": 0.6}), ("b", {"weight": 0.4}))},
    "breadcrumbs_ties": lambda m: {"merge_method": "breadcrumbs_ties", "base_model": m["base"], "dtype": "float32",
                                   "parameters": {"density": 0.7, "gamma": 0.02},
                                   "models": _models(m, ("a", {"weight": 1.0}), ("b", {"weight": 0.5}))},
    # density 1 (mergekit's default): nothing sparsified, epsilon unused
    "della": lambda m: {"merge_method": "della", "base_model": m["base"], "dtype": "float32",
                        "parameters": {"epsilon": 0.2},
                        "models": _models(m, ("a", {"weight": 1.0}), ("b", {"weight": 0.5}))},
    "della_linear": lambda m: {"merge_method": "della_linear", "base_model": m["base"], "dtype": "float32",
                               "parameters": {"density": 1.0, "epsilon": 0.0, "normalize": True},
                               "models": _models(m, ("a", {"weight": 1.0}), ("b", {"weight": 0.5}))},
    "sce": lambda m: {"merge_method": "sce", "base_model": m["base"], "dtype": "float32",
                      "parameters": {"select_topk": 0.5},
                      "models": _models(m, ("base", None), ("a", None), ("b", None))},
    "ram": lambda m: {"merge_method": "ram", "base_model": m["base"], "dtype": "float32",
                      "models": _models(m, ("a", None), ("b", None))},
    "ramplus_tl": lambda m: {"merge_method": "ramplus_tl", "base_model": m["base"], "dtype": "float32",
                             "parameters": {"r": 0.2, "alpha": 0.3},
                             "models": _models(m, ("a", None), ("b", None))},
    # no dtype: taken from the models' files; out_dtype: the merge step's
    "out_dtype": lambda m: {"merge_method": "linear", "out_dtype": "float16",
                            "models": _models(m, ("a", {"weight": 1.0}), ("b", {"weight": 3.0}))},
    # bfloat16 inputs and merge (mergekit computes delta methods in bf16: bf16 tolerance)
    "bfloat16": lambda m: {"merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "bfloat16",
                           "models": _models(m, ("a", {"weight": 0.6}), ("b", {"weight": 0.3}))},
}
FAST = ("slerp", "linear", "ties", "ties_per_model", "task_arithmetic", "dare_ties", "passthrough")
# mergekit rounds each intermediate of a bf16 delta merge to bf16, weightflow only the result: a few
# bf16 steps apart at these magnitudes (|w| < 0.25: a step is at most 2^-3/128 ~ 1e-3); float16
# outputs differ by one float16 step where float32 sums round the other way
TOLERANCE = {"bfloat16": {"rtol": 1.6e-2, "atol": 2e-3}, "out_dtype": {"rtol": 1e-3, "atol": 1e-5}}


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_import_makes_mergekit_tensors(case, models, store, tmp_path):
    config = CASES[case](models)
    need(config["merge_method"])
    ours, text = imported(tmp_path, config, store)
    theirs = mergekit(config, tmp_path / "mergekit_out")
    compare(ours, theirs, **TOLERANCE.get(case, F32))
    if case not in ("passthrough", "arcee_fusion", "nearswap"):  # these keep some inputs' tensors as they are
        not_vacuous(ours, models)
    assert text.startswith(mki.HEADER)


def test_gradient_and_filters_become_one_rule_per_layer(models, tmp_path):
    """The slerp example's t: per layer, interpolated as mergekit does (t = i/3 of 5 entries)."""
    src = tmp_path / "slerp.yml"
    src.write_text(yaml.safe_dump(CASES["slerp"](models)))
    merge = yaml.safe_load(mki.import_mergekit(src).text)["steps"]["merged"]
    rules = {r["pattern"]: r["value"] for r in merge["t"]}
    # independent of the code: t = i/3 over [0, .5, .3, .7, 1] -> position 4i/3
    expect_attn = [0.0, 0.5 * (2 / 3) + 0.3 * (1 / 3), 0.3 * (1 / 3) + 0.7 * (2 / 3), 1.0]
    for i, v in enumerate(expect_attn):
        assert rules[f"model.layers.{i}.*self_attn*"] == pytest.approx(v, abs=1e-12)
    assert rules["*"] == 0.5 and merge["models"] == ["base", "ft_a"]
    # tensors outside the layers (embeddings, norm, head) that match no filter: the default
    assert list(rules)[-1] == "*" and not any(p == "*self_attn*" for p in rules)


def test_gradient_positions_equal_mergekits_evaluate_setting():
    """at_t against mergekit's own evaluate_setting (the reference), many gradients and t."""
    config = pytest.importorskip("mergekit.config")
    rng = random.Random(0)
    for _ in range(300):
        values = [round(rng.uniform(-2, 2), 3) for _ in range(rng.randint(1, 7))]
        layers = rng.randint(1, 40)
        for i in range(layers):
            t = i / (layers - 1) if layers > 1 else 1
            ref = config.evaluate_setting("x", values, t, validate=float)
            assert mki.at_t(tuple(values), t, "float") == ref


def test_layer_globs_match_exactly_mergekits_substring_filter():
    """Under a layer prefix, the globs match a name iff the filter is a substring of it (also
    where the filter straddles the prefix, or contains glob characters)."""
    import fnmatch

    rng = random.Random(1)
    alphabet = "ab.1*[?"
    for _ in range(3000):
        prefix = "m.l.1."
        name = prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        start = rng.randint(0, len(name) - 1)
        filt = name[start:start + rng.randint(1, 5)] if rng.random() < 0.5 else \
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
        globs = mki._layer_globs(prefix, filt)
        mergekit_matches = filt == "*" or filt in name  # '*' is mergekit's "every tensor"
        assert any(fnmatch.fnmatchcase(name, g) for g in globs) == mergekit_matches, (name, filt, globs)


def test_per_model_parameters_take_precedence_over_top_level(models, tmp_path):
    src = tmp_path / "ta.yml"
    src.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": models["base"],
        "parameters": {"weight": [{"filter": "lm_head", "value": 0.1}, {"value": 0.25}]},
        "models": _models(models, ("a", {"weight": [{"filter": "mlp", "value": 2.0}]}), ("b", None))}))
    merge = yaml.safe_load(mki.import_mergekit(src).text)["steps"]["merged"]
    a, b = merge["weights"]
    # a: its own mlp filter first, then the top-level conditions; b: the top-level ones only
    assert a == [{"pattern": "*mlp*", "value": 2.0}, {"pattern": "*lm_head*", "value": 0.1},
                 {"pattern": "*", "value": 0.25}]
    assert b == [{"pattern": "*lm_head*", "value": 0.1}, {"pattern": "*", "value": 0.25}]
    assert merge["deltas"] == ["ft_a_delta", "ft_b_delta"]


# -- random masks: equal in distribution ----------------------------------------------------

def _per_model_dare(m: dict, method: str = "dare_ties") -> dict:
    return {"merge_method": method, "base_model": m["base"], "dtype": "float32",
            "models": _models(m, ("a", {"weight": 1.0, "density": 0.8}), ("b", {"weight": 0.5, "density": 0.3}))}


def test_per_model_dare_densities_become_a_density_per_delta(models, tmp_path):
    steps = yaml.safe_load(mki.import_mergekit(write(tmp_path, _per_model_dare(models))).text)["steps"]
    merge = steps["merged"]
    assert merge["method"] == "dare-ties" and merge["density"] == [0.8, 0.3]
    assert merge["deltas"] == ["ft_a_delta", "ft_b_delta"] and not any(s["op"] == "dare-prune" for s in steps.values())
    linear = yaml.safe_load(mki.import_mergekit(write(tmp_path, _per_model_dare(models, "dare_linear"))).text)
    assert linear["steps"]["merged"]["method"] == "dare-linear" and linear["steps"]["merged"]["density"] == [0.8, 0.3]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_ties", "della", "per_model_dare"])
def test_random_masks_match_mergekit_in_distribution(method, models, store, tmp_path):
    import torch

    config = {"merge_method": method, "base_model": models["base"], "dtype": "float32",
              "parameters": {"density": 0.5, **({"epsilon": 0.1} if method == "della" else {})},
              "models": _models(models, ("a", {"weight": 1.0}), ("b", {"weight": 0.5}))}
    if method == "per_model_dare":
        config = _per_model_dare(models)
    need(config["merge_method"])
    ours, _ = imported(tmp_path, config, store)
    torch.manual_seed(0)
    theirs = mergekit(config, tmp_path / "mergekit_out")
    base = read_model(Path(models["base"]))
    name = "model.embed_tokens.weight"  # 16384 elements: the fraction's sd is about 0.004
    d_ours, d_theirs = ours[name] - base[name], theirs[name] - base[name]
    frac = [float((d != 0).float().mean()) for d in (d_ours, d_theirs)]
    assert abs(frac[0] - frac[1]) < 0.03 and 0.3 < frac[0] < 0.95, frac
    l1 = [float(d.abs().sum()) for d in (d_ours, d_theirs)]
    assert abs(l1[0] - l1[1]) / l1[1] < 0.05, l1


# -- the command --------------------------------------------------------------------------

def write(tmp: Path, config: dict | str, name: str = "merge.yml") -> Path:
    path = tmp / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


def test_output_file_is_never_a_users_file(models, tmp_path):
    src = write(tmp_path, CASES["linear"](models))
    mine = tmp_path / "pipeline.yaml"
    mine.write_text("weightflow: 1\nsteps: {}\n# my own work\n")
    rc, _, err = cli("import", "mergekit", src, "-o", mine)
    assert rc == 2 and "refusing to overwrite" in err and "--force" in err
    assert mine.read_text().endswith("# my own work\n")
    assert cli("import", "mergekit", src, "-o", mine, "--force")[0] == 0
    first = mine.read_text()
    assert first.startswith(mki.HEADER)
    assert cli("import", "mergekit", src, "-o", mine)[0] == 0  # our own file: replaced without --force
    assert mine.read_text() == first


def test_stdout_json_and_relative_paths(models, tmp_path, monkeypatch):
    """Relative model paths are found from the working directory (as mergekit does) and
    rewritten relative to the pipeline file written elsewhere; --json describes the result."""
    monkeypatch.chdir(Path(models["base"]).parent)
    src = write(tmp_path, {"merge_method": "ties", "base_model": "base",
                           "models": [{"model": "base"},
                                      {"model": "ft_a", "parameters": {"weight": 1, "density": 0.5}}]})
    rc, out, _ = cli("import", "mergekit", src)
    assert rc == 0 and "source: ft_a" in out and out.startswith(mki.HEADER)
    rc, out, _ = cli("import", "mergekit", src, "-o", tmp_path / "sub" / "p.yaml", "--json")
    if rc == 0:
        pytest.fail("-o into a missing directory should fail")
    (tmp_path / "sub").mkdir()
    rc, out, _ = cli("import", "mergekit", src, "-o", tmp_path / "sub" / "p.yaml", "--json")
    info = json.loads(out)
    assert rc == 0 and info["method"] == "ties" and info["mergekit_method"] == "ties" and info["exact"]
    assert info["steps"] == ["base", "ft_a", "ft_a_delta", "merged"]
    steps = yaml.safe_load((tmp_path / "sub" / "p.yaml").read_text())["steps"]
    assert (tmp_path / "sub" / steps["ft_a"]["source"]).resolve() == Path(models["a"]).resolve()


def test_hub_models_become_hf_sources_and_gradients_need_layers(tmp_path):
    config = {"merge_method": "slerp", "base_model": "org/base-7b@v1.0",
              "models": [{"model": "org/base-7b@v1.0"}, {"model": "org/tuned-7b"}],
              "parameters": {"t": [0, 1]}}
    src = write(tmp_path, config)
    rc, _, err = cli("import", "mergekit", src)
    assert rc == 2 and "key 'parameters.t'" in err and "--layers" in err
    rc, out, _ = cli("import", "mergekit", src, "--layers", 3, "--trust-remote-code")
    pipeline = yaml.safe_load(out)
    assert pipeline["steps"]["base-7b"] == {"op": "load", "source": "hf:org/base-7b@v1.0", "trust_remote_code": True}
    assert pipeline["steps"]["tuned-7b"]["source"] == "hf:org/tuned-7b"
    assert [r["value"] for r in pipeline["steps"]["merged"]["t"]] == [0.0, 0.5, 1.0, 0.0]
    assert "dtype" not in pipeline  # unknown for hub models: said in a warning


def test_tokenizer_source_becomes_the_merge_tokenizer(models, tmp_path):
    src = write(tmp_path, {**CASES["task_arithmetic"](models), "tokenizer_source": "union"})
    merge = yaml.safe_load(mki.import_mergekit(src).text)["steps"]["merged"]
    assert merge["tokenizer"] == {"source": "union"}
    src = write(tmp_path, {**CASES["task_arithmetic"](models), "tokenizer": {"source": models["a"]}})
    merge = yaml.safe_load(mki.import_mergekit(src).text)["steps"]["merged"]
    assert merge["tokenizer"] == {"source": "ft_a"}


def test_ignored_parameters_are_warned_about(models, tmp_path):
    config = CASES["task_arithmetic"](models)
    config["parameters"]["densty"] = 0.5
    config["models"][0]["parameters"]["lambda"] = 3.0   # shared: mergekit reads it at the top level only
    rc, out, err = cli("import", "mergekit", write(tmp_path, config))
    assert rc == 0 and "key 'parameters.densty'" in err and "key 'models[0].parameters.lambda'" in err
    assert "lambda: 0.8" in out


ERRORS = [
    # (config change, key named, words in the reason)
    ({"merge_method": "frankenmerge"}, "merge_method", "unknown mergekit merge method"),
    ({"merge_method": "ties", "models": "M+lora"}, "models[1].model", "LoRA"),
    ({"merge_method": "ties", "parameters": {"rescale": True}}, "parameters.rescale", "L1 rescale"),
    ({"merge_method": "ties", "no_weight": True}, "models[2].parameters.weight", "no default"),
    ({"merge_method": "ties", "dtype": "float64"}, "dtype", "float32, float16 or bfloat16"),
    ({"merge_method": "ties", "modules": {"text": {}}}, "modules", "not translated"),
    ({"merge_method": "ties", "base-model": "x"}, "base-model", "did you mean 'base_model'"),
    ({"merge_method": "ties", "tokenizer": {"source": "base", "tokens": {"<x>": {"source": "base"}}}},
     "tokenizer.tokens", "only tokenizer.source"),
    ({"merge_method": "ties", "chat_template": "chatml"}, "chat_template", "not translated"),
    ({"merge_method": "ties", "parameters": {"lambda": [{"filter": "mlp", "value": 2}, {"value": 1}]}},
     "parameters.lambda[0]", "not filters or gradients"),
    ({"merge_method": "ties", "parameters": {"normalize": "maybe"}}, "parameters.normalize", "boolean"),
    ({"merge_method": "ties", "parameters": {"density": [{"filter": "mlp", "vaule": 1}]}},
     "parameters.density[0]", "needs 'value'"),
    ({"merge_method": "task_arithmetic", "parameters": {"normalize": True}, "gradient_weight": True},
     "parameters.normalize", "sum to 1"),
    ({"merge_method": "slerp", "slices": 2}, "slices", "only mergekit's passthrough"),
    ({"merge_method": "slerp", "slices": 1}, "slices[0].sources[1].layer_range", "not every layer"),
    ({"merge_method": "passthrough", "slices": 1}, "slices[0].sources", "one source per slice"),
    ({"merge_method": "nearswap"}, "models", "exactly 1 model besides the base"),
    ({"merge_method": "breadcrumbs", "no_density": True,
      "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}, "parameters.density", "gamma: 0"),
]


def _error_config(m: dict, change: dict) -> dict:
    change = dict(change)
    config = {"merge_method": change.pop("merge_method"), "base_model": m["base"],
              "models": _models(m, ("base", None), ("a", {"weight": 1.0, "density": 0.5}),
                                ("b", {"weight": 0.5, "density": 0.5}))}
    if change.pop("models", None) == "M+lora":
        config["models"][1]["model"] = f"{m['a']}+{m['b']}"
    if change.pop("no_density", None):
        for entry in config["models"][1:]:
            del entry["parameters"]["density"]
    if change.pop("no_weight", None):
        del config["models"][2]["parameters"]["weight"]
    if change.pop("gradient_weight", None):
        config["models"][2]["parameters"]["weight"] = [0.2, 0.5]
    slices = change.pop("slices", None)
    if slices:
        ranges = [[0, 2], [2, 4]] if slices == 2 else [[0, LAYERS], [0, 2]]
        config.pop("models")
        config["slices"] = [{"sources": [{"model": m["base"], "layer_range": ranges[0]},
                                         {"model": m["a"], "layer_range": ranges[1]}]}]
        if slices == 2:
            config["slices"] = [{"sources": [{"model": m[k], "layer_range": r}]}
                                for k, r in zip("ab", ranges, strict=True)]
    config.update(change)
    return config


@pytest.mark.parametrize("change,key,why", ERRORS, ids=[e[1] for e in ERRORS])
def test_untranslatable_config_is_an_error_naming_the_key(change, key, why, models, tmp_path):
    config = _error_config(models, change)
    src = write(tmp_path, config)
    rc, out, err = cli("import", "mergekit", src, "-o", tmp_path / "p.yaml")
    assert rc == 2, (out, err)
    assert f"{src}: key '{key}'" in err and why in err, err
    assert "Traceback" not in err and not (tmp_path / "p.yaml").exists()


def test_import_does_not_import_torch(models, tmp_path):
    src = write(tmp_path, CASES["slerp"](models))
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        from weightflow.dsl.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["import", "mergekit", {str(src)!r}])
        heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch", "numpy") if m in sys.modules)
        print(rc, heavy)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "0 []", res.stdout + res.stderr


def test_unreadable_configs_are_clear_errors(tmp_path):
    rc, _, err = cli("import", "mergekit", tmp_path / "missing.yml")
    assert rc == 2 and "cannot read" in err and "missing.yml" in err
    bad = write(tmp_path, "merge_method: ties\nmodels: [\n", "bad.yml")
    rc, _, err = cli("import", "mergekit", bad)
    assert rc == 2 and f"{bad}:" in err and "Traceback" not in err
    rc, _, err = cli("import", "mergekit", write(tmp_path, "[1, 2]\n", "list.yml"))
    assert rc == 2 and "key '(top level)'" in err
