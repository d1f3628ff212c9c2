"""`--backend ray`: cache misses as Ray tasks on a real local Ray (2 CPUs), and the
`resources:` step key.  One ray.init for the module; the two-node test runs its own
cluster through `ray start` and the CLI, and always stops it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_LLAMA, save_tiny_llama, write_pipeline

from weightflow.dsl.lang.diagnostics import PipelineError

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module's in-process runs (RayRunner joins it, never shuts it down)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """The conftest tiny models plus one of another shape (a delta against it fails)."""
    small = save_tiny_llama(tmp_path_factory.mktemp("small") / "small", seed=4,
                            config={**TINY_LLAMA, "hidden_size": 32, "intermediate_size": 64})
    return {**tiny_models, "small": small}


PIPELINE = """
weightflow: 1
reproducible: strict
steps:
  base: {{op: load, source: {base}}}
  ft_a: {{op: load, source: {ft_a}}}
  ft_b: {{op: load, source: {ft_b}}}
  delta_a: {{op: extract-delta, model: ft_a, base: base}}
  delta_b: {{op: extract-delta, model: ft_b, base: base, resources: {{cpus: 1, memory: 1GB}}}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [delta_a, delta_b], weights: [0.5, 0.5]}}
  pa: {{op: prune-wanda, model: ft_a, method: magnitude, sparsity: 0.4}}
  pb: {{op: prune-wanda, model: ft_b, method: magnitude, sparsity: 0.4}}
