"""Export: copy a stored artifact to a user's directory without ever losing their data.

A target is written only when it is absent, an empty directory, or a directory holding
weightflow's export marker and exactly the files that marker records (``--force``
replaces an export whose files were changed since).  Dangerous targets (``/``, home,
the pipeline's directory, the store, their ancestors) are always refused.  The copy goes
to a unique temporary sibling and is swapped in under a per-target lock.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from weightflow.dsl.lang.diagnostics import WeightflowError
from weightflow.dsl.store.content import _fsync_dir, _fsync_tree, write_atomic

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
    places: list[tuple[str, Path | None]] = []
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
        _check_parents(path)
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
    digest, files, known_dirs = _read_marker(path, force_flag)
    try:
        changes = _changes(path, files, known_dirs)
    except OSError as exc:
        raise ExportError(f"cannot export to {path}: cannot read it: {exc.strerror or exc}") from None
    if changes and not force:
        _refuse_changed(path, changes, force_flag)
    return ExportTarget(path, "export", digest, changes)


def _check_parents(path: Path) -> None:
    """A missing export target: its nearest existing parent must be a directory."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"cannot export to {path}: {parent} is a file, not a directory")
            break
        if parent.is_symlink():
            raise ExportError(f"cannot export to {path}: {parent} is a broken symbolic link")


def _read_marker(path: Path, force_flag: str) -> tuple[str, dict[str, tuple[int, int]], set[str]]:
    """The (digest, files, dirs) an export's marker records; ExportError if it is unreadable."""
    try:
        record = _marker_record(json.loads((path / EXPORT_MARKER).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        record = None
    if record is None:
        raise ExportError(f"refusing to export to {path}: its {EXPORT_MARKER} is not a marker "
                          "weightflow can read, so what weightflow wrote there is unknown; it is left "
                          f"as it is (not even {force_flag} replaces it): remove it yourself or "
                          "choose another directory")
    return record


def _refuse_changed(path: Path, changes: list[str], force_flag: str) -> NoReturn:
    listed = ", ".join(changes[:_LISTED])
    if len(changes) > _LISTED:
        listed += f" and {len(changes) - _LISTED} more"
    raise ExportError(f"refusing to export to {path}: it was changed since weightflow exported it: "
                      f"{listed}; rerun with {force_flag} to replace it (those changes are lost)")


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
        with suppress(OSError):
            free = shutil.disk_usage(directory).free
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


def export_artifact(obj: Path, target: Path, manifest: dict | None = None, *, store_root=None,
                    pipeline_dir=None, force: bool = False, force_flag: str = "--force") -> bool:
    """Copy an artifact directory to ``target`` atomically (unique temp sibling, then rename).

    ``target`` must pass ``check_export_target``.  The copy carries ``weightflow-export.json``
    (digest, manifest: its lineage, and the size and mtime of every file written, which is how
    a later export knows the directory is still exactly what weightflow wrote).  Writers of
    one target are serialised by a lock in the store; the last one wins.  Returns False,
    copying nothing, when ``target`` already holds this digest with unchanged files.
    """
    from weightflow.dsl.store.content import default_root

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove_dead_leftovers(path: Path) -> None:
    """Temporary siblings of ``path`` left by an export that was killed (SIGKILL, power loss).

    Their names carry the exporting process's pid; only those of dead processes are
    touched.  A previous export moved aside just before the kill is put back when the
    target is missing; partial copies are removed.
    """
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[0-9a-z_]+\.(tmp-export|old-export)$")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in sorted(entries, key=lambda e: e.name.endswith("tmp-export")):  # old-export first
        m = pattern.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink() or _alive(int(m.group(1))):
            continue
        if m.group(2) == "old-export" and not path.exists():
            os.rename(entry, path)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _write_export(obj: Path, path: Path, manifest: dict | None, check: dict) -> None:
    parent = path.parent
    needed = _tree_size(obj)
    _remove_dead_leftovers(path)
    created = [d for d in [parent, *parent.parents] if not d.exists()]
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp-export"))
        _copy_tree(obj, tmp)
        files, dirs = _scan(tmp)
        doc = {"digest": obj.name, "manifest": manifest or {},
               "files": {rel: list(sig) for rel, sig in sorted(files.items())}, "dirs": sorted(dirs)}
        write_atomic(tmp / EXPORT_MARKER, json.dumps(doc, indent=1, sort_keys=True).encode())
        _fsync_tree(tmp)
        now = check_export_target(path, **check)  # changed by someone while we copied?
        if now.state == "export":
            old = parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.old-export"
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
