"""The content-addressed store: step keys -> artifacts, published atomically.

Layout under the store root (default ``~/.cache/weightflow``)::

    objects/ab/<digest>/   an artifact directory, named by its content digest
    actions/ab/<key>.json  the action entry (manifest) for a step key: written last,
                           it is the commit marker of a published result; its mtime
                           is the entry's last use (every lookup hit touches it)
    manifests/ab/<digest>/<key>.json
                           provenance records: one per key that published the object
                           (one object can be the output of several keys).  Kept
                           beside the object, never inside it, so the object's digest
                           and its exported copies do not change
    scores/ab/<key>.json   one evaluation score (one model's values for one metric recipe),
                           written by ``evaluate`` so that a rerun recomputes only the
                           scores whose model or metric changed; checksummed; its mtime
                           is its last use, as for actions (``gc`` removes old ones)
    tmp/<id>/, tmp/<id>.lock
                           staging directories (same filesystem, so rename is atomic),
                           each owned by the process holding the flock on its .lock
    locks/                 per-key claim locks (only to avoid duplicate work)
    memo.sqlite            file digests by (path, size, mtime, inode), and which object
                           directories were verified at which stat signature; only a
                           cache: an unreadable memo is moved aside and rebuilt
    format                 the store format; absent in stores written before the
                           provenance records existed (they are backfilled once)

A reader trusts an entry only when the action's key, the provenance record and the
object's digest agree and the object's content still hashes to its digest; anything
else is discarded with a warning and the step recomputes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import blake3

from weightflow.dsl.format.checkpoint import digest_directory, hash_file

try:  # POSIX; elsewhere staging directories are simply never cleaned automatically
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]  # an optional module: None where it does not exist

DEFAULT_ROOT = "~/.cache/weightflow"
FORMAT = 2
FORMAT_FILE = "format"
VERIFY_ENV = "WEIGHTFLOW_VERIFY"
_HEX = re.compile(r"^[0-9a-f]{16,128}$")
# A published object with no action yet may be mid-publish (renamed into objects/,
# its action not yet written): gc leaves such orphans alone for this long.
ORPHAN_GRACE_S = 3600.0
# The layout of a score entry (``scores/``); an entry of another format is not trusted.
SCORE_FORMAT = 1


def default_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("WEIGHTFLOW_CACHE") or DEFAULT_ROOT))


def verify_always_env() -> bool:
    """True when ``WEIGHTFLOW_VERIFY=always``: every read re-hashes, ignoring the memo."""
    return os.environ.get(VERIFY_ENV, "").strip().lower() == "always"


def _stderr_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def is_hex_id(value) -> TypeGuard[str]:
    """A key or digest as the store spells them (lowercase hex); anything else is
    refused before it becomes a path."""
    return isinstance(value, str) and bool(_HEX.match(value))


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


def write_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via a (by default fsynced) temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


# -- score entries ----------------------------------------------------------------

def score_check(score: dict) -> str:
    """The checksum a score entry carries: blake3 of its JSON *in its key order* (a
    metric that names its own columns reports them in the order of its values, so a
    reordered entry is a different entry)."""
    text = json.dumps(score, separators=(",", ":"), ensure_ascii=False)
    return blake3.blake3(text.encode()).hexdigest()


def parse_score(key: str, raw: bytes) -> tuple[dict | None, str | None]:
    """(the score, None) for a sound entry of ``key``; (None, why not) otherwise.

    An entry is sound when it is a JSON object of this format, names its own key and
    its score still has the checksum it was written with: a truncated, garbled or
    copied file is refused, never half-read.
    """
    try:
        doc = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None, "it is not valid JSON (truncated or garbled)"
    if not isinstance(doc, dict):
        return None, "it is not a JSON object"
    if doc.get("format") != SCORE_FORMAT:
        return None, f"its format is {doc.get('format')!r}, expected {SCORE_FORMAT}"
    if doc.get("key") != key:
        return None, f"it names key {str(doc.get('key'))[:12]} (copied from another entry)"
    score = doc.get("score")
    if not isinstance(score, dict):
        return None, "it holds no score"
    try:
        ok = score_check(score) == doc.get("check")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return None, "its content no longer matches its checksum"
    return score, None


# -- the memo ---------------------------------------------------------------------

def _transient(exc: sqlite3.Error) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


def _readonly(exc: sqlite3.Error) -> bool:
    msg = str(exc).lower()
    return "readonly" in msg or "read-only" in msg


class Memo:
    """SQLite memo of file digests keyed on (path, size, mtime_ns, inode).

    It is only a cache, so it never makes a command fail: on any sqlite error other
    than a busy database (opening it, a PRAGMA, a query) the file is moved aside as
    ``memo.sqlite.corrupt-<time>`` (with its -wal/-shm), one warning is printed, and
    an empty memo takes its place; where even that is impossible (a read-only store)
    the memo lives in memory for the rest of the process.
    """

    def __init__(self, path: Path, warn: Callable[[str], None] | None = None):
        self.path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._warn = warn or _stderr_warn
        self._warned = False
        self._memory = False
        self._generation = 0  # bumped whenever the file is replaced or memory mode starts

    # -- connections -----------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._memory:
            conn = sqlite3.connect(":memory:", isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._local.inode = os.stat(self.path).st_ino
            except OSError:
                self._local.inode = None
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except BaseException:
                conn.close()
                raise
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, "
                         "mtime INT, inode INT, digest TEXT)")
            conn.execute("CREATE TABLE IF NOT EXISTS verified (digest TEXT PRIMARY KEY, sig TEXT)")
        except BaseException:
            conn.close()
            raise
        if not self._memory and self._local.inode is None:
            with suppress(OSError):
                self._local.inode = os.stat(self.path).st_ino
        return conn

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "generation", None) != self._generation:
            self._drop_conn()
            conn = self._connect()
            self._local.conn = conn
            self._local.generation = self._generation
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()

    def close(self) -> None:
        """Close this thread's connection (the next use reopens it)."""
        self._drop_conn()

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            self._warn(message)

    def _recover(self, exc: sqlite3.Error) -> None:
        """Replace an unusable memo: move the file aside (once, whichever thread or
        process notices first) and start an empty one, or fall back to memory."""
        with self._lock:
            seen = getattr(self._local, "inode", None)
            self._drop_conn()
            if self._memory:
                return
            if _readonly(exc) and not (os.access(self.path, os.W_OK)
                                       and os.access(self.path.parent, os.W_OK)):
                self._memory = True
                self._generation += 1
                self._warn_once(f"the store's memo {self.path} cannot be written ({exc}); "
                                "keeping file digests in memory for this command")
                return
            if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
                return  # a misused connection, not a damaged file: just reconnect
            try:
                current = os.stat(self.path).st_ino
            except OSError:
                current = None
            if current is None:  # nothing to move aside: the file cannot even be created
                self._memory = True
                self._generation += 1
                self._warn_once(f"the store's memo {self.path} cannot be opened ({exc}); "
                                "keeping file digests in memory for this command")
                return
            if current != seen:
                return  # already replaced by someone else: just reconnect to the new file
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            try:
                os.replace(self.path, aside)
                for suffix in ("-wal", "-shm"):
                    side = Path(f"{self.path}{suffix}")
                    if side.exists():
                        os.replace(side, Path(f"{aside}{suffix}"))
            except OSError as move_exc:
                self._memory = True
                self._generation += 1
                self._warn_once(f"the store's memo {self.path} is unreadable ({exc}) and cannot be "
                                f"moved aside ({move_exc}); keeping file digests in memory for "
                                "this command")
                return
            self._generation += 1
            self._warn_once(f"the store's memo {self.path} is unreadable ({exc}); moved it aside "
                            f"to {aside.name} and started an empty one (it is only a cache: "
                            "files are re-hashed once)")

    def _run(self, fn: Callable[[sqlite3.Connection], object], default=None):
        """``fn(connection)``, recovering from a broken memo; ``default`` when the
        memo cannot answer (the caller then does the work itself)."""
        for _ in range(3):
            try:
                return fn(self.db)
            except sqlite3.Error as exc:
                if _transient(exc):
                    self._warn_once(f"the store's memo {self.path} is busy ({exc}); "
                                    "working without it")
                    return default
                self._recover(exc)
            except OSError as exc:  # its directory cannot be created or read
                with self._lock:
                    if self._memory:
                        return default
                    self._drop_conn()
                    self._memory = True
                    self._generation += 1
                    self._warn_once(f"the store's memo {self.path} cannot be opened ({exc}); "
                                    "keeping file digests in memory for this command")
        return default

    # -- queries ---------------------------------------------------------------
    def file_digest(self, path: Path, deep: bool = False) -> str:
        """The content digest of ``path``; memoised on its stat unless ``deep``."""
        path = Path(path).resolve()
        st = path.stat()
        if not deep:
            row = self._run(lambda db: db.execute(
                "SELECT size, mtime, inode, digest FROM files WHERE path=?", (str(path),)).fetchone())
            if row and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ino) and isinstance(row[3], str):
                return row[3]
        digest = hash_file(path)
        self._run(lambda db: db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)",
                                        (str(path), st.st_size, st.st_mtime_ns, st.st_ino, digest)))
        return digest

    def verified_sig(self, digest: str) -> str | None:
        row = self._run(lambda db: db.execute("SELECT sig FROM verified WHERE digest=?",
                                              (digest,)).fetchone())
        return row[0] if row and isinstance(row[0], str) else None

    def set_verified(self, digest: str, sig: str | None) -> None:
        if sig is None:
            self._run(lambda db: db.execute("DELETE FROM verified WHERE digest=?", (digest,)))
        else:
            self._run(lambda db: db.execute("INSERT OR REPLACE INTO verified VALUES (?,?)", (digest, sig)))


