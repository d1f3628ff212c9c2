"""Plan and run a pipeline against the store.

``plan`` walks the DAG in topological order: a cached step yields the output digest
that the next key needs; after the first miss, dependants are ``pending`` with the
reason.  ``run`` does the same walk and executes each miss, publishing it before
moving on, so a failure keeps every finished entry and the next run resumes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from . import graph, lockfile
from .artifact import META_FILE, Artifact, RunContext
from .checkpoint import artifact_digest, digest_safetensors, side_file_digests
from .diagnostics import OpError, PipelineError, StepFailed, WeightflowError
from .keys import key_material, step_key
from .pipeline import Pipeline
from .store import Entry, Store, write_atomic

DEFAULT_SHARD_BYTES = 2 << 30


class FrozenMismatch(WeightflowError):
    exit_code = 1


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
        out = {"name": self.name, "op": self.op, "status": self.status, "key": self.key,
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

    def file_digest(self, path) -> str:
        return self.store.file_digest(Path(path))

    def data_path(self, path: str) -> Path:
        """A data file path from the pipeline, resolved against the pipeline's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@dataclass
class Outcome:
    steps: list[StepStatus]
    lock_changed: bool = False
    exported: dict[str, str] = field(default_factory=dict)


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

    def __init__(self, pipeline: Pipeline, store: Store):
        self.p = pipeline
        self.store = store
        self.env = FingerprintEnv(store, pipeline.base_dir)
        self._external: dict[str, dict | None] = {}

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
        problems = []
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
        entry = self.store.lookup(key)
        if entry is None:
            return None
        if not self.store.verify(entry):
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


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("weightflow", "torch", "transformers", "safetensors", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class Runner:
    def __init__(self, pipeline: Pipeline, store: Store, *, targets: Iterable[str] = (),
                 force: Iterable[str] = (), frozen: bool = False, show_progress: bool = False,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 shard_bytes: int = DEFAULT_SHARD_BYTES, export: bool = True):
        self.p = pipeline
        self.store = store
        self.targets = list(targets)
        self.force = set(force)
        self.frozen = frozen
        self.show_progress = show_progress
        self.log = log
        self.shard_bytes = shard_bytes
        self.export = export
        self.planner = Planner(pipeline, store)

    def warn(self, message: str) -> None:
        self.log(f"warning: {message}")

    # -- frozen check --------------------------------------------------------
    def _check_frozen(self, lock: dict[str, lockfile.LockEntry], order: list[str], need: set[str]):
        """Fail before running anything if any needed step's key differs from the lock.

        Steps that are not cached are assumed to reproduce the digest the lock
        records, so every key can be computed up front.
        """
        digests: dict[str, str] = {}
        problems = []
        for name in order:
            if name not in need:
                continue
            old = lock.get(name)
            if old is None:
                problems.append(f"step '{name}' is not in the lock file")
                continue
            if any(e.source not in digests for e in self.p.steps[name].inputs):
                problems.append(f"step '{name}': an input is not locked")
                continue
            key = self.planner.key_of(name, digests)
            if key != old.key or self.p.steps[name].op.name != old.op:
                problems.append(f"step '{name}' would change (key {old.key[:12]} -> {key[:12]})")
                continue
            entry = self.store.lookup(key)
            digests[name] = entry.digest if entry else old.digest
            if entry and entry.digest != old.digest:
                problems.append(f"step '{name}': cached output {entry.digest[:12]} differs from "
                                f"the locked {old.digest[:12]}")
        stale = sorted(set(lock) - set(self.p.steps))
        problems += [f"step '{n}' is in the lock file but not in the pipeline" for n in stale]
        if problems:
            raise FrozenMismatch(
                f"--frozen: the lock file {self.p.lock_path.name} would change; nothing was run:\n  "
                + "\n  ".join(problems))

    # -- the run -------------------------------------------------------------
    def run(self) -> Outcome:
        p = self.p
        order = graph.topo_order(p)
        need = graph.needed(p, self.targets)
        lock = lockfile.read(p.lock_path)
        self.planner.preflight(n for n in order if n in need)
        if self.frozen:
            self._check_frozen(lock, order, need)
        last_use = graph.last_consumers(p, order, need)
        digests: dict[str, str] = {}
        names: dict[str, str] = {}
        live: dict[str, Artifact] = {}
        statuses: list[StepStatus] = []
        new_lock = {n: e for n, e in lock.items() if n in p.steps}
        todo = [n for n in order if n in need]
        for index, name in enumerate(order):
            step = p.steps[name]
            if name not in need:
                old = lock.get(name)
                statuses.append(StepStatus(name, step.op.name, "skipped", old.key if old else None,
                                           old.digest if old else None, "not needed by the targets"))
                continue
            key = self.planner.key_of(name, digests)
            entry = None if name in self.force else self.planner.cached(key, self.warn)
            position = f"[{todo.index(name) + 1}/{len(todo)}]"
            if entry is not None:
                status = StepStatus(name, step.op.name, "cached", key, entry.digest)
                self.log(f"{position} {name} ({step.op.name}): cached {entry.digest[:12]}")
            else:
                self.log(f"{position} {name} ({step.op.name}): running")
                with self.store.claim(key):
                    entry = None if name in self.force else self.planner.cached(key, self.warn)
                    if entry is None:
                        entry, seconds = self._execute(name, key, digests, live, names)
                        status = StepStatus(name, step.op.name, "executed", key, entry.digest,
                                            seconds=seconds)
                        self.log(f"{position} {name} ({step.op.name}): done in {seconds:.2f}s "
                                 f"-> {entry.digest[:12]}")
                    else:
                        status = StepStatus(name, step.op.name, "cached", key, entry.digest,
                                            reason="computed by a concurrent run")
            if self.frozen and lock.get(name) and lock[name].digest != entry.digest:
                raise FrozenMismatch(
                    f"--frozen: step '{name}' produced {entry.digest[:12]} but the lock file records "
                    f"{lock[name].digest[:12]}: the step is not reproducible")
            digests[name] = entry.digest
            names.setdefault(entry.digest, name)
            live[name] = Artifact(kind=step.op.output, digest=entry.digest, path=entry.path, step=name)
            new_lock[name] = lockfile.LockEntry(step.op.name, key, entry.digest)
            statuses.append(status)
            # free in-memory artifacts whose last consumer has now run
            for src in [e.source for e in step.inputs]:
                if last_use.get(src) == name and src in live:
                    live.pop(src).release()
        changed = lockfile.write(p.lock_path, p.path.name, new_lock)
        outcome = Outcome(statuses, lock_changed=changed)
        if self.export:
            for name, target in p.outputs.items():
                if name in digests:
                    entry = self.store.lookup(new_lock[name].key)
                    if export_artifact(self.store.object_path(digests[name]), target,
                                       entry.manifest if entry else None):
                        self.log(f"exported {name} -> {target}")
                    outcome.exported[name] = str(target)
        return outcome

    def _execute(self, name: str, key: str, digests: dict[str, str], live: dict[str, Artifact],
                 names: dict[str, str]):
        step = self.p.steps[name]
        inputs: dict = {}
        for edge in step.inputs:
            art = live.get(edge.source)
            if art is None:  # released early or produced by another run: rebuild handle
                src = self.p.steps[edge.source]
                art = Artifact(src.op.output, digests[edge.source],
                               self.store.object_path(digests[edge.source]), edge.source)
            field_name = edge.field[0]
            if len(edge.field) == 1:
                inputs[field_name] = art
            elif len(edge.field) == 2 and isinstance(edge.field[1], int):  # a list of refs
                inputs.setdefault(field_name, {})[edge.field[1]] = art
            else:  # a ref inside a nested param model, keyed by its dotted path
                inputs[".".join(map(str, edge.field))] = art  # e.g. 'metrics.2.delta_norm.base'
        inputs = {k: ([v[i] for i in sorted(v)] if isinstance(v, dict) else v) for k, v in inputs.items()}
        started = time.perf_counter()
        with self.store.staging() as out:
            seed = getattr(step.params, "seed", None)
            dtype = getattr(step.params, "dtype", None)
            ctx = RunContext(step=name, out=out, seed=self.p.seed if seed is None else seed,
                             dtype=dtype or self.p.dtype,
                             pipeline_dir=self.p.base_dir, names=names, shard_bytes=self.shard_bytes,
                             show_progress=self.show_progress, warn=self.warn, log=self.log)
            try:
                meta = step.op.run(inputs, step.params, ctx) or {}
                for w in ctx.writers:
                    w.abort()  # no-op after close(); closes files if the op forgot
                digest = self._digest(out, ctx, step.op.output.value, meta)
            except StepFailed:
                raise
            except WeightflowError as exc:
                raise StepFailed(name, str(exc).removeprefix(f"step '{name}': "), self._where(name)) from exc
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # an op bug or an unexpected input: no traceback
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                tb = traceback.format_exc()
                raise StepFailed(name, f"{detail}\n(internal error; set WEIGHTFLOW_DEBUG=1 for the "
                                 f"traceback)" + (f"\n{tb}" if _debug() else ""), self._where(name)) from exc
            seconds = time.perf_counter() - started
            manifest = {
                "kind": step.op.output.value,
                "op": step.op.name,
                "op_version": step.op.version,
                "step": name,
                "pipeline": str(self.p.path),
                "recipe": self.planner.material_of(name, digests),
                "inputs": {f"{'.'.join(map(str, e.field))}": {"step": e.source, "digest": digests[e.source]}
                           for e in step.inputs},
                "versions": _versions(),
                "seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "info": ctx.info,
            }
            entry = self.store.publish(key, out, digest, manifest)
        return entry, seconds

    def _where(self, name: str) -> str:
        d = self.p.diagnostic(name, "")
        return f"{d.file}:{d.line}:{d.col}"

    @staticmethod
    def _digest(out: Path, ctx: RunContext, kind: str, meta: dict) -> str:
        doc = json.dumps({"kind": kind, **meta}, indent=1, sort_keys=True) + "\n"
        write_atomic(out / META_FILE, doc.encode())
        tensors = []
        written = set()
        for w in ctx.writers:
            tensors.extend(w.digests.values())
            written.update(w.files)
        for f in sorted(out.rglob("*.safetensors")):
            rel = f.relative_to(out).as_posix()
            if rel not in written:
                tensors.extend(digest_safetensors(f))
        return artifact_digest(tensors, side_file_digests(out))


def _debug() -> bool:
    return os.environ.get("WEIGHTFLOW_DEBUG", "") not in ("", "0")


EXPORT_MARKER = "weightflow-export.json"


def export_artifact(obj: Path, target: Path, manifest: dict | None = None) -> bool:
    """Copy an artifact directory to ``target`` atomically (temp sibling, then rename).

    The copy carries ``weightflow-export.json`` (digest and manifest: its lineage).
    Returns False, copying nothing, when ``target`` already holds this digest with
    unchanged files.
    """
    from .store import stat_signature

    target = Path(target)
    marker = target / EXPORT_MARKER
    try:
        old = json.loads(marker.read_text())
        if old.get("digest") == obj.name and old.get("files") == _files_sig(target, stat_signature):
            return False
    except (OSError, ValueError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(obj, tmp)
    doc = {"digest": obj.name, "manifest": manifest or {}}
    doc["files"] = _files_sig(tmp, stat_signature)
    (tmp / EXPORT_MARKER).write_text(json.dumps(doc, indent=1, sort_keys=True))
    if target.exists():
        old = target.with_name(f".{target.name}.old-export")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    return True


def _files_sig(root: Path, stat_signature) -> str:
    """Sizes and mtimes of the exported files, the marker itself left out."""
    return "|".join(part.rsplit(":", 1)[0] for part in stat_signature(root).split("|")
                    if part and not part.startswith(EXPORT_MARKER))
