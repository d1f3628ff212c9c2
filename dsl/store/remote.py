"""A remote store: the same layout as the local store, on anything fsspec opens.

The local store (``content.Store``) becomes a read-through, write-through cache of it.
Layout under the remote URL (``s3://bucket/prefix``, ``file:///mnt/nfs/wf``, ...)::

    objects/ab/<digest>/...        an artifact's files, as in the local store
    objects/ab/<digest>.files.json the object's completion marker: its files and their
                                   sizes, written after every file was uploaded; an object
                                   without it is incomplete (a killed upload) and unused
    manifests/ab/<digest>/<key>.json  provenance records, as locally
    actions/ab/<key>.json          the action entry, written LAST and only if absent
                                   (S3: ``If-None-Match: *``; a local path: a hard link,
                                   which fails when the name exists), so two machines
                                   publishing one key agree on one digest

Why this order: objects are content-addressed, so a duplicate upload is harmless, and
a reader trusts nothing before the action exists; an upload killed at any point leaves
no action, hence no entry.  Every download is checked against its digest before it
enters the local store.

Credentials come from where fsspec and botocore find them (environment, profiles,
``AWS_ENDPOINT_URL``); a URL is only ever printed or recorded through :func:`redact_url`,
which drops user info, query and fragment (where a secret may sit).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from weightflow.dsl.lang.diagnostics import WeightflowError

REMOTE_ENV = "WEIGHTFLOW_REMOTE"
MARKER_SUFFIX = ".files.json"
MARKER_FORMAT = 1


def redact_url(url: str) -> str:
    """``url`` without user info, query and fragment: what may be printed or recorded.

    A URL such as ``s3://KEY:SECRET@bucket/p?token=...`` must never reach a lock file,
    a manifest or a log; what remains still names the place."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable remote URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """(URL to open, storage options): ``s3://KEY:SECRET@bucket/prefix`` becomes
    ``s3://bucket/prefix`` with s3fs's ``key``/``secret`` (s3fs does not read user info
    itself); other schemes pass through (fsspec's backends parse their own URLs)."""
    parts = urlsplit(url)
    if parts.scheme not in ("s3", "s3a") or "@" not in parts.netloc:
        return url, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    key, _, secret = userinfo.partition(":")
    from urllib.parse import unquote

    options = {"key": unquote(key)} if key else {}
    if secret:
        options["secret"] = unquote(secret)
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), options


@dataclass
class Transfer:
    """What moved between the local store and the remote in this process (for tests,
    push/pull listings and benchmarks)."""

    downloads: int = 0
    download_bytes: int = 0
    uploads: int = 0
    upload_bytes: int = 0
    downloaded: list[str] = field(default_factory=list)  # digests, in order


