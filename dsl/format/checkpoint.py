"""Safetensors files written and digested without torch.

A checkpoint's identity is its *content*: the sorted list of (tensor name, dtype,
shape, blake3 of the bytes) plus the digests of its side files (config, tokenizer,
metadata).  Shard layout, header order and safetensors ``__metadata__`` do not count,
so re-sharding or rewriting a checkpoint does not change its digest.

``ShardedWriter`` writes a planned set of tensors into one or more shards, in any
order, hashing each tensor as it is written, so producing a checkpoint never
needs more memory than the tensor at hand and never needs a second read to hash.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from weightflow.dsl.format.dtypes import ITEMSIZE

#: Shards are cut before a tensor that would take a shard past this many bytes.
DEFAULT_SHARD_BYTES = 2 << 30
INDEX_SUFFIX = ".safetensors.index.json"
# Files in an artifact directory that are not content (they are derived from the
# tensors and their layout), so they are left out of the digest.
NON_CONTENT = {"model.safetensors.index.json", "delta.safetensors.index.json"}
_HASH_THREADS_MIN = 1 << 22  # multithreaded hashing pays off only for big buffers


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class TensorDigest:
    name: str
    dtype: str
    shape: tuple[int, ...]
    blake3: str

    def as_list(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.blake3]


def hash_bytes(buf) -> str:
    mv = memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else buf
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if len(mv) >= _HASH_THREADS_MIN else 1)
    h.update(mv)
    return h.hexdigest()


_READ_BLOCK = 1 << 24


def _hash_range(fh, start: int, length: int, h) -> None:
    """Feed ``length`` bytes from ``start`` into ``h`` through one reused 16 MB buffer.

    Plain reads, not a memory map: mapped pages of a multi-GB file would count as
    resident memory of the process for as long as the map lives.
    """
    buf = bytearray(min(_READ_BLOCK, max(length, 1)))
    view = memoryview(buf)
    fh.seek(start)
    left = length
    while left > 0:
        n = fh.readinto(view[:min(left, len(buf))])
        if not n:
            raise ValueError(f"{fh.name}: file ends {left} bytes early")
        h.update(view[:n])
        left -= n


def hash_file(path: str | os.PathLike) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as fh:
        _hash_range(fh, 0, os.path.getsize(path), h)
    return h.hexdigest()


def artifact_digest(tensors: Iterable[TensorDigest], files: dict[str, str]) -> str:
    """The content digest of an artifact from its tensor digests and side-file digests."""
    doc = {
        "tensors": sorted(t.as_list() for t in tensors),
        "files": dict(sorted(files.items())),
    }
    return blake3.blake3(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


class ShardedWriter:
    """Write the tensors of ``plan`` into ``<prefix>[-0000i-of-0000n].safetensors``.

    Headers are written first (offsets are known from the plan), then each tensor's
    bytes are written at its offset when ``write`` is called, in any order.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Sequence[TensorInfo], prefix: str = "model",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.plan = {t.name: t for t in plan}
        if len(self.plan) != len(plan):
            raise ValueError("duplicate tensor names in the write plan")
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.files: list[str] = []
        self._where: dict[str, tuple[int, int]] = {}  # name -> (shard, absolute offset)
        self._handles = []
        for i, tensors in enumerate(shards):
            fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
            off = 0
            for t in tensors:
                header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
                off += t.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            fh = open(self.out_dir / fname, "wb+")  # noqa: SIM115 (closed by close() or abort())
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            fh.truncate(start + off)
            for t in tensors:
                self._where[t.name] = (i, start + header[t.name]["data_offsets"][0])
            self.files.append(fname)
            self._handles.append(fh)
        self.digests: dict[str, TensorDigest] = {}
        self._partial: dict[str, tuple[int, Any]] = {}  # name -> (bytes written, blake3 hasher)

    def write(self, name: str, data) -> None:
        """Write one planned tensor's raw bytes (any buffer, C-contiguous)."""
        self.append(name, data)
        if name not in self.digests:
            info = self.plan[name]
            raise ValueError(f"tensor '{name}': {self._partial[name][0]} bytes, planned {info.nbytes}")

    def append(self, name: str, data) -> None:
        """Write the next part of a tensor (row chunks, in order); hashed incrementally.

        Streaming ops write big tensors in parts so memory stays at one chunk.
        """
        info = self.plan.get(name)
        if info is None:
            raise KeyError(f"tensor '{name}' is not in the write plan")
        if name in self.digests:
            raise ValueError(f"tensor '{name}' written twice")
        mv = memoryview(data).cast("B")
        done, hasher = self._partial.get(name, (0, None))
        if done + len(mv) > info.nbytes:
            raise ValueError(f"tensor '{name}': {done + len(mv)} bytes, planned {info.nbytes}")
        if hasher is None:
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if info.nbytes >= _HASH_THREADS_MIN else 1)
        shard, offset = self._where[name]
        fh = self._handles[shard]
        fh.seek(offset + done)
        fh.write(mv)
        hasher.update(mv)
        done += len(mv)
        if done == info.nbytes:
            self._partial.pop(name, None)
            self.digests[name] = TensorDigest(name, info.dtype, info.shape, hasher.hexdigest())
        else:
            self._partial[name] = (done, hasher)

    def close(self) -> list[TensorDigest]:
        """Flush and fsync every shard, write the index if sharded; return tensor digests."""
        missing = [n for n in self.plan if n not in self.digests]
        for fh in self._handles:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        self._handles = []
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. '{missing[0]}'")
        if len(self.files) > 1:
            weight_map = {name: self.files[self._where[name][0]] for name in self.plan}
            total = sum(t.nbytes for t in self.plan.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / f"{self.prefix}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2))
        return list(self.digests.values())

    def abort(self) -> None:
        for fh in self._handles:
            fh.close()
        self._handles = []


class HeaderError(ValueError):
    """A safetensors file whose header is malformed; ``detail`` says what, without the path."""

    def __init__(self, path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.detail = path, detail


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(name, m, start: int, size: int, path) -> tuple[list[int], int]:
    """One tensor's header entry checked (see check_header); its data_offsets and byte size."""
    if not isinstance(m, dict):
        raise HeaderError(path, f"tensor '{name}': entry is not an object")
    dtype, shape, offs = m.get("dtype"), m.get("shape"), m.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise HeaderError(path, f"tensor '{name}': unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(path, f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise HeaderError(path, f"tensor '{name}': data_offsets {offs!r} are not [begin, end] with "
                                "0 <= begin <= end")
    nbytes = TensorInfo(name, str(dtype), tuple(shape)).nbytes
    if offs[1] - offs[0] != nbytes:
        raise HeaderError(path, f"tensor '{name}': data_offsets {offs} span {offs[1] - offs[0]} bytes, "
                                f"but {dtype} {shape} takes {nbytes}")
    if start + offs[1] > size:
        raise HeaderError(path, f"tensor '{name}': data_offsets {offs} run past the end of the file "
                                f"({size - start} bytes of data)")
    return offs, nbytes


def check_header(header, start: int, size: int, path) -> None:
    """Refuse a header that does not describe the file: unknown dtypes, bad shapes, byte
    ranges that disagree with dtype x shape, run past the end of the file, or overlap."""
    if not isinstance(header, dict):
        raise HeaderError(path, f"header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                 for k, v in meta.items())):
        raise HeaderError(path, "__metadata__ must map strings to strings")
    ranges = []
    for name, m in header.items():
        if name == "__metadata__":
            continue
        offs, nbytes = _check_entry(name, m, start, size, path)
        if nbytes:
            ranges.append((offs[0], offs[1], name))
    ranges.sort()
    for (a0, a1, a), (b0, b1, b) in zip(ranges, ranges[1:], strict=False):
        if b0 < a1:
            raise HeaderError(path, f"tensors '{a}' {[a0, a1]} and '{b}' {[b0, b1]} overlap in the file")


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"name '{k}' appears twice")
        seen[k] = v
    return seen


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts.

    The header is checked against the file (``check_header``); a malformed one raises
    ``HeaderError`` (a ValueError) naming the file and the tensor.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise HeaderError(path, "not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise HeaderError(path, f"not a safetensors file: header length {n} runs past the end of "
                                    f"the file ({size} bytes)")
        if n > 100 << 20:
            raise HeaderError(path, f"not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(fh.read(n), object_pairs_hook=_no_duplicates)
        except ValueError as exc:  # also bad UTF-8 and repeated names
            raise HeaderError(path, f"not a safetensors file: the header is not valid JSON ({exc})") from None
    check_header(header, 8 + n, size, path)
    from weightflow.dsl.format.sparse import (
        sparse_specs,  # (sparse imports this module)
    )

    sparse_specs(header, path)
    return header, 8 + n


def list_tensors(path: str | os.PathLike) -> list[TensorInfo]:
    header, _ = read_header(path)
    return [TensorInfo(k, v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"]


def digest_safetensors(path: str | os.PathLike) -> list[TensorDigest]:
    """Hash every tensor of one safetensors file (buffered reads, bounded memory)."""
    header, start = read_header(path)
    size = os.path.getsize(path)
    out = []
    with open(path, "rb") as fh:
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            if start + b > size:
                raise ValueError(f"{path}: tensor '{name}' runs past the end of the file")
            h = blake3.blake3(max_threads=blake3.blake3.AUTO if b - a >= _HASH_THREADS_MIN else 1)
            _hash_range(fh, start + a, b - a, h)
            out.append(TensorDigest(name, meta["dtype"], tuple(meta["shape"]), h.hexdigest()))
    return out


def digest_directory(path: str | os.PathLike) -> str:
    """Recompute an artifact directory's digest from its files (used to verify)."""
    root = Path(path)
    tensors: list[TensorDigest] = []
    files: dict[str, str] = {}
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        if rel.endswith(".safetensors"):
            tensors.extend(digest_safetensors(f))
        elif rel not in NON_CONTENT and not rel.endswith(INDEX_SUFFIX):
            files[rel] = hash_file(f)
    return artifact_digest(tensors, files)


def side_file_digests(root: str | os.PathLike) -> dict[str, str]:
    """Digests of the non-tensor content files of an artifact directory."""
    root = Path(root)
    out = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and not rel.endswith(".safetensors") and rel not in NON_CONTENT \
                and not rel.endswith(INDEX_SUFFIX):
            out[rel] = hash_file(f)
    return out
