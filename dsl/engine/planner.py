"""The planner: one walk over the DAG in topological order, computing step keys.

``plan`` walks the DAG: a cached step yields the output digest that the next key needs;
after the first miss, dependants are ``pending`` with the reason.  The runner
(``engine.runner``) does the same walk through the same ``Planner`` and executes each miss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from weightflow.dsl.engine.keys import key_material, step_key
from weightflow.dsl.lang import graph
from weightflow.dsl.lang.diagnostics import OpError, PipelineError
from weightflow.dsl.lang.pipeline import Pipeline
from weightflow.dsl.store import lockfile
from weightflow.dsl.store.content import Entry, Store, verify_always_env


@dataclass
class StepStatus:
    name: str
    op: str
    status: str  # cached | executed | pending | skipped
    key: str | None = None
    digest: str | None = None
    reason: str = ""
    seconds: float | None = None

    def as_json(self) -> dict:
        out: dict[str, object] = {"name": self.name, "op": self.op, "status": self.status, "key": self.key,
               "digest": self.digest}
        if self.reason:
            out["reason"] = self.reason
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class FingerprintEnv:
    """What an op's ``fingerprint`` hook may use (no torch, no model loading)."""

    store: Store
    base_dir: Path
    deep: bool = False  # re-hash files instead of trusting the memo (``verify: always``)

    def file_digest(self, path) -> str:
        if self.deep:
            return self.store.file_digest(Path(path), deep=True)
        return self.store.file_digest(Path(path))

    def data_path(self, path: str) -> Path:
        """A data file path from the pipeline, resolved against the pipeline's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def _fingerprint(pipeline: Pipeline, step, env: FingerprintEnv) -> dict | None:
    hook = step.op.fingerprint
    if hook is None:
        return None
    try:
        return hook(step.params, env)
    except OpError as exc:
        raise PipelineError([pipeline.diagnostic(step.name, str(exc))]) from None
    except OSError as exc:
        raise PipelineError([pipeline.diagnostic(step.name, f"cannot read its input: {exc}")]) from None


class Planner:
    """Computes keys in topological order, consulting the store for digests."""

    def __init__(self, pipeline: Pipeline, store: Store, deep: bool | None = None):
        self.p = pipeline
        self.store = store
        self.env = FingerprintEnv(store, pipeline.base_dir)
        self._external: dict[str, dict | None] = {}
        # ``verify: always`` (or WEIGHTFLOW_VERIFY=always): every cache hit, op input and
        # source file is re-hashed instead of trusting the memo's (size, mtime, inode).
        if deep is None:
            deep = getattr(pipeline, "verify", None) == "always" or verify_always_env()
        self.deep = deep
        if deep:
            self.env.deep = True

    def key_of(self, name: str, digests: dict[str, str]) -> str:
        step = self.p.steps[name]
        if name not in self._external:
            self._external[name] = _fingerprint(self.p, step, self.env)
        problems = []
        for path, file in step.data_files.items():
            if not file.is_file():
                problems.append(self.p.diagnostic(name, f"data file not found: {file}", path))
        if problems:
            raise PipelineError(problems)
        try:
            material = key_material(step, digests, self.env.file_digest, self._external[name])
        except OSError as exc:
            raise PipelineError([self.p.diagnostic(name, f"cannot read data file: {exc}")]) from None
        return step_key(material)

    def preflight(self, names: Iterable[str]) -> None:
        """Fingerprint external inputs of every step up front: a missing model directory
        in the last step is reported before the first step runs."""
        problems: list = []
        for name in names:
            step = self.p.steps[name]
            known = len(problems)
            for path, file in step.data_files.items():
                if not file.is_file():
                    problems.append(self.p.diagnostic(name, f"data file not found: {file}", path))
            if name not in self._external:
                try:
                    self._external[name] = _fingerprint(self.p, step, self.env)
                except PipelineError as exc:
                    problems.extend(exc.diagnostics)
            if step.op.preflight is not None and len(problems) == known:
                try:
                    step.op.preflight(step.params, self.env)
                except OpError as exc:
                    problems.append(self.p.diagnostic(name, str(exc)))
                except OSError as exc:
                    problems.append(self.p.diagnostic(name, f"cannot read its input: {exc}"))
        if problems:
            raise PipelineError(problems)

    def material_of(self, name: str, digests: dict[str, str]) -> dict:
        step = self.p.steps[name]
        return key_material(step, digests, self.env.file_digest, self._external.get(name))

    def cached(self, key: str, warn: Callable[[str], None]) -> Entry | None:
        entry = self.store.lookup(key, warn=warn)
        if entry is None:
            return None
        if not self.store.verify(entry, deep=self.deep):
            warn(f"cache entry {key[:12]} (object {entry.digest[:12]}) is corrupted: "
                 "its content no longer matches its digest; discarding it and recomputing")
            self.store.discard(entry)
            return None
        return entry


def plan(pipeline: Pipeline, store: Store, targets: Iterable[str] = (), force: Iterable[str] = (),
         warn: Callable[[str], None] = lambda m: None) -> list[StepStatus]:
    """What ``run`` would do, without running anything."""
    planner = Planner(pipeline, store)
    lock = lockfile.read(pipeline.lock_path)
    need = graph.needed(pipeline, list(targets))
    force = set(force)
    digests: dict[str, str] = {}
    pending: dict[str, str] = {}
    out = []
    for name in graph.topo_order(pipeline):
        step = pipeline.steps[name]
        if name not in need:
            old = lock.get(name)
            out.append(StepStatus(name, step.op.name, "skipped", old.key if old else None,
                                  old.digest if old else None, "not needed by the targets"))
            continue
        waiting = [e.source for e in step.inputs if e.source in pending]
        if waiting:
            pending[name] = waiting[0]
            out.append(StepStatus(name, step.op.name, "pending", None, None,
                                  f"input '{waiting[0]}' will run first"))
            continue
        key = planner.key_of(name, digests)
        entry = planner.cached(key, warn)
        if name in force:
            pending[name] = name
            out.append(StepStatus(name, step.op.name, "pending", key, None, "forced"))
        elif entry is not None:
            digests[name] = entry.digest
            out.append(StepStatus(name, step.op.name, "cached", key, entry.digest))
        else:
            pending[name] = name
            old = lock.get(name)
            if old is None:
                reason = "new step (not in the lock file)"
            elif old.key != key:
                reason = "recipe or inputs changed since the lock file"
            else:
                reason = "not in the cache"
            out.append(StepStatus(name, step.op.name, "pending", key, None, reason))
    return out
