"""The runner: executes a plan's cache misses, publishing each before moving on.

A failure keeps every finished entry, so the next run resumes; in-memory artifacts are
released after their last consumer; the lock file is written at the end and the
pipeline's ``outputs`` are exported through ``store.export``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from weightflow.dsl.engine.context import META_FILE, Artifact, FieldPath, Inputs, RunContext
from weightflow.dsl.engine.planner import Planner, StepStatus
from weightflow.dsl.format.checkpoint import (
    DEFAULT_SHARD_BYTES,
    TensorDigest,
    artifact_digest,
    digest_safetensors,
    side_file_digests,
)
from weightflow.dsl.lang import graph
from weightflow.dsl.lang.diagnostics import (
    Diagnostic,
    PipelineError,
    StepFailed,
    WeightflowError,
)
from weightflow.dsl.lang.pipeline import Pipeline, Step
from weightflow.dsl.lang.spec import step_dtype, step_seed
from weightflow.dsl.store import lockfile
from weightflow.dsl.store.content import Entry, Store, write_atomic
from weightflow.dsl.store.export import _absolute, disk_full_error, export_step, preflight_export


class FrozenMismatch(WeightflowError):
    exit_code = 1


@dataclass
class Outcome:
    steps: list[StepStatus]
    lock_changed: bool = False
    exported: dict[str, str] = field(default_factory=dict)


@dataclass
class _RunState:
    """What a run accumulates as its steps settle (shared by the backends)."""

    order: list[str]
    need: set[str]
    lock: dict[str, lockfile.LockEntry]
    last_use: dict[str, str]
    new_lock: dict[str, lockfile.LockEntry]
    todo: list[str]
    digests: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    live: dict[str, Artifact] = field(default_factory=dict)
    statuses: dict[str, StepStatus] = field(default_factory=dict)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("weightflow", "torch", "transformers", "tokenizers", "safetensors", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _release_consumed(name: str, step: Step, last_use: dict[str, str], live: dict[str, Artifact]) -> None:
    """Free the in-memory artifacts whose last consumer, step ``name``, has now run."""
    for src in [e.source for e in step.inputs]:
        if last_use.get(src) == name and src in live:
            live.pop(src).release()


class Runner:
    def __init__(self, pipeline: Pipeline, store: Store, *, targets: Iterable[str] = (),
                 force: Iterable[str] = (), frozen: bool = False, show_progress: bool = False,
                 reproducible: str | None = None, allow_platform_drift: bool = False,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 shard_bytes: int = DEFAULT_SHARD_BYTES, export: bool = True,
                 force_export: bool = False, relock: bool = False):
        self.p = pipeline
        self.store = store
        self.targets = list(targets)
        self.force = set(force)
        self.frozen = frozen
        self.mode = reproducible or pipeline.reproducible
        self.allow_platform_drift = allow_platform_drift
        self._torch_configured = False
        self.show_progress = show_progress
        self.log = log
        self.shard_bytes = shard_bytes
        self.export = export
        self.force_export = force_export  # replace outputs changed since weightflow wrote them
        self.relock = relock  # ignore the existing lock file (even an unreadable one), rewrite it
        self.planner = Planner(pipeline, store, mode=self.mode)

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
            unsettled = [e.source for e in self.p.steps[name].inputs if e.source not in digests]
            if unsettled:  # an upstream problem is listed above; say which one this follows from
                src = unsettled[0]
                why = "is not in the lock file" if src not in lock else "would change (see above)"
                problems.append(f"step '{name}' would change too: its input '{src}' {why}")
                continue
            key = self.planner.key_of(name, digests)
            if key != old.key or self.p.steps[name].op.name != old.op:
                problems.append(f"step '{name}' would change (key {old.key[:12]} -> {key[:12]})"
                                + self._what_changed(name, old, digests))
                continue
            entry = self.store.lookup(key)
            digests[name] = entry.digest if entry else old.digest
            if entry and entry.digest != old.digest:
                try:
                    self._digest_differs(name, old, entry.digest, entry.manifest.get("platform"),
                                         lockfile.lock_versions(entry.manifest.get("versions")))
                except FrozenMismatch as exc:
                    problems.append(str(exc).removeprefix("--frozen: "))
        stale = sorted(set(lock) - set(self.p.steps))
        problems += [f"step '{n}' is in the lock file but not in the pipeline" for n in stale]
        if problems:
            raise FrozenMismatch(
                f"--frozen: the lock file {self.p.lock_path.name} would change; nothing was run:\n  "
                + "\n  ".join(problems))

    def _what_changed(self, name: str, old: lockfile.LockEntry, digests: dict[str, str]) -> str:
        """': ' + what differs between the recipe the lock's entry was made from (its
        manifest's ``recipe``) and today's: which parameter, input or file, locked vs now."""
        from weightflow.dsl.engine.recipe_diff import describe_changes

        step = self.p.steps[name]
        if step.op.name != old.op:
            return f": the lock records op '{old.op}', the pipeline names op '{step.op.name}'"
        entry = self.store.lookup(old.key)
        recipe = entry.manifest.get("recipe") if entry else None
        if not isinstance(recipe, dict):
            return (f": the store no longer holds the locked entry {old.key[:12]}, so its recipe cannot be "
                    "compared; a parameter, a data file or an external input changed")
        inputs = {tuple(e.field): e.source for e in step.inputs}
        files = {tuple(path): str(f) for path, f in step.data_files.items()}
        changes = describe_changes(recipe, self.planner.material_of(name, digests), inputs, files)
        return (": " + "; ".join(changes)) if changes else ""

    def _digest_differs(self, name: str, old: lockfile.LockEntry, digest: str, made_on: str | None,
                        versions: dict[str, str] | None = None) -> None:
        """Same recipe, other bytes.  Drift when the environment class or the libraries
        differ (either may legitimately change bytes): an error under ``--frozen`` unless
        ``--allow-platform-drift``.  Same class and libraries: the op is not reproducible."""
        other_platform = bool(old.platform and made_on and old.platform != made_on)
        libs = lockfile.version_changes(old.versions, versions)
        if other_platform or libs:
            causes = []
            if other_platform:
                causes.append(f"another platform ('{made_on}'; the lock's was made on '{old.platform}')")
            if libs:
                causes.append(f"other library versions ({', '.join(libs)})")
            msg = (f"step '{name}' gave {digest[:12]} but the lock records {old.digest[:12]}: same recipe, "
                   + " and ".join(causes))
            if not self.allow_platform_drift:
                raise FrozenMismatch(f"--frozen: {msg}; pass --allow-platform-drift to accept it, or use "
                                     "reproducible: strict for bytes that hold on every CPU")
            self.warn(msg)
            return
        raise FrozenMismatch(f"--frozen: step '{name}' produced {digest[:12]} but the lock file records "
                             f"{old.digest[:12]} on the same platform ({made_on or 'unrecorded'}): the step "
                             "is not reproducible")

    def _say_why_not_reused(self, name: str, key: str, position: str) -> None:
        """Log why a step whose key the store holds runs anyway (another mode's bytes)."""
        held = self.store.lookup(key, touch=False)
        if held is not None and (why := self.planner.not_reusable(name, held)):
            self.log(f"{position} {name} ({self.p.steps[name].op.name}): {why}")

    def _configure_torch(self, device: str) -> None:
        """Before the first op runs: the reproducibility settings (engine/repro.py)."""
        if self._torch_configured:
            return
        from weightflow.dsl.engine import repro

        if "torch" not in sys.modules:
            repro.apply(self.mode)
        try:
            repro.configure_torch(self.mode, device)
        except RuntimeError as exc:
            raise WeightflowError(f"{exc} (the CLI does this for you; in Python call "
                                  "weightflow.dsl.engine.repro.apply(mode) before importing torch)") from None
        self._torch_configured = True

    # -- the run -------------------------------------------------------------
    def run(self) -> Outcome:
        """Plan, run every needed cache miss (:meth:`_run_steps`), write the lock, export."""
        st = self._prepare()
        self._run_steps(st)
        changed = lockfile.write(self.p.lock_path, self.p.path.name, st.new_lock)
        outcome = Outcome([st.statuses[n] for n in st.order if n in st.statuses], lock_changed=changed)
        if self.export:
            self._export_outputs(st.digests, st.new_lock, outcome)
        return outcome

    def _prepare(self) -> _RunState:
        """The checks made before any step runs (preflight, outputs, --frozen) and the run's state."""
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
        st = _RunState(order=order, need=need, lock=lock, last_use=graph.last_consumers(p, order, need),
                       new_lock={n: e for n, e in lock.items() if n in p.steps},
                       todo=[n for n in order if n in need])
        for name in order:
            if name not in need:
                old = lock.get(name)
                st.statuses[name] = StepStatus(name, p.steps[name].op.name, "skipped", old.key if old else None,
                                               old.digest if old else None, "not needed by the targets")
        return st

    def _run_steps(self, st: _RunState) -> None:
        """The in-process backend: each needed step in topological order, one at a time."""
        for name in st.todo:
            key, entry, position = self._lookup_step(name, st)
            op = self.p.steps[name].op.name
            if entry is not None:
                status = StepStatus(name, op, "cached", key, entry.digest)
            else:
                self.log(f"{position} {name} ({op}): running")
                entry, status = self.execute_step(name, key, st.digests, st.live, st.names)
                if status.status == "executed":
                    self.log(f"{position} {name} ({op}): done in {status.seconds:.2f}s -> {entry.digest[:12]}")
            self._settle(name, key, entry, status, st)

    def _lookup_step(self, name: str, st: _RunState) -> tuple[str, Entry | None, str]:
        """Step ``name``'s key (its inputs are settled), the cache entry serving it or None
        (a miss, or ``--force``), and its ``[i/n]`` position for progress lines."""
        step = self.p.steps[name]
        key = self.planner.key_of(name, st.digests)
        entry = None if name in self.force else self.planner.cached(key, self.warn, name)
        position = f"[{st.todo.index(name) + 1}/{len(st.todo)}]"
        if entry is None and name not in self.force:
            self._say_why_not_reused(name, key, position)
        if entry is not None:
            self.log(f"{position} {name} ({step.op.name}): cached {entry.digest[:12]}")
        return key, entry, position

    def execute_step(self, name: str, key: str, digests: dict[str, str], live: dict[str, Artifact],
                     names: dict[str, str]) -> tuple[Entry, StepStatus]:
        """Run one cache miss under the key's claim and publish it; shared by the in-process
        loop and the Ray workers (dsl/engine/ray_backend.py), so both run an op alike.
        ``digests`` holds (at least) the step's inputs' digests."""
        op = self.p.steps[name].op.name
        with self.store.claim(key):
            entry = None if name in self.force else self.planner.cached(key, self.warn, name)
            if entry is not None:
                return entry, StepStatus(name, op, "cached", key, entry.digest,
                                         reason="computed by a concurrent run")
            entry, seconds = self._execute(name, key, digests, live, names)
            return entry, StepStatus(name, op, "executed", key, entry.digest, seconds=seconds)

    def _settle(self, name: str, key: str, entry: Entry, status: StepStatus, st: _RunState) -> None:
        """Record a finished (run or cached) step: --frozen's digest check, its lock entry,
        its digest for the steps downstream, and release inputs no later step reads."""
        step = self.p.steps[name]
        lock = st.lock
        made_on = entry.manifest.get("platform") or (lock[name].platform if name in lock else None)
        versions = lockfile.lock_versions(entry.manifest.get("versions"))
        if self.frozen and lock.get(name) and lock[name].digest != entry.digest:
            self._digest_differs(name, lock[name], entry.digest, made_on, versions)
        st.digests[name] = entry.digest
        st.names.setdefault(entry.digest, name)
        st.live[name] = Artifact(kind=step.output, digest=entry.digest, path=entry.path, step=name)
        st.new_lock[name] = _lock_entry(lock.get(name), lockfile.LockEntry(step.op.name, key, entry.digest,
                                                                           made_on, versions))
        st.statuses[name] = status
        _release_consumed(name, step, st.last_use, st.live)

    def _export_outputs(self, digests: dict[str, str], new_lock: dict[str, lockfile.LockEntry],
                        outcome: Outcome) -> None:
        """Export the pipeline's ``outputs`` that this run produced or found cached."""
        p = self.p
        for name, target in p.outputs.items():
            if name in digests:
                entry = self.store.lookup(new_lock[name].key)
                try:
                    # the default format and the model card, as `weightflow export` writes them
                    wrote = export_step(p, self.store, name, self.store.object_path(digests[name]),
                                        entry.manifest if entry else None, target,
                                        force=self.force_export, force_flag="--force-export", warn=self.warn)
                except WeightflowError as exc:
                    raise PipelineError([self._output_diagnostic(name, str(exc))]) from None
                if wrote:
                    self.log(f"exported {name} -> {target}")
                outcome.exported[name] = str(target)

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

    def _inputs_of(self, step: Step, digests: dict[str, str], live: dict[str, Artifact]) -> Inputs:
        refs: dict[FieldPath, Artifact] = {}
        for edge in step.inputs:
            art = live.get(edge.source)
            if art is None:  # released early or produced by another run: rebuild handle
                src = self.p.steps[edge.source]
                art = Artifact(src.output, digests[edge.source],
                               self.store.object_path(digests[edge.source]), edge.source)
            refs[tuple(edge.field)] = art  # by field path, e.g. ('metrics', 2, 'delta_norm', 'base')
        return Inputs(refs)

    def _verify_inputs(self, name: str, step: Step, digests: dict[str, str]) -> None:
        for source in dict.fromkeys(e.source for e in step.inputs):
            digest = digests[source]
            if not self.store.verify_object(digest, deep=True):
                self.store.discard_object(digest)
                raise StepFailed(name, f"its input '{source}' (object {digest[:12]}) is "
                                 "corrupted: its content no longer matches its digest; it was "
                                 "discarded, rerun to recompute it", self._where(name))

    def _execute(self, name: str, key: str, digests: dict[str, str], live: dict[str, Artifact],
                 names: dict[str, str]):
        step = self.p.steps[name]
        for e in step.inputs:  # with a remote: download this step's inputs now, and only them
            try:
                self.store.object_path(digests[e.source])
            except WeightflowError as exc:
                raise StepFailed(name, f"its input '{e.source}': {exc}", self._where(name)) from None
        inputs = self._inputs_of(step, digests, live)
        if self.planner.deep:  # verify: always -- re-hash every input right before the op reads it
            self._verify_inputs(name, step, digests)
        device = str(getattr(step.params, "device", None) or "cpu")
        self._configure_torch(device)
        started = time.perf_counter()
        with self.store.staging() as out:
            # a step's own seed/dtype only where its params declare them (SeedParam, DtypeParam)
            ctx = RunContext(step=name, out=out, seed=step_seed(step.params, self.p.seed),
                             dtype=step_dtype(step.params, self.p.dtype),
                             pipeline_dir=self.p.base_dir, names=names, shard_bytes=self.shard_bytes,
                             show_progress=self.show_progress, warn=self.warn, log=self.log,
                             store=self.store, platform=_platform(self.mode, device), fresh=name in self.force)
            try:
                meta = step.op.run(inputs, step.params, ctx) or {}
                for w in ctx.writers:
                    w.abort()  # no-op after close(); closes files if the op forgot
                digest = self._digest(out, ctx, step.output.value, meta)
            except StepFailed:
                raise
            except WeightflowError as exc:
                raise StepFailed(name, str(exc).removeprefix(f"step '{name}': "), self._where(name)) from exc
            except KeyboardInterrupt:
                raise
            except OSError as exc:
                if exc.errno not in DISK_FULL:
                    raise StepFailed(name, _internal(exc), self._where(name)) from exc
                written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                raise disk_full_error(exc, None, None, f"step '{name}' ({written:,} bytes written before the "
                                      "disk filled)", fallback=self.store.root) from None
            except Exception as exc:  # an op bug or an unexpected input: no traceback
                raise StepFailed(name, _internal(exc), self._where(name)) from exc
            seconds = time.perf_counter() - started
            manifest = {
                "kind": step.output.value,
                "op": step.op.name,
                "op_version": step.op.version,
                "step": name,
                "pipeline": str(self.p.path),
                "recipe": self.planner.material_of(name, digests),
                "inputs": {f"{'.'.join(map(str, e.field))}": {"step": e.source, "digest": digests[e.source]}
                           for e in step.inputs},
                "versions": _versions(),
                "reproducible": self.mode,
                "platform": _platform(self.mode, device),
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
        tensors: list[TensorDigest] = []
        written: set[str] = set()
        for w in ctx.writers:
            tensors.extend(w.digests.values())
            written.update(w.files)
        for f in sorted(out.rglob("*.safetensors")):
            rel = f.relative_to(out).as_posix()
            if rel not in written:
                tensors.extend(digest_safetensors(f))
        return artifact_digest(tensors, side_file_digests(out))


def _lock_entry(old: lockfile.LockEntry | None, new: lockfile.LockEntry) -> lockfile.LockEntry:
    """The lock entry to write: the locked one when this run reproduced its op, key and digest
    and it records where and with what it was made (still true: those bytes came from
    there), so a fresh clone on another machine or with newer libraries that reproduces the
    digests leaves the committed lock file unchanged; else the new one."""
    if old is None or (old.op, old.key, old.digest) != (new.op, new.key, new.digest):
        return new
    if not (old.platform and old.versions):
        return new  # a lock written before these were recorded: fill them in
    if new.platform == lockfile.STRICT_PLATFORM and old.platform != lockfile.STRICT_PLATFORM:
        return new  # reproduced in strict mode: the stronger statement
    return old


def _platform(mode: str, device: str) -> str:
    from weightflow.dsl.engine import repro

    return repro.platform_class(mode, device)


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _internal(exc: BaseException) -> str:
    """An unexpected exception as one line, and the traceback only when asked for."""
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    tail = f"\n{traceback.format_exc()}" if _debug() else ""
    return f"{detail}\n(internal error; set WEIGHTFLOW_DEBUG=1 for the traceback){tail}"


def _debug() -> bool:
    return os.environ.get("WEIGHTFLOW_DEBUG", "") not in ("", "0")
