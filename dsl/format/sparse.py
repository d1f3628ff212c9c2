"""Delta storage that picks sparse or dense per tensor, automatically.

A DARE-pruned or TIES-trimmed delta is mostly exact zeros.  Such a tensor ``W`` is
stored inside the safetensors file as two tensors, ``W::mask`` (U8, the nonzero
pattern packed 8 elements a byte, little-endian bit order) and ``W::values`` (the
nonzero values in row-major order), and the file's ``__metadata__`` key
``weightflow.sparse`` lists the logical dtype and shape of every such tensor.  At
density 0.1 a float32 tensor takes 1/32 + 0.1 ≈ 13% of its dense size.

This module is the only place that knows the encoding: ``encode``/``decode`` (numpy),
``sparse_specs``/``sparse_tensors`` (the header), and ``SparseReader``, which rebuilds
dense element ranges for ``ops.lib.tensors.Checkpoint`` (so no op sees the encoding)
and hands the stored values to ``weightflow show``.

The writer cannot know a tensor's density before it has seen all of it, so each
tensor is spilled to a temporary file while counting nonzeros; when complete it is
encoded (sparse if that is smaller than ``SPARSE_BELOW`` of dense) and the shards
are assembled at ``close``, hashing each stored tensor as it is copied.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

from weightflow.dsl.format.checkpoint import (
    DEFAULT_SHARD_BYTES,
    HeaderError,
    TensorDigest,
    TensorInfo,
)
from weightflow.dsl.format.dtypes import ITEMSIZE, READABLE, storage_dtype

SPARSE_META = "weightflow.sparse"
MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"
SPARSE_BELOW = 0.75  # store sparse when that takes under 75% of the dense bytes
_CHUNK = 1 << 22     # elements per conversion step (a multiple of 8: whole mask bytes)
_COUNT_STEP = 1 << 26  # mask bits counted per read when a reader jumps backwards

# Logical dtypes a sparse tensor may have (those the readers decode).
SPARSE_DTYPES = READABLE

# Arrays below hold a dtype's *stored bytes* (``dtypes.storage_dtype``): bfloat16 is
# its uint16 bit pattern, since numpy has no bfloat16.


def nonzero(arr, dtype: str):
    """Which elements of ``arr`` (stored bytes of ``dtype``) the mask keeps: x != 0, so
    -0.0 counts as zero for every float dtype (bfloat16 by its bit pattern)."""
    if dtype == "BF16":
        return (arr & 0x7FFF) != 0
    return arr != 0


def encode(arr, dtype: str) -> tuple[bytes, bytes]:
    """The mask and values bytes of the flat array ``arr`` (stored bytes of ``dtype``).

    Encodings of consecutive pieces concatenate to the encoding of the whole when every
    piece but the last has a multiple of 8 elements (whole mask bytes).
    """
    import numpy as np

    nz = nonzero(arr, dtype)
    return np.packbits(nz, bitorder="little").tobytes(), arr[nz].tobytes()


def decode(mask, values, numel: int, start: int = 0):
    """Dense elements ``[start, start + numel)`` from ``mask`` (packed bytes, beginning at
    the byte holding element ``start``) and their values (a numpy array, which sets
    the dtype).  ``values`` must hold exactly the set bits of that range."""
    return _fill(_unpack(mask, start, numel), values, numel)


def _unpack(mask, start: int, numel: int):
    """The mask bits of elements [start, start + numel) as bools; ``mask`` begins at the
    byte holding element ``start``."""
    import numpy as np

    first = start % 8
    return np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[first:first + numel].view(bool)


def _fill(keep, values, numel: int):
    import numpy as np

    set_bits = int(np.count_nonzero(keep))
    if keep.size != numel or set_bits != values.size:
        raise ValueError(f"{values.size} values for a mask of {keep.size} elements with {set_bits} set; "
                         f"{numel} elements expected")
    out = np.zeros(numel, dtype=values.dtype)
    out[keep] = values
    return out


def sparse_parts(specs) -> set[str]:
    """The stored tensor names (``W::mask``, ``W::values``) of the sparse tensors ``specs``."""
    return {n + suffix for n in specs for suffix in (MASK_SUFFIX, VALUES_SUFFIX)}


def _check_sparse_spec(name: str, spec, header: dict, path) -> None:
    """One ``weightflow.sparse`` entry checked against its ``::mask`` and ``::values`` tensors."""
    what = f"sparse tensor '{name}'"
    if not isinstance(spec, dict):
        raise HeaderError(path, f"{what}: its '{SPARSE_META}' entry is not an object")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if dtype not in SPARSE_DTYPES:
        raise HeaderError(path, f"{what}: dtype {dtype!r} is not one of {', '.join(SPARSE_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise HeaderError(path, f"{what}: shape {shape!r} is not a list of non-negative integers")
    if name in header:
        raise HeaderError(path, f"{what} is also stored as a dense tensor")
    stored: dict[str, dict] = {}
    for part in (MASK_SUFFIX, VALUES_SUFFIX):
        m = header.get(name + part)
        if not isinstance(m, dict):
            raise HeaderError(path, f"{what}: the file has no '{name}{part}' tensor")
        stored[part] = m
    mask, values = stored[MASK_SUFFIX], stored[VALUES_SUFFIX]
    numel = _numel(shape)
    nb = (numel + 7) // 8
    if mask.get("dtype") != "U8" or mask.get("shape") != [nb]:
        raise HeaderError(path, f"{what}: mask '{name}{MASK_SUFFIX}' is {mask.get('dtype')} "
                                f"{mask.get('shape')}; {numel} elements need U8 [{nb}] "
                                f"({nb} byte{'s' if nb != 1 else ''})")
    if values.get("dtype") != dtype:
        raise HeaderError(path, f"{what}: values '{name}{VALUES_SUFFIX}' are {values.get('dtype')}, "
                                f"but the tensor is {dtype}")
    vshape = values.get("shape")
    if not (isinstance(vshape, list) and len(vshape) == 1 and isinstance(vshape[0], int)
            and 0 <= vshape[0] <= numel):
        raise HeaderError(path, f"{what}: values '{name}{VALUES_SUFFIX}' have shape {vshape}; expected "
                                f"[count] with at most {numel} values (one per element)")


def sparse_specs(header: dict, path) -> dict[str, dict]:
    """The ``weightflow.sparse`` entries of a safetensors header, checked against the
    ``::mask`` and ``::values`` tensors they describe; ``HeaderError`` (naming the file and
    the tensor) when they do not fit.  Whether the mask's popcount equals the number of
    values is checked by the reader as it decodes (it would otherwise read every mask twice).
    """
    raw = (header.get("__metadata__") or {}).get(SPARSE_META)
    if raw is None:
        return {}
    try:
        specs = json.loads(raw)
    except ValueError as exc:
        raise HeaderError(path, f"__metadata__ '{SPARSE_META}' is not valid JSON ({exc})") from None
    if not isinstance(specs, dict):
        raise HeaderError(path, f"__metadata__ '{SPARSE_META}' is not a JSON object")
    for name, spec in specs.items():
        _check_sparse_spec(name, spec, header, path)
    return specs


@dataclass(frozen=True)
class SparseTensor:
    """Where one mask + values tensor lies in its file (absolute byte offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    mask_offset: int
    values_offset: int
    nnz: int  # stored values

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def stored_bytes(self) -> int:
        return (self.numel + 7) // 8 + self.nnz * ITEMSIZE[self.dtype]


def sparse_tensors(header: dict, start: int, path) -> dict[str, SparseTensor]:
    """The sparse tensors of a safetensors file, from its header (``read_header``'s
    header and data start), checked by ``sparse_specs``."""
    out = {}
    for name, spec in sparse_specs(header, path).items():
        mask, values = header[name + MASK_SUFFIX], header[name + VALUES_SUFFIX]
        out[name] = SparseTensor(name, spec["dtype"], tuple(spec["shape"]), Path(path),
                                 start + mask["data_offsets"][0], start + values["data_offsets"][0],
                                 values["shape"][0])
    return out


class SparseDataError(ValueError):
    """A sparse tensor whose mask sets a different number of bits than it has values."""

    def __init__(self, t: SparseTensor, detail: str):
        super().__init__(f"sparse tensor '{t.name}' in {t.file}: {detail}")
        self.tensor, self.detail = t, detail


Read = Callable[[int, int], bytes]  # (absolute offset, length) -> that many bytes of the file


class SparseReader:
    """Dense element ranges of one sparse tensor, read through ``read``.

    Sequential ranges (row chunks in order) cost one pass over the mask; a jump back
    recounts the bits before it.  The count of mask bits is checked against the number
    of values as far as the mask has been read, and in full at the end.
    """

    def __init__(self, tensor: SparseTensor):
        self.tensor = tensor
        self._cursor = (0, 0)  # (element position, nonzeros before it) of the last read

    def dense(self, read: Read, s: int, e: int):
        """Elements ``[s, e)`` of the flat tensor, as a numpy array of its stored bytes."""
        import numpy as np

        t = self.tensor
        if self._cursor[0] != s:
            self._cursor = (s, self._count_bits(read, 0, s))
        b0, b1 = s // 8, (e + 7) // 8
        keep = _unpack(read(t.mask_offset + b0, b1 - b0), s, e - s)
        k = int(np.count_nonzero(keep))
        done = self._cursor[1]
        seen = done + k
        if seen > t.nnz or (e == t.numel and seen != t.nnz):
            upto = "" if e == t.numel else f" in its first {e} elements"
            raise SparseDataError(t, f"its mask sets {seen} bits{upto} but it has {t.nnz} values")
        dtype = storage_dtype(t.dtype)
        item = ITEMSIZE[t.dtype]
        values = np.frombuffer(read(t.values_offset + done * item, k * item), dtype=dtype)
        self._cursor = (e, seen)
        return _fill(keep, values, e - s)

    def values(self, read: Read):
        """All stored values (numpy, stored bytes of the dtype), mask not consulted."""
        import numpy as np

        t = self.tensor
        return np.frombuffer(read(t.values_offset, t.nnz * ITEMSIZE[t.dtype]), dtype=storage_dtype(t.dtype))

    def _count_bits(self, read: Read, s: int, e: int) -> int:
        import numpy as np

        total, pos = 0, s
        while pos < e:
            hi = min(e, pos + _COUNT_STEP)
            b0, b1 = pos // 8, (hi + 7) // 8
            bits = np.unpackbits(np.frombuffer(read(self.tensor.mask_offset + b0, b1 - b0), np.uint8),
                                 bitorder="little")[pos - b0 * 8: pos - b0 * 8 + (hi - pos)]
            total += int(bits.sum())
            pos = hi
        return total


@dataclass
class _Segment:
    name: str       # stored tensor name
    dtype: str
    shape: tuple
    path: Path      # spill file with exactly its bytes


class DeltaWriter:
    """Writes a planned set of tensors, each dense or sparse, into sharded safetensors."""

    def __init__(self, out_dir: str | os.PathLike, plan: Sequence[TensorInfo], prefix: str = "delta",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self.plan = {t.name: t for t in plan}
        self.order = [t.name for t in plan]
        self._spill = self.out_dir / ".spill"
        self._spill.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, tuple] = {}  # name -> (file handle, elements written, nonzeros)
        self._segments: dict[str, list[_Segment]] = {}
        self.sparse: dict[str, dict] = {}
        self.encoded: dict[str, dict[str, dict]] = {}  # metadata key -> tensor -> spec (append_encoded)
        self.digests: dict[str, TensorDigest] = {}
        self.files: list[str] = []

    def append(self, name: str, data) -> None:
        """Append the next row chunk of tensor ``name`` (a numpy array or CPU torch tensor;
        for BF16 a torch bfloat16 tensor or a numpy uint16 array of its bit patterns)."""
        import numpy as np

        info = self.plan[name]
        if info.dtype == "BF16" and str(getattr(data, "dtype", "")) == "torch.bfloat16":
            import torch  # only reached with a torch tensor in hand

            data = data.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        arr = np.ascontiguousarray(np.asarray(data)).reshape(-1)
        if info.dtype not in SPARSE_DTYPES or arr.dtype != storage_dtype(info.dtype):
            raise ValueError(f"tensor '{name}': got {arr.dtype}, planned {info.dtype}")
        if name in self._segments:
            raise ValueError(f"tensor '{name}' written twice")
        spill = self._spill / f"{len(self._open) + len(self._segments)}.dense"
        fh, done, nnz = self._open.get(name) or (open(spill, "wb+"), 0, 0)  # noqa: SIM115 (closed in _finish)
        fh.write(arr.tobytes() if arr.size else b"")
        done += arr.size
        nnz += int(np.count_nonzero(nonzero(arr, info.dtype)))
        numel = _numel(info.shape)
        if done > numel:
            raise ValueError(f"tensor '{name}': {done} elements, planned {numel}")
        if done == numel:
            self._open.pop(name, None)
            self._finish(name, fh, nnz)
        else:
            self._open[name] = (fh, done, nnz)

    def append_encoded(self, name: str, parts, meta_key: str, spec: dict) -> None:
        """Store planned tensor ``name`` whole, as parts another encoding made
        (``[(stored name, dtype, shape, bytes)]``, e.g. ``W::lora_A``), described by ``spec``
        under ``__metadata__[meta_key]`` of the shard that holds them (all in one shard):
        the low-rank and quantized deltas of ``dsl/format/lowrank.py`` and ``quantized.py``."""
        if name not in self.plan:
            raise ValueError(f"tensor '{name}' is not planned")
        if name in self._segments or name in self._open:
            raise ValueError(f"tensor '{name}' written twice")
        segments = []
        for i, (stored, dtype, shape, data) in enumerate(parts):
            path = self._spill / f"{len(self._open) + len(self._segments)}.part{i}"
            path.write_bytes(data)
            segments.append(_Segment(stored, dtype, tuple(shape), path))
        self._segments[name] = segments
        self.encoded.setdefault(meta_key, {})[name] = spec

    def _finish(self, name: str, fh, nnz: int) -> None:
        import numpy as np

        info = self.plan[name]
        numel = _numel(info.shape)
        item = ITEMSIZE[info.dtype]
        dense_path = Path(fh.name)
        sparse_bytes = (numel + 7) // 8 + nnz * item
        if numel == 0 or sparse_bytes >= SPARSE_BELOW * numel * item:
            fh.close()
            self._segments[name] = [_Segment(name, info.dtype, info.shape, dense_path)]
            return
        mask_path = dense_path.with_suffix(".mask")
        values_path = dense_path.with_suffix(".values")
        fh.seek(0)
        dtype = storage_dtype(info.dtype)
        with open(mask_path, "wb") as mf, open(values_path, "wb") as vf:
            while True:
                raw = fh.read(_CHUNK * item)
                if not raw:
                    break
                mask, values = encode(np.frombuffer(raw, dtype=dtype), info.dtype)
                mf.write(mask)
                vf.write(values)
        fh.close()
        dense_path.unlink()
        self.sparse[name] = {"dtype": info.dtype, "shape": list(info.shape)}
        self._segments[name] = [
            _Segment(name + MASK_SUFFIX, "U8", ((numel + 7) // 8,), mask_path),
            _Segment(name + VALUES_SUFFIX, info.dtype, (nnz,), values_path),
        ]

    def close(self) -> list[TensorDigest]:
        missing = [n for n in self.order if n not in self._segments]
        if missing:
            self.abort()
            raise ValueError(f"{len(missing)} planned tensors were never completed, e.g. '{missing[0]}'")
        segments = [s for n in self.order for s in self._segments[n]]
        # a sparse tensor's mask and values always share a shard: the reader decodes one
        # tensor from one file (split, the stored delta could not be read back)
        shards: list[list[_Segment]] = [[]]
        size = 0
        for name in self.order:
            group = self._segments[name]
            n = sum(s.path.stat().st_size for s in group)
            if shards[-1] and size + n > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].extend(group)
            size += n
        count = len(shards)
        weight_map = {}
        for i, group in enumerate(shards):
            fname = f"{self.prefix}.safetensors" if count == 1 else \
                f"{self.prefix}-{i + 1:05d}-of-{count:05d}.safetensors"
            header: dict = {"__metadata__": self._metadata({s.name.split("::")[0] for s in group})}
            off = 0
            for s in group:
                n = s.path.stat().st_size
                header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + n]}
                off += n
                weight_map[s.name] = fname
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(self.out_dir / fname, "wb") as out:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                for s in group:
                    h = blake3.blake3()
                    with open(s.path, "rb") as src:
                        while True:
                            block = src.read(1 << 24)
                            if not block:
                                break
                            h.update(block)
                            out.write(block)
                    self.digests[s.name] = TensorDigest(s.name, s.dtype, tuple(s.shape), h.hexdigest())
                out.flush()
                os.fsync(out.fileno())
            self.files.append(fname)
        if count > 1:
            index = {"metadata": {"total_size": sum(s.path.stat().st_size for s in segments)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        shutil.rmtree(self._spill, ignore_errors=True)
        return list(self.digests.values())

    def _metadata(self, names_here: set[str]) -> dict[str, str]:
        """A shard's ``__metadata__``: the sparse (and other encodings') entries of its tensors."""
        meta = {"format": "pt"}
        for key, specs in sorted({SPARSE_META: self.sparse, **self.encoded}.items()):
            here = {k: v for k, v in specs.items() if k in names_here}
            if here:
                meta[key] = json.dumps(here, sort_keys=True, separators=(",", ":"))
        return meta

    def abort(self) -> None:
        for fh, _, _ in self._open.values():
            fh.close()
        self._open.clear()
        if self._spill.exists() and not self.files:
            shutil.rmtree(self._spill, ignore_errors=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
