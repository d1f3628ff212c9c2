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
    # why its digest, recomputed here, may legitimately differ from the lock's ("": it should not)
    drift: str = ""

    def as_json(self) -> dict:
        out: dict[str, object] = {"name": self.name, "op": self.op, "status": self.status, "key": self.key,
               "digest": self.digest}
        if self.reason:
            out["reason"] = self.reason
        if self.drift:
            out["drift"] = self.drift
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 3)
        return out


#: The platform class of strict-mode CPU results (engine/repro.py says why it holds).
STRICT_CLASS = "cpu-strict"


def step_device(step) -> str:
    """The device a step's op runs on (``cpu`` unless its params say ``device: cuda``)."""
    return str(getattr(step.params, "device", None) or "cpu")


@dataclass
class FingerprintEnv:
    """What an op's ``fingerprint`` hook may use (no torch, no model loading)."""

    store: Store
    base_dir: Path
    deep: bool = False  # re-hash files instead of trusting the memo (``verify: always``)
    # the whole pipeline, for preflight checks that compare a step with its inputs'
    # ancestors (extract-delta: base and model loaded with the same head)
    pipeline: Pipeline | None = None

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

    def __init__(self, pipeline: Pipeline, store: Store, deep: bool | None = None,
                 mode: str | None = None):
        self.p = pipeline
        self.store = store
        # the reproducibility mode of this run: strict runs reuse only strict entries
        self.mode = mode or getattr(pipeline, "reproducible", None) or "platform"
        self.env = FingerprintEnv(store, pipeline.base_dir, pipeline=pipeline)
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

    def not_reusable(self, name: str, entry: Entry) -> str | None:
        """Why a cached entry cannot serve this run, or None when it can.

        The key says *what* was computed; the entry's recorded platform says which bytes
        came out.  A strict run on CPU promises bytes that hold on every CPU, so an entry a
        platform-mode run made (or one made before platforms were recorded) is recomputed,
        and the strict result replaces it in the store.  Any entry serves a platform-mode
        run: it is a valid result of the recipe, and the lock file records where it was made.
        """
        if self.mode != "strict" or step_device(self.p.steps[name]) != "cpu":
            return None
        made_on = entry.manifest.get("platform")
        if made_on == STRICT_CLASS:
            return None
        return (f"cached in platform mode ({made_on or 'platform not recorded'}); "
                "reproducible: strict recomputes it")

    def cached(self, key: str, warn: Callable[[str], None], name: str | None = None) -> Entry | None:
        """The entry that serves ``key`` in this run (verified), or None: a miss.

        With ``name``, an entry that another reproducibility mode made and this run may not
        use (:meth:`not_reusable`) is a miss too."""
        entry = self.store.lookup(key, warn=warn)
        if entry is None:
            return None
        if name is not None and self.not_reusable(name, entry):
            return None
        if not self.store.verify(entry, deep=self.deep):
            warn(f"cache entry {key[:12]} (object {entry.digest[:12]}) is corrupted: "
                 "its content no longer matches its digest; discarding it and recomputing")
            self.store.discard(entry)
            return None
        return entry


def installed_versions() -> dict[str, str]:
    """The installed versions of the libraries a lock entry records (no import of them)."""
    from importlib import metadata

    out = {}
    for dist in lockfile.VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def drift_note(step, locked: lockfile.LockEntry | None, mode: str,
               versions: dict[str, str] | None = None) -> str:
    """Why a digest recomputed here may legitimately differ from the locked one ("" when it
    should not): the lock's platform class is not this machine's, or the libraries differ.
    Reads /proc/cpuinfo and package metadata only (no torch)."""
    if locked is None or not locked.platform:
        return ""
    from weightflow.dsl.engine import repro

    causes = []
    device = step_device(step)
    if device == "cuda":
        if locked.platform.startswith("cuda"):
            causes.append(f"locked on '{locked.platform}': CUDA bytes hold for one GPU model and torch")
        else:
            causes.append(f"locked on '{locked.platform}', here on CUDA")
    else:
        here = repro.platform_class(mode, device)
        if here != locked.platform:
            causes.append(f"locked on '{locked.platform}', here '{here}'")
    libs = lockfile.version_changes(locked.versions, installed_versions() if versions is None else versions)
    if libs:
        causes.append("libraries " + ", ".join(libs))
    return "; ".join(causes)


def plan(pipeline: Pipeline, store: Store, targets: Iterable[str] = (), force: Iterable[str] = (),
         warn: Callable[[str], None] = lambda m: None, mode: str | None = None) -> list[StepStatus]:
    """What ``run`` would do, without running anything.

    Each needed step's ``drift`` says why its digest, if recomputed here, may differ from the
    locked one (another platform class, other library versions); ``mode`` overrides the
    pipeline's ``reproducible``."""
    planner = Planner(pipeline, store, mode=mode)
    versions = installed_versions()
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
                                  f"input '{waiting[0]}' will run first",
                                  drift=drift_note(step, lock.get(name), planner.mode, versions)))
            continue
        key = planner.key_of(name, digests)
        entry = planner.cached(key, warn)
        unusable = planner.not_reusable(name, entry) if entry is not None else None
        if name in force:
            pending[name] = name
            out.append(StepStatus(name, step.op.name, "pending", key, None, "forced"))
        elif entry is not None and not unusable:
            digests[name] = entry.digest
            out.append(StepStatus(name, step.op.name, "cached", key, entry.digest))
        else:
            pending[name] = name
            old = lock.get(name)
            if unusable:
                reason = unusable
            elif old is None:
                reason = "new step (not in the lock file)"
            elif old.key != key:
                reason = "recipe or inputs changed since the lock file"
            else:
                reason = "not in the cache"
            out.append(StepStatus(name, step.op.name, "pending", key, None, reason))
        if out[-1].status == "pending":
            out[-1].drift = drift_note(step, lock.get(name), planner.mode, versions)
    return out
