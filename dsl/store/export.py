"""Export: copy a stored artifact to a user's directory without ever losing their data.

A target is written only when it is absent, an empty directory, or a directory holding
weightflow's export marker and exactly the files that marker records (``--force``
replaces an export whose files were changed since).  Dangerous targets (``/``, home,
the pipeline's directory, the store, their ancestors) are always refused.  The copy goes
to a unique temporary sibling and is swapped in under a per-target lock.

``export_step`` is what ``weightflow export`` and a pipeline's ``outputs:`` call: it
writes the stored object in a *format* other tools read (``dense``: plain safetensors
with the model's tensor names, the default; ``bitmask``: a Delta in the store's compact
mask + values encoding; ``peft``: a LoRA-trained model as a PEFT adapter directory) and
adds the model card ``README.md`` (``weightflow.dsl.present.modelcard``).  The marker
records the format and the card's hash, so a re-export is "up to date" only when it
would write the very same files.
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
import warnings
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

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
    layout: str | None = None  # the format the marker records (None: an older marker)
    generated: dict[str, str] = field(default_factory=dict)  # generated file -> sha256 (the card)


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
    layout, generated = _marker_extras(path)
    return ExportTarget(path, "export", digest, changes, layout, generated)


def _marker_extras(path: Path) -> tuple[str | None, dict[str, str]]:
    """The format and generated-file hashes a (readable) marker records; none in old markers."""
    try:
        doc = json.loads((path / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}
    layout = doc.get("format") if isinstance(doc.get("format"), str) else None
    raw = doc.get("generated")
    generated = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return layout, generated


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


Build = Callable[[Path, Path], None]  # (stored object, empty directory to fill)


@dataclass
class Layout:
    """How an export writes a stored object: its format's name, the builder that fills the
    export directory from the object (None: a plain copy) and generated files (the card)."""

    name: str | None = None
    build: Build | None = None
    generated: dict[str, bytes] = field(default_factory=dict)

    def hashes(self) -> dict[str, str]:
        return {n: hashlib.sha256(b).hexdigest() for n, b in sorted(self.generated.items())}


def export_artifact(obj: Path, target: Path, manifest: dict | None = None, *, store_root=None,
                    pipeline_dir=None, force: bool = False, force_flag: str = "--force",
                    layout: Layout | None = None) -> bool:
    """Copy an artifact directory to ``target`` atomically (unique temp sibling, then rename).

    ``target`` must pass ``check_export_target``.  The copy carries ``weightflow-export.json``
    (digest, manifest: its lineage, the format, and the size and mtime of every file written,
    generated ones included, which is how a later export knows the directory is still exactly
    what weightflow wrote).  ``layout`` says how to write the object (default: copy it as
    stored).  Writers of one target are serialised by a lock in the store; the last one
    wins.  Returns False, writing nothing, when ``target`` already holds this digest in this
    format with the same generated files, unchanged.
    """
    from weightflow.dsl.store.content import default_root

    obj = Path(obj)
    layout = layout or Layout()
    root = Path(store_root) if store_root is not None else default_root()
    path = _absolute(target)
    check = {"store_root": root, "pipeline_dir": pipeline_dir, "force": force, "force_flag": force_flag}
    if _refusal(path, root, pipeline_dir):
        check_export_target(path, **check)  # raises
    with _export_lock(root, path):
        state = check_export_target(path, **check)
        if state.state == "export" and state.digest == obj.name and not state.changes \
                and state.layout == layout.name and state.generated == layout.hashes():
            return False
        _write_export(obj, path, manifest, check, layout)
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


def _fill(obj: Path, tmp: Path, manifest: dict | None, layout: Layout) -> dict[str, Any]:
    """Write the export's files into ``tmp``; the marker document that lists them."""
    (layout.build or _copy_tree)(obj, tmp)
    for name, data in layout.generated.items():
        (tmp / name).unlink(missing_ok=True)  # the object's own copy (a source's card) is replaced
        (tmp / name).write_bytes(data)
    files, dirs = _scan(tmp)
    doc: dict[str, Any] = {"digest": obj.name, "manifest": manifest or {},
                           "files": {rel: list(sig) for rel, sig in sorted(files.items())}, "dirs": sorted(dirs)}
    if layout.name is not None:
        doc["format"] = layout.name
    if layout.generated:
        doc["generated"] = layout.hashes()
    return doc


