"""The Ray backend: every cache miss whose inputs are settled runs as a Ray task.

The driver plans exactly as the in-process runner does (same Planner, keys, lock file,
``--frozen`` checks and exports: :class:`RayRunner` only replaces ``Runner._run_steps``).
A task receives the pipeline file's path, its ``--var`` overrides, the step's name, key and
its inputs' keys and digests -- never a checkpoint -- opens the store itself, runs the op
through the same ``Runner.execute_step`` as a local run, publishes, and returns the digest
and manifest.  So nothing checkpoint-sized goes through Ray's object store, and a run's lock
file equals a local run's (in ``reproducible: strict`` the bytes do too).

``ray`` is optional: nothing here imports it at module level, and ``import weightflow.dsl``
never imports this module.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from weightflow.dsl.engine.planner import StepStatus
from weightflow.dsl.engine.runner import Runner, _RunState
from weightflow.dsl.lang.diagnostics import StepFailed, WeightflowError
from weightflow.dsl.lang.pipeline import Pipeline
from weightflow.dsl.lang.spec import parse_memory
from weightflow.dsl.store.content import Entry, Store

#: How often Ray re-runs a task whose worker process died (not one whose op raised).
MAX_RETRIES = 2


class RayUnavailable(WeightflowError):
    exit_code = 2


class RayRunFailed(WeightflowError):
    """One or more steps failed on the Ray workers (their siblings finished and published)."""

    exit_code = 1


def task_resources(declared: Mapping[str, Any] | None, device: str | None,
                   op_default: Mapping[str, Any] | None = None,
                   worker_cpus: float = 1.0) -> dict[str, float | int]:
    """The Ray task options (``num_cpus``, ``num_gpus``, ``memory``) of one step.

    ``declared``: the step's ``resources:`` (wins key by key); else the op's default
    (``op_default``, its declaration's ``resources``: training ops say ``cpus: all``, the
    CPUs of the largest worker, since their threads use them all; without one, one CPU).  ``device: cuda``
    implies one GPU unless ``gpus`` says otherwise.  ``cpus: all`` means ``worker_cpus``.
    """
    merged: dict[str, Any] = dict(op_default or {})
    merged.update(declared or {})
    cpus = merged.get("cpus", 1)
    num_cpus = float(worker_cpus) if cpus == "all" else float(cpus)
    num_gpus = float(merged["gpus"]) if "gpus" in merged else (1.0 if (device or "").startswith("cuda") else 0.0)
    out: dict[str, float | int] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if merged.get("memory") is not None:
        out["memory"] = parse_memory(merged["memory"])
    return out


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--backend ray needs Ray, which is not installed: pip install 'ray[default]' "
                             "(or run without --backend ray)") from None
    return ray


def _worker_name() -> str:
    """Where a task runs, for progress lines: ``IP pid N node ID8`` (the node tells apart
    Ray nodes that share an IP, as on one machine)."""
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = "?"
    node = ""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # else asking for the context would start Ray
        with contextlib.suppress(Exception):
            node = f" node {ray.get_runtime_context().get_node_id()[:8]}"
    return f"{ip} pid {os.getpid()}{node}"


def _open_store(job: Mapping[str, Any]) -> Store:
    """The worker's store.  On a cluster (``--address``) with a remote: the worker's own
    local cache ($WEIGHTFLOW_CACHE) in front of the shared remote.  Otherwise the driver's
    store directory, which every worker shares (one machine, or a shared filesystem the
    driver probed), in front of the remote if there is one."""
    root = None if job["own_cache"] else job["store_root"]
    return Store(root, remote=job.get("remote"))


def run_step_task(job: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task for one step (runs in a worker process).

    Never raises for a step's failure: returns ``{"ok": False, "error": ...}`` so the
    driver reports it as the local runner would (the message names the step)."""
    from weightflow.dsl.engine import repro

    if "torch" not in sys.modules:  # the runtime_env set STRICT_ENV already; this also unsets
        repro.apply(job["mode"])     # STRICT_UNSET for a fresh worker process
    from weightflow.dsl.lang.pipeline import load_pipeline

    name = job["step"]
    worker = _worker_name()
    print(f"{name}: started on {worker}", file=sys.stderr, flush=True)
    started = time.time()
    try:
        p = load_pipeline(job["pipeline"], job["overrides"])
        store = _open_store(job)
        runner = _WorkerRunner(p, store, force=[name] if job["force"] else [], reproducible=job["mode"],
                               shard_bytes=job["shard_bytes"], export=False,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
        runner.task_cpus = job.get("cpus")
        digests = dict(job["digests"])
        key = runner.planner.key_of(name, digests)
        if key != job["key"]:
            raise WeightflowError(
                f"step '{name}': on worker {worker} the pipeline gives key {key[:12]}, the driver "
                f"planned {job['key'][:12]}: the pipeline file or its data differ between the machines")
        for source, input_key in job["input_keys"].items():
            _ensure_input(store, name, source, input_key, digests[source], bool(job.get("remote")))
        entry, status = runner.execute_step(name, key, digests, {}, dict(job["names"]))
    except WeightflowError as exc:
        message = str(exc)
        if not isinstance(exc, StepFailed):  # e.g. configure_torch's check: name the step, as ops' errors
            where = _where(job["pipeline"], job["overrides"], name)
            message = str(StepFailed(name, f"on worker {worker}: {message}", where))
        return {"ok": False, "error": message, "exit_code": exc.exit_code, "worker": worker}
    return {"ok": True, "digest": entry.digest, "kind": entry.kind, "manifest": entry.manifest,
            "status": status.status, "reason": status.reason, "seconds": status.seconds,
            "worker": worker, "started": started, "finished": time.time()}


def _where(pipeline: str, overrides: Mapping[str, Any], name: str) -> str:
    """``file:line:col`` of step ``name`` (the pipeline file may itself be what failed)."""
    from weightflow.dsl.lang.pipeline import load_pipeline

    try:
        d = load_pipeline(pipeline, dict(overrides)).diagnostic(name, "")
    except WeightflowError:
        return pipeline
    return f"{d.file}:{d.line}:{d.col}"


class _WorkerRunner(Runner):
    """The Runner a task uses: ``execute_step`` as in a local run, with MKL's threads capped
    at the task's CPUs in strict mode.  Strict mode gives MKL every core of the process
    (its strict GEMMs give the same bytes at any thread count), right for one step per
    machine but oversubscribing when Ray runs several steps side by side: two fine-tunes
    on 2 cores with 2 MKL threads each ran 3-5x slower than in turn."""

    task_cpus: float | None = None

    def _configure_torch(self, device: str) -> None:
        first = not self._torch_configured
        super()._configure_torch(device)
        if first and self.mode == "strict" and self.task_cpus:
            from weightflow.dsl.engine import repro

            repro._mkl_threads(max(1, int(self.task_cpus)))


def _ensure_input(store: Store, name: str, source: str, key: str, digest: str, remote: bool) -> None:
    """Make input ``source`` present in the worker's store (with a remote, its lookup
    downloads it into the local cache); fail clearly where it cannot be seen."""
    if remote:
        store.lookup(key)
    if not store.object_path(digest).exists():
        where = "the remote store" if remote else f"the store directory {store.root}"
        raise StepFailed(name, f"its input '{source}' (object {digest[:12]}) is not in {where} as seen "
                         f"from worker {_worker_name()}: every worker needs the same store (a shared "
                         "directory, or a remote store)")


def probe_store(root: str) -> dict[str, Any]:
    """Body of the Ray task that checks a worker sees the store directory (a marker file)."""
    marker = Path(root) / ".ray-probe"
    seen = {p.name for p in marker.glob("*")} if marker.is_dir() else set()
    return {"worker": _worker_name(), "seen": sorted(seen)}


class RayRunner(Runner):
    """A Runner whose cache misses run as Ray tasks, as many at once as resources allow."""

    def __init__(self, pipeline: Pipeline, store: Store, *, address: str | None = None,
                 jobs: int | None = None, keep_going: bool = False,
                 var_overrides: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(pipeline, store, **kwargs)
        self.address = address
        self.jobs = jobs
        self.keep_going = keep_going
        self.var_overrides = dict(var_overrides or {})
        self.remote_url: str | None = getattr(store, "remote_url", None)
        # how each task's timing looked, for `--json` and the tests: name -> worker, start, end
        self.timeline: dict[str, dict[str, Any]] = {}
        self._worker_cpus: float | None = None  # set on connecting
        self._started_here = False

    # -- the cluster ---------------------------------------------------------
    def _connect(self, ray) -> bool:
        """Join the cluster (``address``) or start a local one; True when started here."""
        if ray.is_initialized():
            return False
        opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                "configure_logging": False}
        try:
            if self.address:
                ray.init(address=self.address, **opts)
            else:
                ray.init(num_cpus=self.jobs or os.cpu_count() or 1, **opts)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise RayUnavailable(f"--backend ray: cannot start or join {where}: {exc}") from None
        return True

    def _runtime_env(self) -> dict[str, Any]:
        """Strict mode's environment for the worker processes, set before they start (a
        worker may run several tasks, and torch reads these once, at import)."""
        from weightflow.dsl.engine import repro

        env = dict(repro.STRICT_ENV) if self.mode == "strict" else {}
        return {"env_vars": env} if env else {}

    def _check_shared_store(self, ray) -> None:
        """With a cluster address and no remote store, every node must see the store
        directory: a tiny task on each node looks for a marker file the driver wrote."""
        if self.remote_url or not self.address:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        marker_dir = self.store.root / ".ray-probe"
        marker_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        (marker_dir / token).write_text("weightflow ray store probe\n")
        probe = ray.remote(probe_store)
        try:
            refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                node["NodeID"], soft=False)).remote(str(self.store.root))
                for node in ray.nodes() if node.get("Alive")]
            blind = [r["worker"] for r in ray.get(refs, timeout=120) if token not in r["seen"]]
        finally:
            (marker_dir / token).unlink(missing_ok=True)
        if blind:
            raise WeightflowError(
                f"--backend ray: the worker(s) {', '.join(blind)} cannot see the store directory "
                f"{self.store.root}; with --address every worker needs the same store: a directory "
                "shared by all machines (--cache-dir on NFS), or a remote store")

    def _largest_worker_cpus(self, ray) -> float:
        cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        return max(cpus or [1.0]) or 1.0

    # -- the schedule ----------------------------------------------------------
    def _run_steps(self, st: _RunState) -> None:
        ray = _import_ray()
        self._started_here = False
        try:
            self._schedule(ray, st)
        finally:
            if self._started_here:
                ray.shutdown()

    def _cluster(self, ray) -> float:
        """Connect on the first cache miss (a run that is all cache hits never starts Ray),
        check the store is shared; the CPUs of the largest worker (for ``cpus: all``)."""
        if self._worker_cpus is None:
            self._started_here = self._connect(ray)
            self._check_shared_store(ray)
            self._worker_cpus = self._largest_worker_cpus(ray)
        return self._worker_cpus

    def _job(self, name: str, key: str, st: _RunState) -> dict[str, Any]:
        step = self.p.steps[name]
        sources = list(dict.fromkeys(e.source for e in step.inputs))
        input_keys = {s: st.new_lock[s].key for s in sources}
        return {"pipeline": str(self.p.path.resolve()), "overrides": self.var_overrides, "step": name,
                "key": key, "digests": {s: st.digests[s] for s in sources}, "input_keys": input_keys,
                "names": {d: n for d, n in st.names.items() if d in {st.digests[s] for s in sources}},
                "store_root": str(self.store.root), "remote": self.remote_url,
                "own_cache": bool(self.address and self.remote_url), "mode": self.mode,
                "shard_bytes": self.shard_bytes, "force": name in self.force}

    def _options(self, name: str, worker_cpus: float) -> dict[str, Any]:
        step = self.p.steps[name]
        device = getattr(step.params, "device", None)
        res = task_resources(getattr(step, "resources", None), str(device) if device else None,
                             getattr(step.op, "resources", None), worker_cpus)
        if self.jobs:
            res["num_cpus"] = min(res["num_cpus"], float(self.jobs))
        opts: dict[str, Any] = {**res, "max_retries": MAX_RETRIES, "retry_exceptions": False,
                                "name": f"weightflow:{name}"}
        if env := self._runtime_env():
            opts["runtime_env"] = env
        return opts

    def _schedule(self, ray, st: _RunState) -> None:  # noqa: C901  (one loop, read top to bottom)
        task = ray.remote(run_step_task)
        pending = list(st.todo)
        inflight: dict[Any, tuple[str, str, str]] = {}  # ref -> (name, key, position)
        failures: dict[str, str] = {}
        exit_codes: list[int] = []
        not_run: list[str] = []

        def blocked(name: str) -> bool:
            return any(e.source in failures or e.source in not_run for e in self.p.steps[name].inputs)

        def submit_ready() -> None:
            progressed = True
            while progressed:
                progressed = False
                for name in list(pending):
                    if failures and not self.keep_going:
                        return
                    if blocked(name):
                        pending.remove(name)
                        not_run.append(name)
                        continue
                    if not all(e.source in st.digests for e in self.p.steps[name].inputs):
                        continue
                    pending.remove(name)
                    key, entry, position = self._lookup_step(name, st)
                    if entry is not None:
                        self._settle(name, key, entry, StepStatus(name, self.p.steps[name].op.name, "cached",
                                                                  key, entry.digest), st)
                        progressed = True
                        continue
                    opts = self._options(name, self._cluster(ray))
                    ref = task.options(**opts).remote({**self._job(name, key, st), "cpus": opts["num_cpus"]})
                    inflight[ref] = (name, key, position)
                    self.log(f"{position} {name} ({self.p.steps[name].op.name}): submitted to Ray "
                             f"({_describe(opts)})")

        try:
            submit_ready()
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                for ref in done:
                    name, key, position = inflight.pop(ref)
                    op = self.p.steps[name].op.name
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker died MAX_RETRIES + 1 times
                        result = {"ok": False, "exit_code": 1, "worker": "?",
                                  "error": f"{self._where(name)}: step '{name}' failed: its Ray task failed "
                                  f"after {MAX_RETRIES} retries: {_first_line(exc)}"}
                    if not result["ok"]:
                        failures[name] = result["error"]
                        exit_codes.append(int(result.get("exit_code", 1)))
                        self.log(f"{position} {name} ({op}): failed on {result['worker']}")
                        continue
                    entry = Entry(key, result["digest"], result["kind"],
                                  self.store.object_path(result["digest"]), result["manifest"])
                    status = StepStatus(name, op, result["status"], key, entry.digest,
                                        reason=result["reason"], seconds=result["seconds"])
                    self.timeline[name] = {k: result[k] for k in ("worker", "started", "finished")}
                    how = (f"done in {result['seconds']:.2f}s" if result["status"] == "executed"
                           else "cached (computed by a concurrent run)")
                    self.log(f"{position} {name} ({op}): {how} on {result['worker']} -> {entry.digest[:12]}")
                    self._settle(name, key, entry, status, st)
                submit_ready()
        except KeyboardInterrupt:
            for ref in inflight:
                ray.cancel(ref, force=False)
            self.log(f"interrupted: cancelled {len(inflight)} running step(s); finished steps stay published")
            raise
        if failures:
            skipped = [n for n in st.todo if n not in st.statuses and n not in failures]
            tail = (f"\nnot run (downstream of a failure{'' if self.keep_going else ', or stopped'}): "
                    + ", ".join(skipped)) if skipped else ""
            err = RayRunFailed("\n".join(failures.values()) + tail)
            err.exit_code = max(exit_codes or [1])
            raise err


def _describe(opts: Mapping[str, Any]) -> str:
    parts = [f"cpus={opts['num_cpus']:g}"]
    if opts.get("num_gpus"):
        parts.append(f"gpus={opts['num_gpus']:g}")
    if opts.get("memory"):
        parts.append(f"memory={opts['memory'] / 1e9:.3g}GB")
    return ", ".join(parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