def stat_signature(root: Path) -> str:
    """Cheap fingerprint of a directory's files: names, sizes, mtimes and inodes."""
    parts = []
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return "|".join(sorted(parts))


# -- staging ownership ------------------------------------------------------------

def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


class Store:
    """The local content store, optionally the read-through, write-through cache of a
    remote one (``remote``: a URL fsspec opens; see ``dsl/store/remote.py``).

    With a remote, a lookup that misses locally asks the remote and, on a hit, downloads
    the object (checked against its digest) and its entry into this store; a publish
    uploads objects, then the provenance record, then the action (created only if
    absent: the first publisher of a key wins, the others adopt its entry).

    ``lazy_fetch`` (set by the CLI for plan/status/run): a remote hit only registers the
    entry; its object is downloaded when something asks for its path
    (:meth:`object_path`) or verifies it deeply, so a run downloads the inputs of the
    steps it executes and the outputs it exports, not every cached step of the pipeline.
    """

    def __init__(self, root: str | os.PathLike | None = None,
                 warn: Callable[[str], None] | None = None, remote: str | None = None,
                 lazy_fetch: bool = False):
        self.root = (Path(os.path.expanduser(str(root))) if root else default_root()).resolve()
        self.warn = warn or _stderr_warn
        self.memo = Memo(self.root / "memo.sqlite", warn=lambda m: self.warn(m))
        self._format_ok: bool | None = None  # None: not checked yet; False: legacy, read-only
        # the remote's URL as given (workers open the same remote with it: it may hold
        # credentials, so print ``remote_display`` instead), and the remote itself
        self.remote_url: str | None = remote or None
        self.remote = None
        if self.remote_url:
            from weightflow.dsl.store.remote import Remote

            self.remote = Remote(self.remote_url)
        self.lazy_fetch = lazy_fetch
        # lazily fetched remote hits: digest -> [(key, action manifest)], and key -> its Entry
        self._pending: dict[str, list[tuple[str, dict]]] = {}
        self._pending_entries: dict[str, Entry] = {}
        self._fetch_failures: dict[str, str] = {}  # digest -> why its download was refused
        self._warned_remote: set[str] = set()  # keys whose unusable remote entry was reported

    @property
    def remote_display(self) -> str | None:
        """The remote's URL without user info or query (safe to print), or None."""
        return self.remote.display if self.remote is not None else None

    # -- paths ---------------------------------------------------------------
    def object_path(self, digest: str) -> Path:
        """The local directory of object ``digest``; a lazily fetched remote object is
        downloaded first (a corrupt one is not: its path then does not exist)."""
        if self._pending and digest in self._pending and not self._materialize(digest):
            from weightflow.dsl.lang.diagnostics import WeightflowError

            raise WeightflowError(f"{self._fetch_failures.get(digest, 'a remote object is unusable')}; "
                                  "it is marked bad on the remote: rerun to recompute it")
        return self._object_dir(digest)

    def _object_dir(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def action_path(self, key: str) -> Path:
        return self.root / "actions" / key[:2] / f"{key}.json"

    def record_dir(self, digest: str) -> Path:
        return self.root / "manifests" / digest[:2] / digest

    def record_path(self, digest: str, key: str) -> Path:
        """The provenance record saying that ``key`` published object ``digest``."""
        return self.record_dir(digest) / f"{key}.json"

    def score_path(self, key: str) -> Path:
        return self.root / "scores" / key[:2] / f"{key}.json"

    # -- the provenance records ------------------------------------------------
    def _ensure_format(self) -> bool:
        """Backfill provenance records in a store written before they existed.

        Runs once per store: every existing action is taken as it is (the best
        anyone can do) and gets its record; afterwards an action without a record is
        refused.  Returns False when the store cannot be written: then missing
        records are tolerated for this process.
        """
        if self._format_ok is not None:
            return self._format_ok
        marker = self.root / FORMAT_FILE
        try:
            if int(marker.read_text().strip() or 0) >= FORMAT:
                self._format_ok = True
                return True
        except (OSError, ValueError):
            pass
        try:
            for key, apath in self.actions():
                try:
                    m = json.loads(apath.read_text())
                except (OSError, ValueError):
                    continue
                digest = m.get("digest") if isinstance(m, dict) else None
                if not is_hex_id(digest) or m.get("key") != key:
                    continue
                rec = self.record_path(digest, key)
                if not rec.exists() and self.object_path(digest).is_dir():
                    write_atomic(rec, json.dumps(m, indent=1, sort_keys=True).encode(), fsync=False)
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, f"{FORMAT}\n".encode())
            self._format_ok = True
        except OSError:
            self._format_ok = False
        return self._format_ok

    def provenance_problem(self, key: str, digest: str, manifest: dict) -> str | None:
        """Why the action of ``key`` must not be trusted to point at ``digest``, or None."""
        if manifest.get("key") != key:
            return (f"its action file names key {str(manifest.get('key'))[:12]}, not {key[:12]} "
                    "(copied from another entry)")
        try:
            rec = json.loads(self.record_path(digest, key).read_text())
        except FileNotFoundError:
            if not self._ensure_format():
                return None  # a legacy store we cannot upgrade: nothing to compare with
            try:
                rec = json.loads(self.record_path(digest, key).read_text())
            except FileNotFoundError:
                return (f"object {digest[:12]} was never published for this key "
                        "(the action points at another step's output)")
            except (OSError, ValueError):
                return f"the provenance record of object {digest[:12]} is unreadable"
        except (OSError, ValueError):
            return f"the provenance record of object {digest[:12]} is unreadable"
        if not isinstance(rec, dict) or rec.get("key") != key or rec.get("digest") != digest:
            return f"the provenance record of object {digest[:12]} disagrees with the action"
        return None

    # -- reading -------------------------------------------------------------
    def read_action(self, key: str) -> dict | None:
        """The action manifest of ``key`` as stored (unchecked), or None."""
        try:
            m = json.loads(self.action_path(key).read_text())
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) else None

    def lookup(self, key: str, warn: Callable[[str], None] | None = None,
               touch: bool = True) -> Entry | None:
        """The published entry for ``key``, or None (missing, half-written or untrusted).

        Local first; with a remote, a local miss asks the remote (see the class doc), so
        the caller always gets a local entry (or, with ``lazy_fetch``, one whose object
        arrives on first use of its path).
        """
        entry = self._lookup_local(key, warn, touch)
        if entry is not None or self.remote is None or not is_hex_id(key):
            return entry
        if key in self._pending_entries:
            return self._pending_entries[key]
        return self._lookup_remote(key, warn or self.warn, touch)

    def _lookup_local(self, key: str, warn: Callable[[str], None] | None = None,
                      touch: bool = True) -> Entry | None:
        """The entry for ``key`` in the local store alone, or None.

        An action whose key, provenance record and object do not agree is discarded
        with a warning (its object stays: it is a valid output of some other key).
        A hit refreshes the action's mtime, which is the entry's last use for ``gc``.
        """
        if not is_hex_id(key):
            return None
        p = self.action_path(key)
        manifest = self.read_action(key)
        if manifest is None:
            return None  # missing or unreadable action entries count as absent
        digest = manifest.get("digest")
        if not is_hex_id(digest):
            return None
        obj = self.object_path(digest)
        if not obj.is_dir():
            return None
        problem = self.provenance_problem(key, digest, manifest)
        if problem:
            step = manifest.get("step")
            who = f" (step '{step}')" if isinstance(step, str) else ""
            (warn or self.warn)(f"cache entry {key[:12]}{who} is corrupted: {problem}; "
                                "discarding the entry and recomputing")
            with suppress(OSError):
                p.unlink()
            return None
        if touch:
            with suppress(OSError):  # a read-only store: last use is simply not recorded
                os.utime(p)
        return Entry(key=key, digest=digest, kind=manifest.get("kind", ""), path=obj, manifest=manifest)

    def verify(self, entry: Entry, deep: bool | None = None) -> bool:
        """True when the object's content still has its digest.

        Without ``deep``, re-hashing is skipped while the object's files keep the
        (size, mtime, inode) they had when last verified: cheap, but corruption that
        keeps those (bit rot, an in-place edit that restores the mtime) goes unseen.
        ``deep`` re-hashes every byte whatever the memo says (the cost: reading the
        whole artifact on every use).  ``deep=None`` follows ``WEIGHTFLOW_VERIFY``.
        """
        return self.verify_object(entry.digest, entry.path, deep)

    def verify_object(self, digest: str, path: Path | None = None, deep: bool | None = None) -> bool:
        if deep is None:
            deep = verify_always_env()
        if digest in self._pending:  # a lazily fetched remote hit: hashed when it arrives
            if not deep:
                return True
            self._materialize(digest)
            path = None
        path = self.object_path(digest) if path is None else path
        try:
            sig = stat_signature(path)
        except OSError:
            return False
        if not sig:
            return False  # an empty or missing directory holds no artifact
        if not deep and self.memo.verified_sig(digest) == sig:
            return True
        try:
            ok = digest_directory(path) == digest
        except Exception:  # noqa: BLE001 -- unreadable, truncated or garbled: not what it claims
            ok = False
        self.memo.set_verified(digest, sig if ok else None)
        return ok

    def discard(self, entry: Entry) -> None:
        """Remove a corrupted entry: its action and its object."""
        self._pending.pop(entry.digest, None)
        self._pending_entries.pop(entry.key, None)
        self.discard_action(entry.key)
        self.discard_object(entry.digest)

    def discard_action(self, key: str) -> None:
        with suppress(FileNotFoundError):
            self.action_path(key).unlink()

    def discard_object(self, digest: str) -> None:
        """Remove an object (its provenance records stay: they remain true, and a
        recomputation of the same content is trusted again by the keys they name)."""
        shutil.rmtree(self._object_dir(digest), ignore_errors=True)
        self.memo.set_verified(digest, None)

    def file_digest(self, path: Path, deep: bool = False) -> str:
        return self.memo.file_digest(path, deep)

    # -- score entries -------------------------------------------------------
    def read_score(self, key: str, warn: Callable[[str], None] | None = None,
                   touch: bool = True) -> dict | None:
        """The score stored under ``key``, or None (missing, or unsound: then it is
        discarded with a warning so that the caller recomputes and rewrites it).

        A hit refreshes the entry's mtime, its last use for ``gc``.
        """
        if not is_hex_id(key):
            return None
        path = self.score_path(key)
        score: dict | None = None
        problem: str | None = None
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            problem = f"it cannot be read ({exc.strerror or exc})"
        else:
            score, problem = parse_score(key, raw)
        if problem:
            (warn or self.warn)(f"score entry {key[:12]} is corrupted: {problem}; discarding it "
                                "and recomputing the score")
            self.discard_score(key)
            return None
        if touch:
            with suppress(OSError):  # a read-only store: last use is simply not recorded
                os.utime(path)
        return score

    def write_score(self, key: str, score: dict) -> None:
        """Store ``score`` (a JSON object) under ``key``, atomically and fsynced like
        actions; its key order is kept (see ``score_check``), and so are NaN and the
        infinities (as Python's json writes them: a broken model's loss is kept as it was
        computed, and its consumer decides what it becomes)."""
        if not is_hex_id(key):
            raise ValueError(f"a score key is lowercase hex, got {key!r}")
        doc = {"format": SCORE_FORMAT, "key": key, "check": score_check(score), "score": score}
        write_atomic(self.score_path(key), json.dumps(doc, indent=1, ensure_ascii=False).encode())

    def discard_score(self, key: str) -> None:
        with suppress(OSError):
            self.score_path(key).unlink()

    def scores(self) -> Iterator[tuple[str, Path]]:
        """(key, path) of every score entry."""
        base = self.root / "scores"
        if not base.is_dir():
            return
        for p in sorted(base.glob("*/*.json")):
            yield p.stem, p

    # -- writing -------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh staging directory, removed afterwards unless it was published.

        The directory yielded is ``tmp/<id>/out``; ``tmp/<id>`` holds it and any scratch
        folders an op makes beside it, and is removed as a whole.

        While it exists this process holds an exclusive flock on ``tmp/<id>.lock``;
        the kernel drops it when the process dies (even by SIGKILL), which is how
        ``clean_stale_staging`` tells a dead run's leftovers from a live run's.

        (With a remote, the runner downloads a step's inputs before it stages its output.)
        """
        base = self.root / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        fd = None
        while True:
            ident = uuid.uuid4().hex
            lock = base / f"{ident}.lock"
            if fcntl is None:
                break
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock):
                break  # a cleaner may have unlinked it before we locked it: then retry
            os.close(fd)
        tmp = base / ident
        try:
            tmp.mkdir()
            # The artifact is built in ``<id>/out``; ops put their scratch folders beside it
            # (``ctx.out.parent``), so they too belong to this owner and go with it.
            (tmp / "out").mkdir()
            yield tmp / "out"
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if fd is not None:
                with suppress(OSError):
                    lock.unlink()
                os.close(fd)

    def clean_stale_staging(self, dry_run: bool = False) -> list[Path]:
        """Remove staging directories whose owner process is gone; return them.

        A directory is stale when nobody holds the flock on its ``.lock`` (or it has
        no lock file: left by an older weightflow).  Live runs' directories stay.
        """
        base = self.root / "tmp"
        if fcntl is None or not base.is_dir():
            return []
        try:
            idents = sorted({e.name.removesuffix(".lock") for e in base.iterdir()})
        except OSError:
            return []
        removed = []
        for ident in idents:
            target = base / ident
            if _remove_if_stale(target, base / f"{ident}.lock", dry_run):
                removed.append(target)
        if not dry_run:
            self._remove_dead_temp_files()
        return removed

    def _remove_dead_temp_files(self, older_than_s: float = 3600.0) -> None:
        """Temp files of atomic writes (``.NAME.*.tmp``) in actions/, manifests/ and scores/
        left by a process killed between create and rename; a live writer renames its file
        within milliseconds, so an hour-old one is dead.  They are never read, only clutter."""
        cutoff = time.time() - older_than_s
        for sub in ("actions", "manifests", "scores"):
            base = self.root / sub
            if not base.is_dir():
                continue
            for f in base.rglob(".*.tmp"):
                with contextlib.suppress(OSError):
                    if f.is_file() and f.stat().st_mtime < cutoff:
                        f.unlink()

    def publish(self, key: str, staged: Path, digest: str, manifest: dict) -> Entry:
        """Publish locally (:meth:`_publish_local`), then, with a remote, upload: the
        object, the provenance record, and last the action, created only if absent.

        Returns the entry that holds for ``key`` everywhere: this one, or, when another
        machine published the key first with other bytes, the winner's (downloaded and
        made the local entry too), so that all agree on one digest.
        """
        entry = self._publish_local(key, staged, digest, manifest)
        if self.remote is None:
            return entry
        try:
            return self.upload(entry)
        except OSError as exc:
            from weightflow.dsl.lang.diagnostics import WeightflowError

            raise WeightflowError(f"uploading the output of key {key[:12]} to the remote store "
                                  f"{self.remote_display} failed ({exc}); the local entry is kept, "
                                  "`weightflow push` uploads it later") from None

    def _publish_local(self, key: str, staged: Path, digest: str, manifest: dict) -> Entry:
        """Move ``staged`` to its content address, then write the action entry.

        The provenance record ``manifests/../<digest>/<key>.json`` is written first,
        the action (the commit marker) last.
        """
        self._ensure_format()
        manifest = {**manifest, "key": key, "digest": digest}
        doc = json.dumps(manifest, indent=1, sort_keys=True).encode()
        write_atomic(self.record_path(digest, key), doc)
        obj = self._object_dir(digest)
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
        write_atomic(self.action_path(key), doc)
        return Entry(key=key, digest=digest, kind=manifest.get("kind", ""), path=obj, manifest=manifest)

    # -- the remote ----------------------------------------------------------
    def remote_has(self, key: str) -> bool:
        """Whether the remote holds an entry for ``key`` (no download; False without one)."""
        return self.remote is not None and is_hex_id(key) and self.remote.has(key)

    def where(self, key: str | None) -> str:
        """``local``, ``remote`` (only there) or ``missing``: where the entry of ``key`` is,
        from file existence alone (nothing hashed, nothing downloaded)."""
        if not is_hex_id(key):
            return "missing"
        m = self.read_action(key) or {}
        if is_hex_id(m.get("digest")) and self._object_dir(m["digest"]).is_dir():
            return "local"
        return "remote" if self.remote_has(key) else "missing"

    def upload(self, entry: Entry) -> Entry:
        """Upload a local entry (see :meth:`publish`); the entry that holds afterwards."""
        assert self.remote is not None
        remote = self.remote
        doc = json.dumps(entry.manifest, indent=1, sort_keys=True).encode()
        remote.upload_object(entry.digest, self._object_dir(entry.digest))
        remote._write(remote.record_path(entry.digest, entry.key), doc)
        if remote.create_exclusive(remote.action_path(entry.key), doc):
            return entry
        winner = remote.read_action(entry.key) or {}
        theirs = winner.get("digest")
        if not is_hex_id(theirs) or theirs == entry.digest or winner.get("key") != entry.key:
            return entry
        # Another machine published this key first with other bytes: adopt its entry.
        if not self._object_dir(theirs).is_dir():
            self._pending.setdefault(theirs, []).append((entry.key, winner))
            if not self._materialize(theirs):
                self.warn(f"key {entry.key[:12]} was published to {remote.display} by another "
                          f"machine as {theirs[:12]}, whose object cannot be fetched; keeping "
                          f"this machine's {entry.digest[:12]}")
                return entry
        else:
            self._publish_local(entry.key, self.root / "tmp" / "-absent-", theirs, winner)
        return self._lookup_local(entry.key, touch=False) or entry

    def _lookup_remote(self, key: str, warn: Callable[[str], None], touch: bool) -> Entry | None:
        """A local miss asks the remote: the entry of ``key`` there (fetched, or with
        ``lazy_fetch`` registered for fetching on first use), or None."""
        assert self.remote is not None
        m = self.remote.read_action(key)
        digest = m.get("digest") if m is not None else None
        if m is None or m.get("key") != key or not is_hex_id(digest):
            return None
        step = m.get("step")
        who = f" (step '{step}')" if isinstance(step, str) else ""
        rec = self.remote.read_record(digest, key)
        if rec is None or rec.get("key") != key or rec.get("digest") != digest:
            warn(f"remote cache entry {key[:12]}{who} in {self.remote.display} has no matching "
                 "provenance record; not using it")
            return None
        if self._object_dir(digest).is_dir():  # same content already here (another key's)
            self._publish_local(key, self.root / "tmp" / "-absent-", digest, m)
            return self._lookup_local(key, warn, touch)
        if self.lazy_fetch and self.remote.read_marker(digest) is None:
            if key in self._warned_remote:
                return None
            self._warned_remote.add(key)  # plan and run look a key up more than once
            warn(f"remote cache entry {key[:12]}{who} in {self.remote.display}: its object {digest[:12]} "
                 "is missing, incompletely uploaded or was found corrupted; recomputing it")
            return None
        self._pending.setdefault(digest, []).append((key, m))
        if self.lazy_fetch:
            entry = Entry(key=key, digest=digest, kind=m.get("kind", ""), path=self._object_dir(digest),
                          manifest=m)
            self._pending_entries[key] = entry
            return entry
        if not self._materialize(digest, warn):
            return None
        return self._lookup_local(key, warn, touch)

    def _materialize(self, digest: str, warn: Callable[[str], None] | None = None) -> bool:
        """Download the pending remote object ``digest``, check its digest and publish it
        (with the entries waiting for it) locally.  A corrupt or incomplete remote object
        is reported naming its keys, its marker dropped (so the next publisher of that
        content uploads it again), and nothing is published: the caller sees a miss."""
        waiting = self._pending.pop(digest, [])
        for key, _ in waiting:
            self._pending_entries.pop(key, None)
        if not waiting or self.remote is None:
            return False
        return self._download_and_publish(digest, waiting, warn or self.warn)

    def _download_and_publish(self, digest: str, waiting: list[tuple[str, dict]],
                              warn: Callable[[str], None]) -> bool:
        """_materialize's work: fetch into staging, check, publish locally (or report)."""
        assert self.remote is not None
        with self.staging() as out:
            try:
                self.remote.download_object(digest, out)
                ok = digest_directory(out) == digest
                why = "its content does not match its digest"
            except FileNotFoundError:
                ok, why = False, "it is missing or incompletely uploaded"
            except Exception as exc:  # noqa: BLE001 -- unreadable or garbled: not what it claims
                ok, why = False, f"it cannot be read ({exc})"
            if not ok:
                names = ", ".join(
                    f"{k[:12]}" + (f" (step '{m['step']}')" if isinstance(m.get("step"), str) else "")
                    for k, m in waiting)
                message = (f"remote object {digest[:12]} of cache entry {names} in {self.remote.display} "
                           f"is corrupted: {why}")
                self._fetch_failures[digest] = message
                warn(f"{message}; not using it (the step recomputes and uploads it again)")
                if "missing" not in why:
                    self.remote.drop_marker(digest)
                return False
            for key, manifest in waiting:
                self._publish_local(key, out, digest, manifest)
        return True

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

    def records(self, digest: str) -> list[dict]:
        """The provenance records of an object (who published it)."""
        out = []
        d = self.record_dir(digest)
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                try:
                    m = json.loads(p.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(m, dict):
                    out.append(m)
        return out

    def collect(self, keep_keys: AbstractSet[str] = frozenset(), older_than_days: float = 14.0,
                dry_run: bool = False, now: float | None = None) -> dict:
        """Garbage collection: see ``weightflow gc --help``.

        Keeps every action named in ``keep_keys`` or used (looked up) in the last
        ``older_than_days`` days, every object such an action references, and
        unreferenced objects younger than that (or than ``ORPHAN_GRACE_S``: they may
        be mid-publish); removes the rest, and staging left by dead processes.  Score
        entries go by age alone: one not used in ``older_than_days`` is removed (it is
        only a cache; a lock file names reports, whose objects are kept as above).
        Returns what was (or, with ``dry_run``, would be) removed.
        """
        now = time.time() if now is None else now
        cutoff = now - older_than_days * 86400.0
        kept_actions, dropped = self._gc_actions(keep_keys, cutoff)
        kept_digests = set(kept_actions.values())
        drop_objects, orphans = self._gc_objects(kept_digests, dropped, cutoff, now)
        for row in dropped:
            row.setdefault("bytes", 0)  # the object stays (a kept entry shares it) or is gone
        stale = self.clean_stale_staging(dry_run=dry_run)
        if not dry_run:
            self._gc_remove(dropped, drop_objects, now)
        scores_removed, score_bytes, scores_kept = self._gc_scores(cutoff, dry_run)
        if not dry_run:
            self._gc_views()
        for row in dropped:
            row.pop("_path", None)
        entries = dropped + orphans
        return {
            "dry_run": dry_run,
            "older_than_days": older_than_days,
            "removed": entries,
            "actions": len(dropped),
            "objects": len(drop_objects),
            "bytes": sum(s for _, _, s in drop_objects),
            "kept_actions": len(kept_actions),
            "kept_by_lock": sum(k in keep_keys for k in kept_actions),
            "kept_objects": len(kept_digests),
            "staging": [str(p) for p in stale],
            "scores": scores_removed,
            "score_bytes": score_bytes,
            "kept_scores": scores_kept,
        }

    def _gc_views(self) -> None:
        """Remove the cached views (``views/<digest>.json``: ``show``'s weights summary)
        whose object is gone: a view is derived from its object and lives as long as it."""
        base = self.root / "views"
        if not base.is_dir():
            return
        for view in base.glob("*/*.json"):
            if not self.object_path(view.stem).is_dir():
                with suppress(OSError):
                    view.unlink()

    def _gc_scores(self, cutoff: float, dry_run: bool) -> tuple[int, int, int]:
        """collect's pass over score entries: (removed, their bytes, kept), by last use."""
        removed = size = kept = 0
        for _key, path in self.scores():
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_mtime >= cutoff:
                kept += 1
                continue
            removed += 1
            size += st.st_size
            if not dry_run:
                with suppress(OSError):
                    path.unlink()
        return removed, size, kept

    def _gc_actions(self, keep_keys: AbstractSet[str], cutoff: float) -> tuple[dict[str, str], list[dict]]:
        """collect's first pass: the actions kept (key -> digest) and the rows of those dropped."""
        kept_actions: dict[str, str] = {}
        dropped: list[dict] = []
        for key, apath in self.actions():
            try:
                last = apath.stat().st_mtime
            except OSError:
                continue
            m = self.read_action(key) or {}
            digest = m.get("digest") if is_hex_id(m.get("digest")) else None
            if digest is not None and (key in keep_keys or last >= cutoff):
                kept_actions[key] = digest
                continue
            dropped.append({"key": key, "digest": digest, "step": m.get("step"),
                            "pipeline": m.get("pipeline"), "kind": m.get("kind"),
                            "created": m.get("created"), "last_used": _iso(last),
                            "reason": "unused" if digest else "unreadable", "_path": apath})
        return kept_actions, dropped

    def _gc_objects(self, kept_digests: set[str], dropped: list[dict], cutoff: float,
                    now: float) -> tuple[list[tuple[str, Path, int]], list[dict]]:
        """collect's second pass: the objects to remove (digest, path, size), and rows for the
        orphans among them; sets ``bytes`` on the dropped actions' rows whose object goes."""
        by_digest: dict[str, list[dict]] = {}
        for row in dropped:
            if row["digest"]:
                by_digest.setdefault(row["digest"], []).append(row)
        drop_objects: list[tuple[str, Path, int]] = []
        orphans: list[dict] = []
        for digest, opath in self.objects():
            if digest in kept_digests:
                continue
            if digest in by_digest:
                size = tree_size(opath)
                drop_objects.append((digest, opath, size))
                for row in by_digest[digest]:
                    row["bytes"] = size
                continue
            try:
                age = opath.stat().st_mtime
            except OSError:
                continue
            if age >= cutoff or age >= now - ORPHAN_GRACE_S:
                continue
            size = tree_size(opath)
            drop_objects.append((digest, opath, size))
            rec = (self.records(digest) or [{}])[0]
            orphans.append({"key": None, "digest": digest, "step": rec.get("step"),
                            "pipeline": rec.get("pipeline"), "kind": rec.get("kind"),
                            "created": rec.get("created"), "last_used": _iso(age),
                            "reason": "no entry refers to it", "bytes": size})
        return drop_objects, orphans

    def _gc_remove(self, dropped: list[dict], drop_objects: list[tuple[str, Path, int]], now: float) -> None:
        """collect's removals (not in a dry run)."""
        for row in dropped:
            row["_path"].unlink(missing_ok=True)
            if row["digest"]:
                self.record_path(row["digest"], row["key"]).unlink(missing_ok=True)
        for digest, opath, _ in drop_objects:
            shutil.rmtree(opath, ignore_errors=True)
            shutil.rmtree(self.record_dir(digest), ignore_errors=True)
            self.memo.set_verified(digest, None)
        # provenance records of objects that no longer exist
        base = self.root / "manifests"
        if base.is_dir():
            for d in base.glob("*/*"):
                try:
                    young = d.stat().st_mtime >= now - ORPHAN_GRACE_S
                except OSError:
                    continue
                if not young and not self.object_path(d.name).is_dir():
                    shutil.rmtree(d, ignore_errors=True)


def _remove_if_stale(target: Path, lock: Path, dry_run: bool) -> bool:
    """Remove one staging directory (and its lock file) unless a live owner holds the lock
    or ``dry_run``; whether it was stale and existed (see ``Store.clean_stale_staging``)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        fd = None
    except OSError:
        return False
    stale = False
    try:
        if fd is not None and (not _try_lock(fd) or not _same_file(fd, lock)):
            return False  # a live owner (or someone else is cleaning it right now)
        exists = target.exists() or target.is_symlink()
        stale = exists
        if dry_run:
            return stale
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        elif exists:
            target.unlink(missing_ok=True)
        if fd is not None:
            lock.unlink(missing_ok=True)
    except OSError:
        return stale
    finally:
        if fd is not None:
            os.close(fd)
    return stale


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