outputs: {{merged: out/merged}}
"""


def _run(path: Path, store_dir: Path, lock: Path, ray_backend: bool, **kwargs):
    from weightflow.dsl.engine.ray_backend import RayRunner
    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    p = load_pipeline(path)
    p.lock_file = lock
    logs: list[str] = []
    cls = RayRunner if ray_backend else Runner
    runner = cls(p, Store(store_dir), log=logs.append, export=False, **kwargs)
    return runner, runner.run(), logs


@pytest.mark.slow
def test_same_lock_file_and_digests_as_a_local_run(tmp_path, models, ray_local):
    import json

    path = write_pipeline(tmp_path, PIPELINE.format(**models))
    # the local run in a fresh process: strict mode must be applied before torch is imported,
    # and this test process imported torch to build the models
    local = subprocess.run([str(VENV_BIN / "weightflow"), "run", str(path), "--json", "--no-export",
                            "--cache-dir", str(tmp_path / "local-store"), "--lock", str(tmp_path / "local.lock")],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    runner, remote, logs = _run(path, tmp_path / "ray-store", tmp_path / "ray.lock", True)
    assert (tmp_path / "ray.lock").read_bytes() == (tmp_path / "local.lock").read_bytes()
    assert [(s.name, s.status, s.key, s.digest) for s in remote.steps] == \
        [(s["name"], s["status"], s["key"], s["digest"]) for s in json.loads(local.stdout)["steps"]]
    assert all(s.status == "executed" for s in remote.steps)
    # each step ran in a Ray worker process, not in this one, and said where
    assert set(runner.timeline) == {s.name for s in remote.steps}
    assert all(str(os.getpid()) != t["worker"].rsplit(" ", 1)[-1] for t in runner.timeline.values())
    assert any("delta_b (extract-delta): submitted to Ray (cpus=1, memory=1GB)" in m for m in logs)
    assert all(" pid " in m for m in logs if "done in" in m)
    # a second run through Ray is all cache hits and does not need a task
    _, again, _ = _run(path, tmp_path / "ray-store", tmp_path / "ray.lock", True)
    assert {s.status for s in again.steps} == {"cached"}


@pytest.mark.slow
def test_independent_steps_run_at_once(tmp_path, models, ray_local):
    import json

    # long enough (300 steps) that a second worker started cold (importing torch) still overlaps
    # the first: with 4 steps the first had finished before the second worker was up
    data = tmp_path / "train.jsonl"  # pre-tokenized: the tiny model has no tokenizer
    data.write_text("".join(json.dumps({"input_ids": [(7 * i + j) % 250 + 1 for j in range(24)]}) + "\n"
                            for i in range(32)))
    steps = "".join(
        f"  ft{i}: {{op: finetune, model: base, data: train.jsonl, max_steps: 300, learning_rate: 0.01, "
        f"batch_size: 4, seed: {i}, resources: {{cpus: 1}}}}\n" for i in (1, 2))
    path = write_pipeline(tmp_path, f"weightflow: 1\nreproducible: strict\nsteps:\n"
                          f"  base: {{op: load, source: {models['base']}}}\n{steps}")
    runner, outcome, _ = _run(path, tmp_path / "store", tmp_path / "p.lock", True)
    a, b = runner.timeline["ft1"], runner.timeline["ft2"]
    # both were running at one moment: each started before the other finished
    assert a["started"] < b["finished"] and b["started"] < a["finished"], runner.timeline
    assert a["worker"] != b["worker"]


FAILING = """
weightflow: 1
steps:
  base: {{op: load, source: {base}}}
  small: {{op: load, source: {small}}}
  bad: {{op: extract-delta, model: small, base: base}}
  after_bad: {{op: dare-prune, delta: bad, drop_rate: 0.5}}
  pa: {{op: prune-wanda, model: base, method: magnitude, sparsity: 0.4}}
  pa2: {{op: prune-wanda, model: pa, method: magnitude, sparsity: 0.6}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("keep_going", [False, True])
def test_a_failing_step_is_named_and_its_siblings_publish(tmp_path, models, ray_local, keep_going):
    from weightflow.dsl.engine.planner import Planner
    from weightflow.dsl.engine.ray_backend import RayRunFailed
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    path = write_pipeline(tmp_path, FAILING.format(**models))
    store_dir = tmp_path / "store"
    with pytest.raises(RayRunFailed) as info:
        _run(path, store_dir, tmp_path / "p.lock", True, keep_going=keep_going)
    message = str(info.value)
    assert "step 'bad' failed" in message and "pipeline.yaml:" in message
    assert "after_bad" in message  # named as not run: it is downstream of the failure
    assert not (tmp_path / "p.lock").exists()  # as a local run: no lock file after a failure
    store = Store(store_dir)
    planner = Planner(load_pipeline(path), store)
    digests: dict[str, str] = {}
    for name in ("base", "small", "pa", "pa2"):
        entry = store.lookup(planner.key_of(name, digests))
        if entry is None:
            break
        digests[name] = entry.digest
    # the sibling that ran beside the failing step finished and published
    assert {"base", "small", "pa"} <= set(digests)
    if keep_going:  # everything not downstream of 'bad' ran
        assert "pa2" in digests
        assert "pa2" not in message


def test_a_worker_that_imported_torch_too_early_fails_the_step_clearly(tmp_path, models):
    """The task body in a process where torch ran before strict mode was applied (this test
    process): configure_torch's check fails, and the task returns the step's failure, named,
    instead of producing bytes that differ from a local run's."""
    import torch

    from weightflow.dsl.engine.planner import Planner
    from weightflow.dsl.engine.ray_backend import run_step_task
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU runs ATen's default kernels anyway: nothing to detect")
    path = write_pipeline(tmp_path, f"weightflow: 1\nreproducible: strict\nsteps:\n"
                          f"  base: {{op: load, source: {models['base']}}}\n")
    store = Store(tmp_path / "store")
    key = Planner(load_pipeline(path), store, mode="strict").key_of("base", {})
    result = run_step_task({"pipeline": str(path), "overrides": {}, "step": "base", "key": key, "digests": {},
                            "input_keys": {}, "names": {}, "store_root": str(store.root), "remote": None,
                            "own_cache": False, "mode": "strict", "shard_bytes": 1 << 30, "force": False,
                            "cpus": 1})
    assert result["ok"] is False
    assert "step 'base' failed" in result["error"] and "strict needs ATen's default CPU kernels" in result["error"]
    assert store.lookup(key) is None  # nothing was published


def test_resources_mapping():
    from weightflow.dsl.engine.ray_backend import task_resources
    from weightflow.dsl.lang.spec import check_resources, parse_memory
    from weightflow.ops.finetune import OP as FINETUNE

    assert task_resources(None, None) == {"num_cpus": 1.0, "num_gpus": 0.0}  # an op declaring none: 1 CPU
    assert task_resources(None, "cpu", FINETUNE.resources, worker_cpus=8) == {"num_cpus": 8.0, "num_gpus": 0.0}
    assert task_resources({"cpus": 2}, "cuda", FINETUNE.resources, worker_cpus=8) == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert task_resources({"gpus": 0}, "cuda")["num_gpus"] == 0.0  # an explicit gpus wins
    assert task_resources({"cpus": 4, "gpus": 1, "memory": "16GB"}, None) == \
        {"num_cpus": 4.0, "num_gpus": 1.0, "memory": 16 * 10**9}
    # an op's default, overridden key by key
    assert task_resources({"gpus": 2}, None, {"cpus": 3, "memory": "1GiB"}) == \
        {"num_cpus": 3.0, "num_gpus": 2.0, "memory": 2**30}
    assert task_resources({"cpus": "all"}, None, worker_cpus=6)["num_cpus"] == 6.0
    assert parse_memory("512MiB") == 512 * 2**20 and parse_memory(1000) == 1000 and parse_memory("1.5g") == 1.5e9
    for bad in ("lots", "-1GB", "16 parsecs", 0, True):
        with pytest.raises(ValueError, match="memory"):
            parse_memory(bad)
    with pytest.raises(ValueError, match="no key 'disk'"):
        check_resources({"disk": 1})
    with pytest.raises(ValueError, match="resources.cpus"):
        check_resources({"cpus": 0})
    with pytest.raises(ValueError, match="resources.gpus"):
        check_resources({"gpus": "one"})


def test_resources_is_not_in_the_key_and_bad_values_are_reported(tmp_path, models):
    from weightflow.dsl.engine.planner import Planner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    plain = "weightflow: 1\nsteps:\n  base: {{op: load, source: {base}}}\n  p: {{op: prune-wanda, model: base, " \
            "method: magnitude, sparsity: 0.4{extra}}}\n"
    a = load_pipeline(write_pipeline(tmp_path, plain.format(base=models["base"], extra=""), "a.yaml"))
    b = load_pipeline(write_pipeline(tmp_path, plain.format(
        base=models["base"], extra=", resources: {cpus: 2, gpus: 1, memory: 8GB}"), "b.yaml"))
    assert b.steps["p"].resources == {"cpus": 2, "gpus": 1, "memory": "8GB"} and a.steps["p"].resources == {}
    store = Store(tmp_path / "store")
    digests = {"base": "0" * 64}
    assert Planner(a, store).key_of("p", digests) == Planner(b, store).key_of("p", digests)
    bad = write_pipeline(tmp_path, plain.format(base=models["base"], extra=", resources: {cpus: 2, disk: 9}"),
                         "c.yaml")
    with pytest.raises(PipelineError) as info:
        load_pipeline(bad)
    text = str(info.value)
    assert "c.yaml:4:" in text and "no key 'disk'" in text, text
    fam = write_pipeline(tmp_path, plain.format(base=models["base"], extra=", matrix: {resources: [1, 2]}"),
                         "d.yaml")
    with pytest.raises(PipelineError, match="'resources' cannot vary inside a family"):
        load_pipeline(fam)


def test_committed_schema_accepts_resources():
    import json

    import jsonschema

    schema = json.loads((ROOT / "pipelines" / "weightflow.schema.json").read_text())
    doc = {"weightflow": 1, "steps": {
        "base": {"op": "load", "source": "m"},
        "p": {"op": "prune-wanda", "model": "base", "method": "magnitude", "resources": {"cpus": 2, "memory": "8GB"}}}}
    jsonschema.validate(doc, schema)
    doc["steps"]["p"]["resources"] = {"disk": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_ray_is_optional(monkeypatch):
    probe = ("import sys, weightflow.dsl.cli, weightflow.dsl.engine.runner, weightflow.dsl.lang.pipeline; "
             "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from weightflow.dsl.engine import ray_backend

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ray_backend.RayUnavailable, match="needs Ray, which is not installed"):
        ray_backend._import_ray()


def test_cli_rejects_ray_options_without_the_ray_backend(tmp_path, models):
    path = write_pipeline(tmp_path, f"weightflow: 1\nsteps:\n  base: {{op: load, source: {models['base']}}}\n")
    out = subprocess.run([str(VENV_BIN / "weightflow"), "run", str(path), "--jobs", "2", "--cache-dir",
                          str(tmp_path / "s")], capture_output=True, text=True)
    assert out.returncode != 0 and "--backend ray only" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([str(VENV_BIN / "weightflow"), "run", str(path), "--backend", "ray", "--jobs", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "at least 1" in out.stderr


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start --block ARGS`` in a session of its own (so teardown can end exactly the
    processes it started, by their group), once it reports it is up."""
    proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", *args, "--disable-usage-stats"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while "block forever" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_node(proc)
            pytest.fail(f"ray start {' '.join(args)} did not come up:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def _stop_node(proc: subprocess.Popen) -> None:
    """End the node's process group: SIGTERM, then SIGKILL what is left after 20 s."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _two_node_run(tmp_path: Path, models: dict[str, Path], store_args: list[str]) -> tuple[str, Path]:
    """Start a head and a second node (each with its own temp dir and WEIGHTFLOW_CACHE), run
    PIPELINE through `--backend ray --address` with ``store_args``, stop both nodes; the
    run's stderr and its lock file (checked against a local run's)."""
    port = 26379 + os.getpid() % 1000
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path(f"/tmp/wf-ray-{os.getpid()}")  # Ray's socket paths must stay short
    nodes: list[subprocess.Popen] = []
    path = write_pipeline(tmp_path, PIPELINE.format(**models))
    try:
        head_env = {**env, "WEIGHTFLOW_CACHE": str(tmp_path / "head-cache")}
        nodes.append(_start_node(["--head", "--port", str(port), "--num-cpus", "1", "--temp-dir", str(temp / "a"),
                                  "--include-dashboard=false"], head_env, tmp_path / "head.log"))
        nodes.append(_start_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--temp-dir",
                                  str(temp / "b")], {**env, "WEIGHTFLOW_CACHE": str(tmp_path / "node-cache")},
                                 tmp_path / "node.log"))
        out = subprocess.run([str(VENV_BIN / "weightflow"), "run", str(path), "--backend", "ray", "--address",
                              f"127.0.0.1:{port}", *store_args, "--lock", str(tmp_path / "ray.lock"), "--no-export"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        for proc in reversed(nodes):
            _stop_node(proc)
        shutil.rmtree(temp, ignore_errors=True)
    local = subprocess.run([str(VENV_BIN / "weightflow"), "run", str(path), "-q", "--no-export", "--cache-dir",
                            str(tmp_path / "local-store"), "--lock", str(tmp_path / "local.lock")],
                           capture_output=True, text=True, env={**env, "WEIGHTFLOW_REMOTE": ""}, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    assert (tmp_path / "ray.lock").read_bytes() == (tmp_path / "local.lock").read_bytes()
    used = {line.rsplit(" node ", 1)[-1].split()[0] for line in out.stderr.splitlines()
            if "done in" in line and " node " in line}
    assert len(used) == 2, out.stderr  # steps ran on both nodes
    return out.stderr, tmp_path / "ray.lock"


@pytest.mark.slow
def test_two_nodes_sharing_a_store_directory(tmp_path, models):
    """Two nodes on one machine share the driver's store directory: the driver's probe task
    on each node sees its marker file, and every step publishes there."""
    _two_node_run(tmp_path, models, ["--cache-dir", str(tmp_path / "shared-store")])
    assert not (tmp_path / "head-cache").exists() and not (tmp_path / "node-cache").exists()


@pytest.mark.slow
def test_two_nodes_sharing_a_remote_store(tmp_path, models):
    """Each node's workers keep their own local cache in front of one (file://) remote: a
    step's inputs are downloaded into the worker's cache, its output uploaded; the driver's
    cache receives no checkpoint."""
    import inspect

    from weightflow.dsl.store.content import Store

    if "remote" not in inspect.signature(Store).parameters:
        pytest.skip("needs the remote store (Store(root, remote=url), helper r1), not in this tree")
    remote = tmp_path / "remote"
    _two_node_run(tmp_path, models, ["--remote", f"file://{remote}", "--cache-dir", str(tmp_path / "driver-cache")])
    published = {p.stem for p in (remote / "actions").glob("*/*.json")}
    assert len(published) == 8  # every step's action entry is on the remote
    # both nodes' own caches hold objects (each ran steps, and downloaded the inputs it read)
    for cache in ("head-cache", "node-cache"):
        assert any((tmp_path / cache / "objects").glob("*/*")), cache
    driver_objects = list((tmp_path / "driver-cache" / "objects").glob("*/*"))
    assert driver_objects == [], driver_objects  # nothing checkpoint-sized came to the driver