def _write_export(obj: Path, path: Path, manifest: dict | None, check: dict, layout: Layout) -> None:
    parent = path.parent
    needed = _tree_size(obj)
    _remove_dead_leftovers(path)
    created = [d for d in [parent, *parent.parents] if not d.exists()]
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp-export"))
        doc = _fill(obj, tmp, manifest, layout)
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


# -- formats ----------------------------------------------------------------------------

FORMATS = ("dense", "bitmask", "peft")
DEFAULT_FORMAT = "dense"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _lora_of(manifest: dict | None) -> dict | None:
    """The ``lora:`` settings a training step's recipe recorded, or None."""
    params = ((manifest or {}).get("recipe") or {}).get("params")
    lora = params.get("lora") if isinstance(params, dict) else None
    return lora if isinstance(lora, dict) else None


def resolve_format(step: str, manifest: dict | None, fmt: str | None, flag: str = "--format") -> str:
    """The format an export of ``step`` is written in; ExportError for one that does not fit
    what the step made (checked before anything is read or written)."""
    kind = (manifest or {}).get("kind")
    op = (manifest or {}).get("op")
    fmt = fmt or DEFAULT_FORMAT
    if fmt not in FORMATS:
        raise ExportError(f"{flag} {fmt}: unknown format; formats: {', '.join(FORMATS)}")
    what = f"step '{step}' (op '{op}') produces a {kind}"
    if fmt == "bitmask" and kind != "Delta":
        raise ExportError(f"{flag} bitmask is the compact encoding of a Delta, but {what}: models are "
                          f"stored dense; export it with {flag} dense")
    if fmt == "peft":
        if kind == "Delta" and op == "extract-lora":
            return fmt  # LoRA factors: the adapter is the delta itself
        if kind != "Model":
            raise ExportError(f"{flag} peft writes a LoRA adapter of a trained model, but {what}")
        if _lora_of(manifest) is None:
            raise ExportError(f"{flag} peft needs a model trained with LoRA, but step '{step}' (op '{op}') "
                              "was not (give the training step a 'lora:' key); export it with "
                              f"{flag} dense")
    return fmt


def _dense_tensors(src: Path, out: Path) -> None:
    """``src`` (a safetensors file, possibly with sparse mask + values tensors) as ``out``
    with every tensor dense under its own name, in the order stored."""
    from weightflow.dsl.format.checkpoint import ShardedWriter, TensorInfo, read_header
    from weightflow.dsl.format.dtypes import ITEMSIZE
    from weightflow.dsl.format.lowrank import LOWRANK_META, lowrank_tensors
    from weightflow.dsl.format.quantized import QUANT_META, quantized_tensors
    from weightflow.dsl.format.sparse import _CHUNK, SPARSE_META, SparseReader, sparse_tensors

    header, start = read_header(src)
    sparse = sparse_tensors(header, start, src)
    encoded: dict[str, Any] = {**lowrank_tensors(header, start, src), **quantized_tensors(header, start, src)}
    owner = {name + sfx: name for name in sparse for sfx in ("::mask", "::values")}
    owner.update({part: name for name, t in encoded.items() for part in t.parts})
    stored = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    plan: list[TensorInfo] = []
    for k in dict.fromkeys(owner.get(k, k) for k in stored):
        t = sparse.get(k) or encoded.get(k)
        plan.append(TensorInfo(k, t.dtype, tuple(t.shape)) if t else
                    TensorInfo(k, header[k]["dtype"], tuple(header[k]["shape"])))
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items()
            if k not in (SPARSE_META, LOWRANK_META, QUANT_META, "format")}
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out.parent, plan, prefix=out.name.removesuffix(".safetensors"),
                           max_shard_bytes=1 << 62, metadata=meta)
    fd = os.open(src, os.O_RDONLY)
    try:
        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        for info in plan:
            if info.nbytes == 0:
                writer.append(info.name, b"")
            elif info.name in sparse or info.name in encoded:
                reader = encoded.get(info.name) or SparseReader(sparse[info.name])
                numel = info.nbytes // ITEMSIZE[info.dtype]
                for s in range(0, numel, _CHUNK):
                    writer.append(info.name, reader.dense(read, s, min(numel, s + _CHUNK)))
            else:
                a, b = header[info.name]["data_offsets"]
                for pos in range(a, b, 1 << 24):
                    writer.append(info.name, read(start + pos, min(b, pos + (1 << 24)) - pos))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        os.close(fd)