class Remote:
    """One remote store root, opened through fsspec."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:  # pragma: no cover -- an optional extra
            raise WeightflowError("a remote store needs fsspec (and s3fs for s3://): "
                                  "pip install 'weightflow[remote]'") from None
        self.url = url
        self.display = redact_url(url)
        target, options = _split_credentials(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(target, **options)
        except (ImportError, ValueError) as exc:
            raise WeightflowError(f"cannot open the remote store {self.display}: {exc}") from None
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = protocol in ("file", "local")
        self.root = root.rstrip("/") or root
        self.transfer = Transfer()

    # -- paths -----------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def object_dir(self, digest: str) -> str:
        return self._join("objects", digest[:2], digest)

    def marker_path(self, digest: str) -> str:
        return self._join("objects", digest[:2], digest + MARKER_SUFFIX)

    def action_path(self, key: str) -> str:
        return self._join("actions", key[:2], f"{key}.json")

    def record_path(self, digest: str, key: str) -> str:
        return self._join("manifests", digest[:2], digest, f"{key}.json")

    # -- small reads and writes --------------------------------------------------
    def _read_json(self, path: str) -> dict | None:
        try:
            doc = json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return None
        except Exception as exc:  # noqa: BLE001 -- network, credentials: say so, without a traceback
            raise self.unreachable(exc) from None
        return doc if isinstance(doc, dict) else None

    def unreachable(self, exc: BaseException) -> WeightflowError:
        """A clear error for a remote that cannot be read (its URL redacted)."""
        text = str(exc).replace(self.url, self.display) or type(exc).__name__
        return WeightflowError(f"cannot read the remote store {self.display}: {text} (credentials come "
                               "from the usual places: AWS_* environment, ~/.aws profiles, AWS_ENDPOINT_URL)")

    def _mkdirs(self, path: str) -> None:
        if self.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)

    def _write(self, path: str, data: bytes) -> None:
        """Overwrite ``path``; on a local path via a temp name and a rename (never torn)."""
        self._mkdirs(path)
        if self.is_local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists: True when this call created it.

        The one conditional write the protocol needs.  Local: the bytes go to a temp file
        that is then hard-linked to the name (``link`` fails if the name exists, and the
        name never holds a partial file).  S3 (s3fs): ``PutObject`` with ``If-None-Match: *``.
        Other fsspec backends get fsspec's ``mode="create"`` (check-then-write where the
        backend has no conditional write)."""
        self._mkdirs(path)
        if self.is_local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                with suppress(OSError):
                    os.unlink(tmp)
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False

    # -- entries ---------------------------------------------------------------
    def read_action(self, key: str) -> dict | None:
        return self._read_json(self.action_path(key))

    def has(self, key: str) -> bool:
        """Whether the remote holds an action for ``key`` (one small request, no download)."""
        self.fs.invalidate_cache()  # another machine may have published since a listing
        try:
            return bool(self.fs.exists(self.action_path(key)))
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001 -- see _read_json
            raise self.unreachable(exc) from None

    def read_record(self, digest: str, key: str) -> dict | None:
        return self._read_json(self.record_path(digest, key))

    def read_marker(self, digest: str) -> dict | None:
        m = self._read_json(self.marker_path(digest))
        if m is None or m.get("digest") != digest or not isinstance(m.get("files"), dict):
            return None
        return m

    def object_size(self, digest: str) -> int:
        m = self.read_marker(digest) or {}
        return sum(int(s) for s in m.get("files", {}).values())

    def drop_marker(self, digest: str) -> None:
        """Mark object ``digest`` incomplete (found corrupt): the next publisher of its
        content uploads it again, and readers treat it as missing until then."""
        with suppress(FileNotFoundError, OSError):
            self.fs.rm_file(self.marker_path(digest))

    # -- objects ---------------------------------------------------------------
    def upload_object(self, digest: str, local_dir: Path) -> int:
        """Upload the files of ``local_dir`` as object ``digest``, then its marker; bytes sent.

        Skipped (0) when the remote already has the complete object: content-addressed,
        so its bytes are the same."""
        if self.read_marker(digest) is not None:
            return 0
        files: dict[str, int] = {}
        sent = 0
        for dirpath, _, names in os.walk(local_dir):
            for name in sorted(names):
                src = Path(dirpath) / name
                rel = src.relative_to(local_dir).as_posix()
                dst = posixpath.join(self.object_dir(digest), rel)
                self._mkdirs(dst)
                self.fs.put_file(str(src), dst)
                size = src.stat().st_size
                files[rel] = size
                sent += size
        self._write(self.marker_path(digest),
                    json.dumps({"format": MARKER_FORMAT, "digest": digest, "files": files}).encode())
        self.transfer.uploads += 1
        self.transfer.upload_bytes += sent
        return sent

    def download_object(self, digest: str, dest: Path) -> int:
        """Fetch the complete object ``digest`` into the empty directory ``dest``; bytes
        received.  Raises FileNotFoundError when the remote has no complete copy."""
        marker = self.read_marker(digest)
        if marker is None:
            raise FileNotFoundError(f"object {digest[:12]} is not (completely) in {self.display}")
        got = 0
        for rel in sorted(marker["files"]):
            if rel.startswith("/") or ".." in rel.split("/"):
                raise FileNotFoundError(f"object {digest[:12]} lists an unsafe file name {rel!r}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(posixpath.join(self.object_dir(digest), rel), str(target))
            got += target.stat().st_size
        self.transfer.downloads += 1
        self.transfer.download_bytes += got
        self.transfer.downloaded.append(digest)
        return got

    # -- listing and maintenance ---------------------------------------------------
    def _glob(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(self.fs.glob(self._join(pattern)))
        except (FileNotFoundError, OSError):
            return []

    def actions(self) -> Iterator[tuple[str, str]]:
        """(key, remote path) of every action entry."""
        for path in self._glob("actions/*/*.json"):
            yield posixpath.basename(path).removesuffix(".json"), path

    def objects(self) -> Iterator[str]:
        """Every digest that has an object directory or a marker (complete or not)."""
        seen: set[str] = set()
        for path in self._glob("objects/*/*"):
            name = posixpath.basename(path.rstrip("/")).removesuffix(MARKER_SUFFIX)
            if name not in seen:
                seen.add(name)
                yield name

    def modified(self, path: str) -> float | None:
        """The modification time of ``path`` (seconds since the epoch), or None."""
        try:
            info = self.fs.info(path)
        except (FileNotFoundError, OSError):
            return None
        for k in ("LastModified", "mtime", "last_modified", "created"):
            v = info.get(k)
            if v is None:
                continue
            if hasattr(v, "timestamp"):
                return float(v.timestamp())
            with suppress(TypeError, ValueError):
                return float(v)
        return None

    def remove_object(self, digest: str) -> None:
        """Remove an object: its marker first (so nobody trusts a half-removed object)."""
        self.drop_marker(digest)
        with suppress(FileNotFoundError, OSError):
            self.fs.rm(self.object_dir(digest), recursive=True)
        with suppress(FileNotFoundError, OSError):
            self.fs.rm(self._join("manifests", digest[:2], digest), recursive=True)

    def remove_action(self, key: str) -> None:
        with suppress(FileNotFoundError, OSError):
            self.fs.rm_file(self.action_path(key))


def collect_remote(remote: Remote, keep_keys: set[str], older_than_days: float, dry_run: bool,
                   now: float | None = None) -> dict:
    """``gc --remote``: list, then (unless ``dry_run``) remove the remote actions that no
    given lock names and that are older than ``older_than_days``, and the objects that no
    kept action references and that are older than that (an object younger than an hour
    may be mid-publish, its action not yet written)."""
    from weightflow.dsl.store.content import ORPHAN_GRACE_S, is_hex_id

    now = time.time() if now is None else now
    cutoff = now - older_than_days * 86400.0
    kept: dict[str, str] = {}
    removed: list[dict[str, Any]] = []
    for key, path in remote.actions():
        m = remote.read_action(key) or {}
        digest = m.get("digest") if is_hex_id(m.get("digest")) else None
        age = remote.modified(path)
        if digest and (key in keep_keys or age is None or age >= cutoff):
            kept[key] = digest
            continue
        removed.append({"key": key, "digest": digest, "step": m.get("step"), "pipeline": m.get("pipeline"),
                        "bytes": 0, "reason": "unused" if digest else "unreadable"})
    kept_digests = set(kept.values())
    dropped_digests = {row["digest"] for row in removed if row["digest"]}
    drop_objects: list[tuple[str, int]] = []
    for digest in remote.objects():
        if digest in kept_digests:
            continue
        if digest not in dropped_digests:  # an orphan: it may be mid-publish if young
            age = remote.modified(remote.marker_path(digest)) or remote.modified(remote.object_dir(digest))
            if age is None or age >= cutoff or age >= now - ORPHAN_GRACE_S:
                continue
        size = remote.object_size(digest)
        drop_objects.append((digest, size))
        for row in removed:
            if row["digest"] == digest:
                row["bytes"] = size
    if not dry_run:
        for row in removed:  # actions first: an entry never points at a removed object
            remote.remove_action(row["key"])
        for digest, _ in drop_objects:
            remote.remove_object(digest)
    return {"remote": remote.display, "dry_run": dry_run, "older_than_days": older_than_days,
            "removed": removed, "actions": len(removed), "objects": len(drop_objects),
            "bytes": sum(s for _, s in drop_objects), "kept_actions": len(kept),
            "kept_by_lock": sum(k in keep_keys for k in kept), "kept_objects": len(kept_digests)}


def verify_remote(remote: Remote, scope: dict[str, dict] | None, deep: bool, scratch: Path,
                  warn: Callable[[str], None]) -> dict:
    """``verify --remote``: every remote action (or those of ``scope``) names its key, has
    its provenance record and a complete object whose files have the recorded sizes;
    ``deep`` also downloads each object into ``scratch`` and re-hashes it."""
    import shutil

    from weightflow.dsl.format.checkpoint import digest_directory
    from weightflow.dsl.store.content import is_hex_id

    keys = scope if scope is not None else {key: {} for key, _ in remote.actions()}
    problems: list[dict] = []
    missing: list[dict] = []
    checked = 0
    hashed = 0
    objects_ok: dict[str, str | None] = {}
    for key, ctx in keys.items():
        base = {"key": key, "step": ctx.get("step"), "pipeline": ctx.get("pipeline"), "digest": None}
        m = remote.read_action(key) if is_hex_id(key) else None
        if m is None:
            if is_hex_id(key) and remote.has(key):
                problems.append({**base, "problem": "unreadable-action"})
                checked += 1
            elif scope is not None:
                missing.append(base)
            continue
        checked += 1
        base["step"] = m.get("step") if isinstance(m.get("step"), str) else base["step"]
        digest = m.get("digest")
        if not is_hex_id(digest):
            problems.append({**base, "problem": "unreadable-action"})
            continue
        base["digest"] = digest
        if m.get("key") != key:
            problems.append({**base, "problem": "wrong-key"})
            continue
        rec = remote.read_record(digest, key)
        if rec is None or rec.get("key") != key or rec.get("digest") != digest:
            problems.append({**base, "problem": "unrecorded"})
            continue
        if digest not in objects_ok:
            objects_ok[digest] = _object_problem(remote, digest, deep, scratch, digest_directory)
            if deep:
                hashed += remote.object_size(digest)
        why = objects_ok[digest]
        if why is not None:
            problems.append({**base, "problem": "missing-object" if why == "missing" else "corrupt-object",
                             "detail": None if why == "missing" else why})
    shutil.rmtree(scratch, ignore_errors=True)
    return {"remote": remote.display, "deep": deep, "checked": checked, "objects": len(objects_ok),
            "hashed_bytes": hashed, "problems": problems, "missing": missing, "ok": not problems}


def _object_problem(remote: Remote, digest: str, deep: bool, scratch: Path, digest_directory) -> str | None:
    """None when remote object ``digest`` looks sound; "missing", or what is wrong."""
    import shutil

    marker = remote.read_marker(digest)
    if marker is None:
        return "missing"
    for rel, size in marker["files"].items():
        try:
            got = remote.fs.info(posixpath.join(remote.object_dir(digest), rel)).get("size")
        except (FileNotFoundError, OSError):
            return f"file {rel} is missing"
        if got is not None and int(got) != int(size):
            return f"file {rel} has {got} bytes, the object recorded {size}"
    if deep:
        dest = scratch / digest
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        try:
            remote.download_object(digest, dest)
            ok = digest_directory(dest) == digest
        except Exception:  # noqa: BLE001 -- unreadable or garbled: not what it claims
            ok = False
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if not ok:
            return "its content no longer matches its digest"
    return None
