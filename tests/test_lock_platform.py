"""The lock file records the environment class of each digest, and ``--frozen`` tells a
changed recipe, a non-reproducible op and a lock made on another platform apart."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import write_pipeline

PIPE = """
weightflow: 1
reproducible: {mode}
steps:
  base: {{op: load, config: {{model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,
         num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 32, max_position_embeddings: 16}}}}
  tuned: {{op: load, config: {{model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,
         num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 32, max_position_embeddings: 16}}, init_seed: 1}}
  d: {{op: extract-delta, model: tuned, base: base}}
"""


def wf(*args):
    return subprocess.run([sys.executable, "-m", "weightflow", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def steps_of(lock):
    return yaml.safe_load(lock.read_text())["steps"]


def test_strict_run_records_cpu_strict_and_platform_drift_is_told_apart(tmp_path):
    path = write_pipeline(tmp_path, PIPE.format(mode="strict"))
    store = tmp_path / "cache"
    res = wf("run", path, "--cache-dir", store)
    assert res.returncode == 0, res.stderr
    lock = path.with_suffix(".lock")
    assert {s["platform"] for s in steps_of(lock).values()} == {"cpu-strict"}
    assert wf("run", path, "--frozen", "--cache-dir", store).returncode == 0

    # a lock made on another platform, whose digest differs: drift, not an error of the op
    doc = yaml.safe_load(lock.read_text())
    doc["steps"]["d"]["digest"] = "0" * 64
    doc["steps"]["d"]["platform"] = "cpu avx2 1 thread torch 2.13.0+cpu"
    lock.write_text(yaml.safe_dump(doc))
    res = wf("run", path, "--frozen", "--cache-dir", store)
    assert res.returncode == 1 and "another platform" in res.stderr and "--allow-platform-drift" in res.stderr
    res = wf("run", path, "--frozen", "--allow-platform-drift", "--cache-dir", store)
    assert res.returncode == 0 and "another platform" in res.stderr

    # the same platform and other bytes: the op is not reproducible
    doc["steps"]["d"]["platform"] = "cpu-strict"
    lock.write_text(yaml.safe_dump(doc))
    res = wf("run", path, "--frozen", "--allow-platform-drift", "--cache-dir", store)
    assert res.returncode == 1 and "not reproducible" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow  # platform-mode recording is also exercised by the two tests below
def test_platform_mode_records_the_platform_and_cli_overrides_the_key(tmp_path):
    path = write_pipeline(tmp_path, PIPE.format(mode="platform"))
    res = wf("run", path, "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    platforms = {s["platform"] for s in steps_of(path.with_suffix(".lock")).values()}
    assert len(platforms) == 1 and next(iter(platforms)).startswith("cpu ") and "torch" in next(iter(platforms))
    res = wf("run", path, "--reproducible", "strict", "--cache-dir", tmp_path / "cache2")
    assert res.returncode == 0, res.stderr
    assert {s["platform"] for s in steps_of(path.with_suffix(".lock")).values()} == {"cpu-strict"}


def test_unknown_reproducible_value_is_a_clear_error(tmp_path):
    path = write_pipeline(tmp_path, PIPE.format(mode="exact"))
    res = wf("validate", path)
    assert res.returncode == 2 and "'reproducible' must be one of platform, strict" in res.stderr


def test_lock_records_library_versions_and_a_reproduced_entry_is_kept(tmp_path):
    """Versions come from the manifest; a rerun that reproduces a digest keeps the locked
    entry (a fresh clone with newer libraries leaves the committed file unchanged), while a
    digest that differs with other library versions is drift, told as such."""
    path = write_pipeline(tmp_path, PIPE.format(mode="strict"))
    store = tmp_path / "cache"
    assert wf("run", path, "--cache-dir", store).returncode == 0
    lock = path.with_suffix(".lock")
    steps = steps_of(lock)
    import torch

    assert steps["d"]["versions"]["torch"] == torch.__version__
    assert set(steps["d"]["versions"]) >= {"weightflow", "torch", "safetensors"}

    doc = yaml.safe_load(lock.read_text())
    for s in doc["steps"].values():
        s["versions"]["torch"] = "2.12.0+cpu"  # as if locked with an older torch
    lock.write_text(yaml.safe_dump(doc))
    res = wf("run", path, "--cache-dir", tmp_path / "fresh")  # recomputes every step
    assert res.returncode == 0, res.stderr
    assert steps_of(lock) == doc["steps"]  # same digests: the locked entries stay as they were

    doc["steps"]["d"]["digest"] = "0" * 64
    lock.write_text(yaml.safe_dump(doc))
    res = wf("run", path, "--frozen", "--cache-dir", store)
    assert res.returncode == 1 and "other library versions (torch 2.12.0+cpu -> " in res.stderr
    assert "Traceback" not in res.stderr


def test_strict_run_recomputes_a_platform_mode_entry_and_plan_says_why(tmp_path):
    """The key is machine-independent, so a platform-mode entry has the strict run's key; it
    is not strict bytes, so strict mode recomputes it (and replaces it in the store)."""
    import json

    path = write_pipeline(tmp_path, PIPE.format(mode="strict"))
    store = tmp_path / "cache"
    assert wf("run", path, "--reproducible", "platform", "--cache-dir", store).returncode == 0
    res = wf("plan", path, "--json", "--cache-dir", store)
    steps = {s["name"]: s for s in json.loads(res.stdout)["steps"]}
    assert steps["base"]["status"] == "pending"
    assert "cached in platform mode (cpu " in steps["base"]["reason"]
    # the lock says platform-mode bytes; a strict run here may give others, and plan says so
    assert "locked on 'cpu " in steps["base"]["drift"] and "here 'cpu-strict'" in steps["base"]["drift"]
    res = wf("plan", path, "--json", "--reproducible", "platform", "--cache-dir", store)
    assert {s["status"] for s in json.loads(res.stdout)["steps"]} == {"cached"}

    res = wf("run", path, "--cache-dir", store)
    assert res.returncode == 0 and "reproducible: strict recomputes it" in res.stderr
    assert {s["platform"] for s in steps_of(path.with_suffix(".lock")).values()} == {"cpu-strict"}
    res = wf("plan", path, "--json", "--cache-dir", store)
    assert {s["status"] for s in json.loads(res.stdout)["steps"]} == {"cached"}
    # and a platform-mode run is served by the strict entries
    res = wf("run", path, "--reproducible", "platform", "--cache-dir", store)
    assert res.returncode == 0 and "running" not in res.stderr


def test_status_says_where_a_missing_entry_may_differ(tmp_path):
    path = write_pipeline(tmp_path, PIPE.format(mode="platform"))
    assert wf("run", path, "--cache-dir", tmp_path / "cache").returncode == 0
    lock = path.with_suffix(".lock")
    doc = yaml.safe_load(lock.read_text())
    for s in doc["steps"].values():
        s["platform"] = "cpu avx2 7 threads torch 2.13.0+cpu"
    lock.write_text(yaml.safe_dump(doc))
    res = wf("status", path, "--cache-dir", tmp_path / "empty")
    assert res.returncode == 0 and "MAY DIFFER FROM LOCK" in res.stdout
    assert "locked on 'cpu avx2 7 threads torch 2.13.0+cpu', here 'cpu " in res.stdout
    res = wf("status", path, "--cache-dir", tmp_path / "cache")  # in store: nothing may differ
    assert "MAY DIFFER" not in res.stdout