def _write_dense(obj: Path, dst: Path) -> None:
    """The object with its sparse (mask + values) tensors written dense: a copy, then each
    file that holds a sparse tensor rewritten, and the shard index renamed to match."""
    from weightflow.dsl.format.checkpoint import INDEX_SUFFIX, read_header

    _copy_tree(obj, dst)
    for f in sorted(obj.rglob("*.safetensors")):
        header, _ = read_header(f)
        if not _encoding_keys() & set(header.get("__metadata__") or {}):
            continue
        out = dst / f.relative_to(obj)
        part = out.with_name(f".{out.name}.dense")
        _dense_tensors(f, part / out.name)
        os.replace(part / out.name, out)
        part.rmdir()
    for index in sorted(dst.rglob(f"*{INDEX_SUFFIX}")):
        doc = json.loads(index.read_text(encoding="utf-8"))
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if isinstance(wmap, dict):
            doc["weight_map"] = dict(sorted({k.split("::")[0]: v for k, v in wmap.items()}.items()))
            doc.setdefault("metadata", {})["total_size"] = sum(
                (index.parent / f).stat().st_size for f in set(doc["weight_map"].values()))
            index.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def _encoding_keys() -> set[str]:
    """The ``__metadata__`` keys of the stored encodings a dense export expands: sparse
    mask + values, LoRA factors, quantized codes."""
    from weightflow.dsl.format.lowrank import LOWRANK_META
    from weightflow.dsl.format.quantized import QUANT_META
    from weightflow.dsl.format.sparse import SPARSE_META

    return {SPARSE_META, LOWRANK_META, QUANT_META}


def _has_sparse(obj: Path) -> bool:
    """Whether the object stores any tensor encoded (sparse, low-rank, quantized)."""
    from weightflow.dsl.format.checkpoint import read_header

    return any(_encoding_keys() & set(read_header(f)[0].get("__metadata__") or {}) for f in obj.rglob("*.safetensors"))


