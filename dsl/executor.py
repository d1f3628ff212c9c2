"""Plan and run a pipeline against the store.

``plan`` walks the DAG in topological order: a cached step yields the output digest
that the next key needs; after the first miss, dependants are ``pending`` with the
reason.  ``run`` does the same walk and executes each miss, publishing it before
moving on, so a failure keeps every finished entry and the next run resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from . import graph, lockfile
from .artifact import META_FILE, Artifact, RunContext
from .checkpoint import artifact_digest, digest_safetensors, side_file_digests
from .diagnostics import Diagnostic, OpError, PipelineError, StepFailed, WeightflowError
from .keys import key_material, step_key
from .pipeline import Pipeline
from .store import Entry, Store, verify_always_env, write_atomic

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
            self.env.file_digest = lambda path: store.file_digest(Path(path), deep=True)

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
                 shard_bytes: int = DEFAULT_SHARD_BYTES, export: bool = True,
                 force_export: bool = False, relock: bool = False):
        self.p = pipeline
        self.store = store
        self.targets = list(targets)
        self.force = set(force)
        self.frozen = frozen
        self.show_progress = show_progress
        self.log = log
        self.shard_bytes = shard_bytes
        self.export = export
        self.force_export = force_export  # replace outputs changed since weightflow wrote them
        self.relock = relock  # ignore the existing lock file (even an unreadable one), rewrite it
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
        if self.relock and self.frozen:
            raise WeightflowError("--relock rewrites the lock file and --frozen refuses to change it: "
                                  "use one or the other")
        lock = {} if self.relock else lockfile.read(p.lock_path)
        self.store.clean_stale_staging()  # leftovers of runs killed mid-step (live runs' stay)
        try:
            self.planner.preflight(n for n in order if n in need)
            problems = []
        except PipelineError as exc:
            problems = list(exc.diagnostics)
        problems += self._preflight_outputs(need)  # a bad output path fails before any step runs
        if problems:
            raise PipelineError(problems)
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
                    try:
                        wrote = export_artifact(self.store.object_path(digests[name]), target,
                                                entry.manifest if entry else None,
                                                store_root=self.store.root, pipeline_dir=p.base_dir,
                                                force=self.force_export, force_flag="--force-export")
                    except WeightflowError as exc:
                        raise PipelineError([self._output_diagnostic(name, str(exc))]) from None
                    if wrote:
                        self.log(f"exported {name} -> {target}")
                    outcome.exported[name] = str(target)
        return outcome

    def _output_diagnostic(self, name: str, message: str) -> Diagnostic:
        m = self.p.positions.value(("outputs", name))
        return Diagnostic(self.p.display or str(self.p.path), m.line, m.col, message, name)

    def _preflight_outputs(self, need: set[str]) -> list[Diagnostic]:
        """Check every output directory this run would write before any step runs."""
        if not self.export:
            return []
        problems = []
        seen: dict[str, Path] = {}
        for name, target in self.p.outputs.items():
            if name not in need:
                continue
            try:
                preflight_export(target, store_root=self.store.root, pipeline_dir=self.p.base_dir,
                                 force=self.force_export, force_flag="--force-export")
            except WeightflowError as exc:
                problems.append(self._output_diagnostic(name, str(exc)))
                continue
            real = _absolute(target).resolve()
            for other, there in seen.items():
                if real == there or there in real.parents or real in there.parents:
                    how = "is also" if real == there else "overlaps"
                    problems.append(self._output_diagnostic(
                        name, f"output directory {real} {how} the output directory of '{other}' "
                        f"({there}); give each output a directory of its own"))
            seen[name] = real
        return problems

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
        if self.planner.deep:  # verify: always -- re-hash every input right before the op reads it
            for source in dict.fromkeys(e.source for e in step.inputs):
                digest = digests[source]
                if not self.store.verify_object(digest, deep=True):
                    self.store.discard_object(digest)
                    raise StepFailed(name, f"its input '{source}' (object {digest[:12]}) is "
                                     "corrupted: its content no longer matches its digest; it was "
                                     "discarded, rerun to recompute it", self._where(name))
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
_LISTED = 12  # changed files named in an error, at most


class ExportError(WeightflowError):
    """An export target weightflow must not, or cannot, write."""


@dataclass
class ExportTarget:
    """What is at an export target now: ``absent``, ``empty`` or a weightflow ``export``."""

    path: Path
    state: str
    digest: str | None = None
    changes: list[str] = field(default_factory=list)


def _absolute(target) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(target))))


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError, OSError):
        return None


def _refusal(path: Path, store_root: Path, pipeline_dir: Path | None) -> str | None:
    """Why ``path`` can never be an export directory (None when it may be one)."""
    real = path.resolve()
    store = Path(store_root).resolve()
    home = _home()
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if real == Path(real.anchor):
        return "it is the filesystem root"
    if home is not None and real == home:
        return "it is your home directory"
    if real == store:
        return "it is weightflow's store"
    if store in real.parents:
        return f"it is inside weightflow's store ({store})"
    places = []
    if pipeline_dir is not None:
        pdir = Path(pipeline_dir).resolve()
        if real == pdir:
            return "it is the pipeline's own directory"
        places.append(("the pipeline's directory", pdir))
    if cwd is not None and real == cwd:
        return "it is the current directory"
    places += [("weightflow's store", store), ("your home directory", home), ("the current directory", cwd)]
    for what, place in places:
        if place is not None and real in place.parents:
            return f"it contains {what} ({place})"
    return None


def _scan(root: Path) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """(size, mtime_ns) of every file (links included, not followed) and every directory
    under ``root``, by relative POSIX path; the top-level marker is left out."""
    files: dict[str, tuple[int, int]] = {}
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                filenames.append(d)
            else:
                dirs.add((rel_dir / d).as_posix())
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            if rel == EXPORT_MARKER:
                continue
            st = os.lstat(os.path.join(dirpath, f))
            files[rel] = (st.st_size, st.st_mtime_ns)
    return files, dirs


def _marker_record(doc) -> tuple[str, dict[str, tuple[int, int]], set[str]] | None:
    """(digest, files, dirs) from a marker document, or None if it is not one."""
    if not isinstance(doc, dict) or not isinstance(doc.get("digest"), str):
        return None
    raw = doc.get("files")
    files: dict[str, tuple[int, int]] = {}
    try:
        if isinstance(raw, dict):
            for rel, sig in raw.items():
                size, mtime = sig
                files[str(rel)] = (int(size), int(mtime))
        elif isinstance(raw, str):  # markers of weightflow <= 0.x: "rel:size:mtime|..."
            for part in filter(None, raw.split("|")):
                rel, size, mtime = part.rsplit(":", 2)
                files[rel] = (int(size), int(mtime))
        else:
            return None
    except (TypeError, ValueError):
        return None
    dirs = doc.get("dirs")
    known = {str(d) for d in dirs} if isinstance(dirs, list) else set()
    for rel in files:
        known.update(p.as_posix() for p in Path(rel).parents if p.as_posix() != ".")
    return doc["digest"], files, known


def _changes(path: Path, recorded: dict[str, tuple[int, int]], known_dirs: set[str]) -> list[str]:
    files, dirs = _scan(path)
    out = []
    for rel in sorted(set(files) | set(recorded)):
        if rel not in recorded:
            out.append(f"{rel} (added)")
        elif rel not in files:
            out.append(f"{rel} (removed)")
        elif files[rel] != recorded[rel]:
            out.append(f"{rel} (modified)")
    out += [f"{d}/ (added)" for d in sorted(dirs - known_dirs)]
    return out


def check_export_target(target, *, store_root, pipeline_dir=None, force: bool = False,
                        force_flag: str = "--force") -> ExportTarget:
    """Raise ExportError unless weightflow may write an export to ``target``.

    Allowed: a missing path (under a directory), an empty directory, or a directory holding
    weightflow's marker and exactly the files it records, unchanged (changed ones only with
    ``force``).  Never: a file, a link, a directory weightflow did not write, ``/``, the home
    directory, the pipeline's or the current directory, the store, or anything containing them.
    """
    path = _absolute(target)
    why = _refusal(path, Path(store_root), pipeline_dir)
    if why:
        raise ExportError(f"refusing to export to {path}: {why}; give the export a new or empty "
                          "directory of its own")
    if path.is_symlink():
        raise ExportError(f"refusing to export to {path}: it is a symbolic link (to "
                          f"{os.readlink(path)}); weightflow does not replace links: export to the "
                          "directory it points to instead")
    try:
        is_dir = path.is_dir()
        exists = path.exists()
    except OSError as exc:
        raise ExportError(f"cannot export to {path}: {exc.strerror or exc}") from None
    if not exists:
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ExportError(f"cannot export to {path}: {parent} is a file, not a directory")
                break
            if parent.is_symlink():
                raise ExportError(f"cannot export to {path}: {parent} is a broken symbolic link")
        return ExportTarget(path, "absent")
    if not is_dir:
        raise ExportError(f"refusing to export to {path}: it is a file, not a directory; weightflow "
                          f"never overwrites a file (not even with {force_flag})")
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise ExportError(f"cannot export to {path}: cannot list it: {exc.strerror or exc}") from None
    if not entries:
        return ExportTarget(path, "empty")
    if EXPORT_MARKER not in entries:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(f"refusing to export to {path}: the directory is not empty ({shown}) and "
                          f"has no {EXPORT_MARKER}, so weightflow did not write it; weightflow never "
                          f"replaces such a directory (not even with {force_flag}): choose a new or "
                          "empty directory, or empty this one yourself")
    try:
        record = _marker_record(json.loads((path / EXPORT_MARKER).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        record = None
    if record is None:
        raise ExportError(f"refusing to export to {path}: its {EXPORT_MARKER} is not a marker "
                          "weightflow can read, so what weightflow wrote there is unknown; it is left "
                          f"as it is (not even {force_flag} replaces it): remove it yourself or "
                          "choose another directory")
    digest, files, known_dirs = record
    try:
        changes = _changes(path, files, known_dirs)
    except OSError as exc:
        raise ExportError(f"cannot export to {path}: cannot read it: {exc.strerror or exc}") from None
    if changes and not force:
        listed = ", ".join(changes[:_LISTED])
        if len(changes) > _LISTED:
            listed += f" and {len(changes) - _LISTED} more"
        raise ExportError(f"refusing to export to {path}: it was changed since weightflow exported it: "
                          f"{listed}; rerun with {force_flag} to replace it (those changes are lost)")
    return ExportTarget(path, "export", digest, changes)


@contextmanager
def _export_lock(store_root: Path, path: Path):
    """One writer at a time per target; the lock lives in the store, not beside the target."""
    from filelock import FileLock

    lock_dir = Path(store_root) / "locks"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the lock directory {lock_dir}: {exc.strerror or exc}") from None
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    with FileLock(str(lock_dir / f"export-{name}.lock")):
        yield


def preflight_export(target, *, store_root, pipeline_dir=None, force: bool = False,
                     force_flag: str = "--force") -> ExportTarget:
    """``check_export_target`` under the target's lock (a concurrent export is not half seen)."""
    path = _absolute(target)
    why = _refusal(path, Path(store_root), pipeline_dir)
    if why:  # refused before anything is created in the store
        return check_export_target(path, store_root=store_root, pipeline_dir=pipeline_dir)
    with _export_lock(store_root, path):
        return check_export_target(path, store_root=store_root, pipeline_dir=pipeline_dir, force=force,
                                   force_flag=force_flag)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_full_error(exc: OSError, directory=None, needed: int | None = None, what: str = "",
                    fallback=None) -> WeightflowError:
    """A clear error for ENOSPC/EDQUOT: the directory that is full, needed vs free."""
    if directory is None and exc.filename:
        f = Path(os.fsdecode(exc.filename))
        directory = f if f.is_dir() else f.parent
    directory = directory if directory is not None else fallback
    reason = "disk quota exceeded" if exc.errno == getattr(errno, "EDQUOT", None) else "no space left on device"
    msg = reason
    free = None
    if directory is not None:
        directory = _existing(Path(directory))
        msg += f" in {directory}"
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            pass
    if what:
        msg += f" while writing {what}"
    sizes = ([f"it needs {_size(needed)}"] if needed is not None else []) + \
            ([f"{_size(free)} free"] if free is not None else [])
    if sizes:
        msg += ": " + ", ".join(sizes)
    return WeightflowError(msg + "; free some space and rerun")


