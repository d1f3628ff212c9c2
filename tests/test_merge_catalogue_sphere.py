"""weightflow's spherical merges (nuslerp, multislerp, karcher) equal mergekit's.

Each method is run by a weightflow pipeline and by mergekit on the same tiny models and
every tensor is compared with float32 tolerances.  The pipeline runs with tiny row
chunks, so every whole-tensor and per-column quantity is accumulated over many chunks.
weightflow accumulates the inner products in float64; mergekit's float32 reductions drift
from its own float64 result on tensors of millions of elements (around 1e-5 relative), so
exact float32 parity is a property of these small tensors, not a general one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed_copy, read_model, run, write_pipeline

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed")

MLP_RULE = [{"pattern": "*mlp*", "value": 0.2}, {"pattern": "*", "value": 1.0}]


def mergekit(config: dict, out) -> dict:
    from mergekit.config import MergeConfiguration

    cfg = MergeConfiguration.model_validate({"dtype": "float32", **config})
    opts = mergekit_merge.MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=True, quiet=True,
                                       write_model_card=False)
    mergekit_merge.run_merge(cfg, str(out), opts)
    return read_model(out)


def entries(models: list[str], weights: list | None = None) -> list[dict]:
    """mergekit's ``models:`` list, with a ``weight`` parameter per model where given."""
    if weights is None:
        return [{"model": m} for m in models]
    return [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights, strict=True)]


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_models):
    from weightflow.ops.lib import tensors

    tmp = tmp_path_factory.mktemp("sphere")
    m = {k: str(v) for k, v in tiny_models.items()}
    m["ft_c"] = str(perturbed_copy(tiny_models["base"], tmp / "ft_c", seed=4))
    text = f"""
weightflow: 1
dtype: float32
steps:
  base: {{op: load, source: {m['base']}}}
  a: {{op: load, source: {m['ft_a']}}}
  b: {{op: load, source: {m['ft_b']}}}
  c: {{op: load, source: {m['ft_c']}}}
  other: {{op: load, source: {m['other']}}}
  nuslerp_cols: {{op: merge, method: nuslerp, models: [a, other], weights: [0.3, 0.7],
                 nuslerp_flatten: false, nuslerp_row_wise: true}}
  nuslerp_flat: {{op: merge, method: nuslerp, models: [a, other],
                 weights: [[{{pattern: "*mlp*", value: 0.2}}, {{pattern: "*", value: 1.0}}], 2.0]}}
  nuslerp_base: {{op: merge, method: nuslerp, base: base, models: [a, b], weights: [0.6, 0.4],
                 nuslerp_flatten: false}}
  multi: {{op: merge, method: multislerp, models: [a, b, other], weights: [0.5, 0.3, 0.2]}}
  multi_base: {{op: merge, method: multislerp, base: base, models: [a, b, c], weights: [1.0, 0.5, 0.8],
               normalize_weights: false}}
  karcher: {{op: merge, method: karcher, models: [a, b, other]}}
outputs: {{nuslerp_cols: out/nuslerp_cols, nuslerp_flat: out/nuslerp_flat, nuslerp_base: out/nuslerp_base,
          multi: out/multi, multi_base: out/multi_base, karcher: out/karcher}}
"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tensors, "CHUNK_ELEMENTS", 16)  # (256, 64) spans 256 chunks, (64,) four
        outcome, status = run(write_pipeline(tmp, text), tmp / "cache")
    assert set(status.values()) == {"executed"}
    return tmp, m


def compare(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].to(ours[name].dtype), rtol=1e-5, atol=1e-6,
                                   msg=lambda msg, name=name: f"{name}: {msg}")


CASES = {
    "nuslerp_cols": lambda m: {"merge_method": "nuslerp",
                               "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                               "models": entries([m["ft_a"], m["other"]], [0.3, 0.7])},
    "nuslerp_flat": lambda m: {"merge_method": "nuslerp",
                               "models": entries([m["ft_a"], m["other"]],
                                                 [[{"filter": "mlp", "value": 0.2}, {"value": 1.0}], 2.0])},
    "nuslerp_base": lambda m: {"merge_method": "nuslerp", "base_model": m["base"],
                               "parameters": {"nuslerp_flatten": False},
                               "models": entries([m["ft_a"], m["ft_b"]], [0.6, 0.4])},
    "multi": lambda m: {"merge_method": "multislerp",
                        "models": entries([m["ft_a"], m["ft_b"], m["other"]], [0.5, 0.3, 0.2])},
    "multi_base": lambda m: {"merge_method": "multislerp", "base_model": m["base"],
                             "parameters": {"normalize_weights": False},
                             "models": entries([m["ft_a"], m["ft_b"], m["ft_c"]], [1.0, 0.5, 0.8])},
    "karcher": lambda m: {"merge_method": "karcher", "models": entries([m["ft_a"], m["ft_b"], m["other"]])},
}


@pytest.mark.parametrize("step", list(CASES))
def test_matches_mergekit(merged, step):
    tmp, m = merged
    compare(read_model(tmp / "out" / step), mergekit(CASES[step](m), tmp / f"mk_{step}"))


def test_spherical_merges_are_not_linear(merged):
    """The comparisons are not vacuous: on task vectors that are nearly orthogonal, SLERP and the
    Karcher mean differ clearly from the linear interpolation of the same inputs."""
    tmp, m = merged
    base, a, b, other = (read_model(m[k]) for k in ("base", "ft_a", "ft_b", "other"))
    name = "model.layers.0.mlp.up_proj.weight"
    ours = read_model(tmp / "out" / "nuslerp_base")[name]
    lerp = base[name] + 0.6 * (a[name] - base[name]) + 0.4 * (b[name] - base[name])  # t = 0.4
    assert (ours - lerp).norm() > 0.05 * (ours - base[name]).norm()
    karcher = read_model(tmp / "out" / "karcher")[name]
    mean = (a[name] + b[name] + other[name]) / 3
    assert (karcher - mean).norm() > 0.05 * karcher.norm()
    # and per-column nuslerp keeps each column's interpolated norm: not the flattened result
    assert not torch.allclose(read_model(tmp / "out" / "nuslerp_cols")[name],
                              read_model(tmp / "out" / "nuslerp_flat")[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("step,expected", [
    ("{op: merge, method: nuslerp, models: [a, b], nuslerp_row_wise: true}",
     "nuslerp_row_wise: true needs nuslerp_flatten: false"),
    ("{op: merge, method: nuslerp, models: [a, b], weights: [1.0]}", "expected 2 weights"),
    ("{op: merge, method: nuslerp, models: [a, b, a]}", "at most 2"),
    ("{op: merge, method: multislerp, models: [a]}", "at least 2"),
    ("{op: merge, method: multislerp, models: [a, b], eps: 0}", "greater than 0"),
    ("{op: merge, method: multislerp, models: [a, b], weights: [1, -1]}", "sum is not zero"),
    ("{op: merge, method: karcher, models: [a, b], max_iter: 0}", "greater than or equal to 1"),
    ("{op: merge, method: karcher, models: [a, b], weights: [1, 1]}", "weights"),
])
def test_bad_params_are_clear_errors(tmp_path, tiny_models, step, expected):
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline

    text = f"""
    weightflow: 1
    steps:
      a: {{op: load, source: {tiny_models['ft_a']}}}
      b: {{op: load, source: {tiny_models['ft_b']}}}
      m: {step}
    """
    with pytest.raises(PipelineError) as exc:
        load_pipeline(write_pipeline(tmp_path, text))
    msg = "\n".join(d.format() for d in exc.value.diagnostics)
    assert "pipeline.yaml:5:" in msg and "step 'm'" in msg and expected in msg, msg


def test_multislerp_zero_weight_sum_fails_naming_the_tensor(tmp_path, tiny_models, store_dir):
    """Per-tensor weights that cancel for some tensors only are found at run time."""
    from weightflow.dsl.lang.diagnostics import StepFailed

    text = f"""
    weightflow: 1
    steps:
      a: {{op: load, source: {tiny_models['ft_a']}}}
      b: {{op: load, source: {tiny_models['ft_b']}}}
      m: {{op: merge, method: multislerp, models: [a, b],
          weights: [[{{pattern: "*mlp*", value: -1.0}}, {{pattern: "*", value: 1.0}}], 1.0]}}
    """
    with pytest.raises(StepFailed) as exc:
        run(write_pipeline(tmp_path, text), store_dir)
    assert "normalize_weights: true needs weights whose sum is not zero" in str(exc.value)
    assert "pipeline.yaml:5:3: step 'm'" in str(exc.value) and "(tensor 'model.layers.0.mlp." in str(exc.value)