def _finish_adapter_config(path: Path, base_model: str | None) -> None:
    """peft's adapter_config.json pointing at the hub base (None: a base that is not on the
    hub, as weightflow's stored adapters have it), with set-like lists sorted (stable bytes)."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_model
    for key in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_peft(obj: Path, dst: Path, *, store, manifest: dict, base_model: str | None,
                log: Callable[[str], None]) -> None:
    """A PEFT adapter directory for a LoRA-trained model: the adapter the step stored
    (``lora.keep_adapter: true``), exactly; otherwise recovered from the merged weights."""
    stored = obj / "adapter"
    if all((stored / f).is_file() for f in _ADAPTER_FILES):
        for f in _ADAPTER_FILES:
            shutil.copy2(stored / f, dst / f)
        log("peft: the adapter the training step stored (lora.keep_adapter)")
    else:
        base = ((manifest.get("inputs") or {}).get("model") or {})
        digest = base.get("digest")
        if not isinstance(digest, str) or not store.object_path(digest).is_dir() \
                or not store.verify_object(digest):
            raise ExportError(f"--format peft: the model step '{manifest.get('step')}' was trained from "
                              f"(step '{base.get('step')}', object {str(digest)[:12]}) is not in the store "
                              "(or is corrupted), and the adapter is recovered as the difference to it; rerun "
                              f"`weightflow run PIPELINE --target {base.get('step')}`, or train with "
                              "lora.keep_adapter: true")
        residual = _adapter_from_difference(obj, store.object_path(digest), manifest, dst)
        log(f"peft: adapter recovered from the merged weights by a rank-r SVD of (fine-tuned - base) "
            f"per adapted module (largest relative residual {residual:.2e})")
    _finish_adapter_config(dst / "adapter_config.json", base_model)


def _delta_base(obj: Path) -> str | None:
    """The digest of the base model a stored Delta was taken against (None if unrecorded)."""
    try:
        digest = json.loads((obj / "weightflow.json").read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


def _write_peft_factors(obj: Path, dst: Path, *, store, step: str, base_model: str | None,
                        log: Callable[[str], None]) -> None:
    """A PEFT adapter directory of an ``extract-lora`` delta's factors; the base model the
    delta was taken against (in the store) tells which modules they adapt."""
    from weightflow.ops.extract_lora import peft_adapter

    digest = _delta_base(obj)
    if not isinstance(digest, str) or not store.object_path(digest).is_dir() or not store.verify_object(digest):
        raise ExportError(f"--format peft: the base model delta '{step}' was taken against (object "
                          f"{str(digest)[:12]}) is not in the store (or is corrupted), and the adapter's "
                          "modules are read from it; rerun the pipeline up to that base's load step")
    try:
        ranks = peft_adapter(obj, store.object_path(digest), dst, step)
    except ValueError as exc:
        raise ExportError(f"--format peft: {exc}") from None
    log(f"peft: {len(ranks)} LoRA module(s) of rank {min(ranks.values())}..{max(ranks.values())}, "
        "lora_alpha = r (scaling 1)")
    _finish_adapter_config(dst / "adapter_config.json", base_model)


def _adapter_from_difference(ft_dir: Path, base_dir: Path, manifest: dict, dst: Path) -> float:
    """Rebuild the LoRA adapter from merged weights: each adapted module's change is
    ``scaling * B @ A`` of rank <= r, so a rank-r SVD of ``(W_ft - W_base) / scaling``
    recovers ``B @ A`` up to float error.  Every other changed tensor must belong to a
    ``modules_to_save`` module (a classifier head), whose fine-tuned weights are saved as
    peft saves them; anything else changed means the model is not base + adapter.  Returns
    the largest relative residual of the rank-r fits."""
    import torch
    import transformers
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from transformers.pytorch_utils import Conv1D

    from weightflow.ops.lib.models import quiet_transformers
    from weightflow.ops.lib.train_params import LoraParams
    from weightflow.ops.lib.training import attach_lora

    task = json.loads((ft_dir / "weightflow.json").read_text()).get("task", "causal-lm")
    cls = transformers.AutoModelForSequenceClassification if task == "sequence-classification" \
        else transformers.AutoModelForCausalLM
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, seen inside peft
        model = cls.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
        peft_model = attach_lora(model, LoraParams.model_validate(_lora_of(manifest)), task)
    ft = _tensor_files(ft_dir)
    handled: set[str] = set()
    worst = 0.0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            orig = name.removeprefix("base_model.model.")
            if isinstance(module, LoraLayer):
                if not isinstance(module.get_base_layer(), (torch.nn.Linear, Conv1D)) or "default" not in module.lora_A:
                    raise ExportError(f"--format peft: module '{orig}' is a {type(module.get_base_layer()).__name__}; "
                                      "only adapters of linear layers are recovered from merged weights: train "
                                      "with lora.keep_adapter: true to export this adapter")
                worst = max(worst, _fit_lora(module, _get(ft, f"{orig}.weight"), orig))
                handled.add(f"{orig}.weight")
                if getattr(module.get_base_layer(), "bias", None) is not None:
                    handled.add(f"{orig}.bias")  # compared with the base below
                    _same_or_fail(module.get_base_layer().bias, _get(ft, f"{orig}.bias"), f"{orig}.bias")
            elif isinstance(module, ModulesToSaveWrapper):
                for pname, param in module.modules_to_save["default"].named_parameters():
                    param.copy_(_get(ft, f"{orig}.{pname}").to(param.dtype))
                    handled.add(f"{orig}.{pname}")
        base = _tensor_files(base_dir)
        for tname in sorted(set(ft) - handled):
            if tname not in base:
                raise ExportError(f"--format peft: tensor '{tname}' of the trained model is not in its base: "
                                  "it is not base + adapter")
            _same_or_fail(_get(base, tname), _get(ft, tname), tname)
        with tempfile.TemporaryDirectory(dir=dst) as tmp:  # inside the export: removed before its scan
            peft_model.save_pretrained(tmp)
            for f in _ADAPTER_FILES:
                shutil.copyfile(Path(tmp) / f, dst / f)
    return worst


def _tensor_files(directory: Path) -> dict:
    """tensor name -> open safetensors handle, over a model directory's top-level shards."""
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        handle = safe_open(str(f), framework="pt")  # closed when the last reference goes
        for k in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            out[k] = handle
    return out


