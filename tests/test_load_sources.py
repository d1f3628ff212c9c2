"""`load` from the hub (offline: pinned commits from the local HF cache) and error paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import read_model, write_pipeline

SHA = "0123456789abcdef0123456789abcdef01234567"


def wf(args, env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "weightflow", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_unpinned_hub_revision_offline_is_a_clear_error(tmp_path, store_dir):
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  m: {op: load, source: 'hf:acme/tiny@main'}\n")
    res = wf(["plan", path, "--cache-dir", store_dir], {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert res.returncode == 2
    assert "pipeline.yaml:3:3: step 'm': cannot resolve hf:acme/tiny@main to a commit" in res.stderr
    assert "Pin a 40-character commit sha" in res.stderr and "Traceback" not in res.stderr


def test_pinned_commit_loads_from_local_hf_cache_offline(tmp_path, tiny_models, store_dir):
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / SHA
    shutil.copytree(tiny_models["base"], snap)
    (snap / "pytorch_model.bin").write_bytes(b"never read")  # pickle files are never loaded
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text(SHA)
    path = write_pipeline(tmp_path, f"weightflow: 1\nsteps:\n  m: {{op: load, source: 'hf:acme/tiny@{SHA}'}}\n"
                                    "outputs: {m: out/m}\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    res = wf(["run", path, "--json", "--cache-dir", store_dir], env)
    assert res.returncode == 0, res.stderr
    step = json.loads(res.stdout)["steps"][0]
    assert step["status"] == "executed"
    got, want = read_model(tmp_path / "out" / "m"), read_model(tiny_models["base"])
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    manifest = json.loads(wf(["show", path, "m", "--json", "--cache-dir", store_dir], env).stdout)["manifest"]
    assert manifest["recipe"]["external"] == {"hf": "acme/tiny", "commit": SHA}
    assert manifest["info"]["source"] == {"hf": "acme/tiny", "commit": SHA}


def test_missing_sources_are_reported_before_anything_runs(tmp_path, tiny_models, store_dir):
    text = f"""
weightflow: 1
steps:
  base: {{op: load, source: {tiny_models['base']}}}
  gone: {{op: load, source: ./does-not-exist}}
  gg: {{op: load, source: ./models, gguf_file: missing.gguf}}
"""
    path = write_pipeline(tmp_path, text)
    res = wf(["run", path, "--cache-dir", store_dir], {})
    assert res.returncode == 2, res.stderr
    assert "pipeline.yaml:4:3: step 'gone': model directory not found" in res.stderr
    assert "pipeline.yaml:5:3: step 'gg': GGUF file not found" in res.stderr
    assert "running" not in res.stderr  # nothing ran, not even the valid first step
    assert not (store_dir / "actions").exists()


def test_load_params_are_checked(tmp_path):
    import pytest

    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline

    path = write_pipeline(tmp_path, """
weightflow: 1
steps:
  both: {op: load, source: ./a, config: {model_type: llama}}
  bad_hf: {op: load, source: "hf:not a repo"}
  labels: {op: load, source: ./a, num_labels: 3}
""")
    with pytest.raises(PipelineError) as exc:
        load_pipeline(path)
    text = "\n".join(d.format() for d in exc.value.diagnostics)
    assert "step 'both'" in text and "exactly one of 'source'" in text
    assert "step 'bad_hf'" in text and "invalid hub source" in text
    assert "step 'labels'" in text and "num_labels" in text and "sequence-classification" in text