def _tree_size(root: Path) -> int:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` into the existing ``dst``; the first OSError (a full disk) propagates as is
    (``shutil.copytree`` would collect them into one ``shutil.Error`` without the errno)."""
    made = []
    for dirpath, _, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = str(dst) if rel == "." else os.path.join(dst, rel)
        os.makedirs(out, exist_ok=True)
        made.append((dirpath, out))
        for f in filenames:
            shutil.copy2(os.path.join(dirpath, f), os.path.join(out, f))
    for dirpath, out in reversed(made):
        shutil.copystat(dirpath, out)


def _fsync_files(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def export_artifact(obj: Path, target: Path, manifest: dict | None = None, *, store_root=None,
                    pipeline_dir=None, force: bool = False, force_flag: str = "--force") -> bool:
    """Copy an artifact directory to ``target`` atomically (unique temp sibling, then rename).

    ``target`` must pass ``check_export_target``.  The copy carries ``weightflow-export.json``
    (digest, manifest: its lineage, and the size and mtime of every file written, which is how
    a later export knows the directory is still exactly what weightflow wrote).  Writers of
    one target are serialised by a lock in the store; the last one wins.  Returns False,
    copying nothing, when ``target`` already holds this digest with unchanged files.
    """
    from .store import default_root

    obj = Path(obj)
    root = Path(store_root) if store_root is not None else default_root()
    path = _absolute(target)
    check = {"store_root": root, "pipeline_dir": pipeline_dir, "force": force, "force_flag": force_flag}
    if _refusal(path, root, pipeline_dir):
        check_export_target(path, **check)  # raises
    with _export_lock(root, path):
        state = check_export_target(path, **check)
        if state.state == "export" and state.digest == obj.name and not state.changes:
            return False
        _write_export(obj, path, manifest, check)
    return True


def _write_export(obj: Path, path: Path, manifest: dict | None, check: dict) -> None:
    parent = path.parent
    needed = _tree_size(obj)
    created = [d for d in [parent, *parent.parents] if not d.exists()]
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp-export"))
        _copy_tree(obj, tmp)
        files, dirs = _scan(tmp)
        doc = {"digest": obj.name, "manifest": manifest or {},
               "files": {rel: list(sig) for rel, sig in sorted(files.items())}, "dirs": sorted(dirs)}
        write_atomic(tmp / EXPORT_MARKER, json.dumps(doc, indent=1, sort_keys=True).encode())
        _fsync_files(tmp)
        now = check_export_target(path, **check)  # changed by someone while we copied?
        if now.state == "export":
            old = parent / f".{path.name}.{uuid.uuid4().hex[:12]}.old-export"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            tmp = None
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)  # onto an empty directory too: rename replaces it atomically
            tmp = None
        _fsync_dir(parent)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # directories made for this export, deepest first
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise disk_full_error(exc, parent, needed, f"the export to {path}") from None
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ExportError(f"refusing to export to {path}: something else wrote it while "
                                  "weightflow was copying; nothing was replaced") from None
            where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
            raise ExportError(f"cannot export to {path}: {exc.strerror or exc}{where}") from None
        raise