def _get(files: dict, name: str):
    if name not in files:
        raise ExportError(f"--format peft: the trained model has no tensor '{name}'")
    return files[name].get_tensor(name)


def _same_or_fail(base, tuned, name: str) -> None:
    import torch

    if base.shape != tuned.shape or not torch.equal(base.to(tuned.dtype), tuned):
        raise ExportError(f"--format peft: tensor '{name}' differs from the base model but is neither "
                          "a LoRA target nor in modules_to_save, so the model is not base + adapter")


def _fit_lora(module, tuned, name: str) -> float:
    """Set the module's lora_A/lora_B from the rank-r SVD of its change; the relative residual."""
    import torch

    base = module.get_base_layer().weight
    if tuned.shape != base.shape:
        raise ExportError(f"--format peft: tensor '{name}.weight' has shape {list(tuned.shape)} in the "
                          f"trained model but {list(base.shape)} in its base")
    change = tuned.double() - base.double()
    if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores (in, out)
        change = change.T
    target = change / module.scaling["default"]
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    r = a.shape[0]
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:r].sqrt()
    new_b, new_a = u[:, :r] * root, root[:, None] * vh[:r]
    b.copy_(new_b.to(b.dtype))
    a.copy_(new_a.to(a.dtype))
    scale = float(target.norm())
    return float((target - new_b @ new_a).norm()) / scale if scale else 0.0


# -- one step's export ------------------------------------------------------------------

def export_step(pipeline, store, step: str, obj: Path, manifest: dict | None, target, *,
                fmt: str | None = None, force: bool = False, force_flag: str = "--force",
                format_flag: str = "--format", warn: Callable[[str], None] | None = None,
                log: Callable[[str], None] | None = None) -> bool:
    """Export ``step``'s stored object ``obj`` to ``target`` in format ``fmt`` (default
    dense), with its model card: ``weightflow export`` and ``outputs:`` both come here.
    Returns False when ``target`` already held exactly this."""
    from weightflow.dsl.present import modelcard

    manifest = manifest or {}
    layout_name = resolve_format(step, manifest, fmt, format_flag)
    kind = str(manifest.get("kind") or "")
    op = str(manifest.get("op") or pipeline.steps[step].op.name)
    layout = Layout(layout_name)
    if modelcard.wants_card(op, kind):
        card = modelcard.model_card(pipeline, store, step, Path(obj), kind, layout_name, warn=warn)
        layout.generated[modelcard.CARD_FILE] = card.encode("utf-8")
    if layout_name == "peft" and op == "extract-lora":
        nodes = modelcard.lineage(pipeline, store, step, warn=warn)
        delta_base = _delta_base(Path(obj))
        base_step = next((n.name for n in nodes if delta_base and n.digest == delta_base), None)
        hub = modelcard.hub_bases(nodes, base_step) if base_step else []
        layout.build = lambda o, d: _write_peft_factors(o, d, store=store, step=step,
                                                        base_model=hub[0] if len(hub) == 1 else None,
                                                        log=log or (lambda m: None))
    elif layout_name == "peft":
        nodes = modelcard.lineage(pipeline, store, step, warn=warn)
        source = ((manifest.get("inputs") or {}).get("model") or {}).get("step")
        bases = modelcard.hub_bases(nodes, source) if source in pipeline.steps else []
        layout.build = lambda o, d: _write_peft(o, d, store=store, manifest=manifest,
                                                base_model=bases[0] if len(bases) == 1 else None,
                                                log=log or (lambda m: None))
    elif layout_name == "dense" and kind == "Delta" and _has_sparse(Path(obj)):
        layout.build = _write_dense
    return export_artifact(Path(obj), target, manifest, store_root=store.root, pipeline_dir=pipeline.base_dir,
                           force=force, force_flag=force_flag, layout=layout)
