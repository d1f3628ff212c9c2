"""The content-addressed store: step keys -> artifacts, published atomically.

Layout under the store root (default ``~/.cache/weightflow``)::

    objects/ab/<digest>/   an artifact directory, named by its content digest
    actions/ab/<key>.json  the action entry (manifest) for a step key: written last,
                           it is the commit marker of a published result
    tmp/                   staging directories (same filesystem, so rename is atomic)
    locks/                 per-key claim locks (only to avoid duplicate work)
    memo.sqlite            file digests by (path, size, mtime, inode), and which object
                           directories were verified at which stat signature

A reader that finds a digest mismatch treats the entry as corrupted: it is
discarded and the step recomputes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .checkpoint import digest_directory, hash_file

DEFAULT_ROOT = "~/.cache/weightflow"


def default_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("WEIGHTFLOW_CACHE") or DEFAULT_ROOT))


@dataclass(frozen=True)
class Entry:
    key: str
    digest: str
    kind: str
    path: Path
    manifest: dict


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class Memo:
    """SQLite memo of file digests keyed on (path, size, mtime_ns, inode)."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, "
                         "mtime INT, inode INT, digest TEXT)")
            conn.execute("CREATE TABLE IF NOT EXISTS verified (digest TEXT PRIMARY KEY, sig TEXT)")
            self._local.conn = conn
        return conn

    def file_digest(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        row = self.db.execute("SELECT size, mtime, inode, digest FROM files WHERE path=?",
                              (str(path),)).fetchone()
        if row and row[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
            return row[3]
        digest = hash_file(path)
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)",
                        (str(path), st.st_size, st.st_mtime_ns, st.st_ino, digest))
        return digest

    def verified_sig(self, digest: str) -> str | None:
        row = self.db.execute("SELECT sig FROM verified WHERE digest=?", (digest,)).fetchone()
        return row[0] if row else None

    def set_verified(self, digest: str, sig: str | None) -> None:
        if sig is None:
            self.db.execute("DELETE FROM verified WHERE digest=?", (digest,))
        else:
            self.db.execute("INSERT OR REPLACE INTO verified VALUES (?,?)", (digest, sig))


def stat_signature(root: Path) -> str:
    """Cheap fingerprint of a directory's files: names, sizes, mtimes and inodes."""
    parts = []
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return "|".join(sorted(parts))


class Store:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = (Path(os.path.expanduser(str(root))) if root else default_root()).resolve()
        self.memo = Memo(self.root / "memo.sqlite")

    # -- paths ---------------------------------------------------------------
    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def action_path(self, key: str) -> Path:
        return self.root / "actions" / key[:2] / f"{key}.json"

    # -- reading -------------------------------------------------------------
    def lookup(self, key: str) -> Entry | None:
        """The published entry for ``key``, or None (missing or half-written)."""
        p = self.action_path(key)
        try:
            manifest = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable action entries count as absent
        digest = manifest.get("digest")
        if not isinstance(digest, str):
            return None
        obj = self.object_path(digest)
        if not obj.is_dir():
            return None
        return Entry(key=key, digest=digest, kind=manifest.get("kind", ""), path=obj, manifest=manifest)

    def verify(self, entry: Entry) -> bool:
        """True when the object's content still has its digest.

        Re-hashing is skipped while the object's files keep the (size, mtime, inode)
        they had when last verified; any write to them forces a full re-hash.
        """
        sig = stat_signature(entry.path)
        if self.memo.verified_sig(entry.digest) == sig:
            return True
        try:
            ok = digest_directory(entry.path) == entry.digest
        except (OSError, ValueError, KeyError):
            ok = False
        self.memo.set_verified(entry.digest, sig if ok else None)
        return ok

    def discard(self, entry: Entry) -> None:
        """Remove a corrupted entry: its action and its object."""
        try:
            self.action_path(entry.key).unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(entry.path, ignore_errors=True)
        self.memo.set_verified(entry.digest, None)

    def file_digest(self, path: Path) -> str:
        return self.memo.file_digest(path)

    # -- writing -------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh staging directory, removed afterwards unless it was published."""
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, key: str, staged: Path, digest: str, manifest: dict) -> Entry:
        """Move ``staged`` to its content address, then write the action entry."""
        obj = self.object_path(digest)
        if obj.is_dir():
            shutil.rmtree(staged, ignore_errors=True)  # same content already stored
        else:
            _fsync_tree(staged)
            obj.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staged, obj)
            except OSError:
                if not obj.is_dir():
                    raise
                shutil.rmtree(staged, ignore_errors=True)  # lost a race to an identical copy
            _fsync_dir(obj.parent)
            self.memo.set_verified(digest, stat_signature(obj))
        manifest = {**manifest, "key": key, "digest": digest}
        write_atomic(self.action_path(key), json.dumps(manifest, indent=1, sort_keys=True).encode())
        return Entry(key=key, digest=digest, kind=manifest.get("kind", ""), path=obj, manifest=manifest)

    @contextmanager
    def claim(self, key: str):
        """Hold the per-key lock so two concurrent runs don't compute the same step."""
        from filelock import FileLock

        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_dir / f"{key}.lock")):
            yield

    # -- maintenance ---------------------------------------------------------
    def actions(self) -> Iterator[tuple[str, Path]]:
        base = self.root / "actions"
        if not base.is_dir():
            return
        for p in sorted(base.glob("*/*.json")):
            yield p.stem, p

    def objects(self) -> Iterator[tuple[str, Path]]:
        base = self.root / "objects"
        if not base.is_dir():
            return
        for p in sorted(base.glob("*/*")):
            if p.is_dir():
                yield p.name, p

    def find_by_digest(self, digest: str) -> Path | None:
        p = self.object_path(digest)
        return p if p.is_dir() else None
