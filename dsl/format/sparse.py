"""Delta storage that picks sparse or dense per tensor, automatically.

A DARE-pruned or TIES-trimmed delta is mostly exact zeros.  Such a tensor ``W`` is
stored inside the safetensors file as two tensors, ``W::mask`` (U8, the nonzero
pattern packed 8 elements a byte, little-endian bit order) and ``W::values`` (the
nonzero values in row-major order), and the file's ``__metadata__`` key
``weightflow.sparse`` lists the logical dtype and shape of every such tensor.  At
density 0.1 a float32 tensor takes 1/32 + 0.1 ≈ 13% of its dense size.  Readers
(``ops.lib.tensors.Checkpoint``) rebuild dense row chunks, so no op sees the encoding.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import blake3

from weightflow.dsl.format.checkpoint import (
    ITEMSIZE,
    HeaderError,
    TensorDigest,
    TensorInfo,
)

SPARSE_META = "weightflow.sparse"
MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"
SPARSE_BELOW = 0.75  # store sparse when that takes under 75% of the dense bytes
_CHUNK = 1 << 22     # elements per conversion step (a multiple of 8: whole mask bytes)
_NP_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# Logical dtypes a sparse tensor may have (those the readers decode).
SPARSE_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


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
        mask, values = header.get(name + MASK_SUFFIX), header.get(name + VALUES_SUFFIX)
        for part, m in ((MASK_SUFFIX, mask), (VALUES_SUFFIX, values)):
            if not isinstance(m, dict):
                raise HeaderError(path, f"{what}: the file has no '{name}{part}' tensor")
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
    return specs


@dataclass
class _Segment:
    name: str       # stored tensor name
    dtype: str
    shape: tuple
    path: Path      # spill file with exactly its bytes


class DeltaWriter:
    """Writes a planned set of tensors, each dense or sparse, into sharded safetensors."""

    def __init__(self, out_dir: str | os.PathLike, plan: Sequence[TensorInfo], prefix: str = "delta",
                 max_shard_bytes: int = 2 << 30):
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
        self.digests: dict[str, TensorDigest] = {}
        self.files: list[str] = []

    def append(self, name: str, data) -> None:
        """Append the next row chunk of tensor ``name`` (a numpy array or CPU torch tensor)."""
        import numpy as np

        info = self.plan[name]
        arr = np.ascontiguousarray(np.asarray(data)).reshape(-1)
        if arr.dtype != np.dtype(_NP_DTYPES[info.dtype]):
            raise ValueError(f"tensor '{name}': got {arr.dtype}, planned {info.dtype}")
        if name in self._segments:
            raise ValueError(f"tensor '{name}' written twice")
        fh, done, nnz = self._open.get(name) or (open(self._spill / f"{len(self._open) + len(self._segments)}.dense", "wb+"), 0, 0)
        fh.write(arr.tobytes() if arr.size else b"")
        done += arr.size
        nnz += int(np.count_nonzero(arr))
        numel = _numel(info.shape)
        if done > numel:
            raise ValueError(f"tensor '{name}': {done} elements, planned {numel}")
        if done == numel:
            self._open.pop(name, None)
            self._finish(name, fh, nnz)
        else:
            self._open[name] = (fh, done, nnz)

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
        dtype = np.dtype(_NP_DTYPES[info.dtype])
        with open(mask_path, "wb") as mf, open(values_path, "wb") as vf:
            while True:
                raw = fh.read(_CHUNK * item)
                if not raw:
                    break
                arr = np.frombuffer(raw, dtype=dtype)
                nz = arr != 0
                mf.write(np.packbits(nz, bitorder="little").tobytes())
                vf.write(arr[nz].tobytes())
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
        shards: list[list[_Segment]] = [[]]
        size = 0
        for s in segments:
            n = s.path.stat().st_size
            if shards[-1] and size + n > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += n
        count = len(shards)
        weight_map = {}
        for i, group in enumerate(shards):
            fname = f"{self.prefix}.safetensors" if count == 1 else \
                f"{self.prefix}-{i + 1:05d}-of-{count:05d}.safetensors"
            names_here = {s.name.split("::")[0] for s in group}
            meta = {"format": "pt"}
            sparse_here = {k: v for k, v in self.sparse.items() if k in names_here}
            if sparse_here:
                meta[SPARSE_META] = json.dumps(sparse_here, sort_keys=True, separators=(",", ":"))
            header: dict = {"__metadata__": meta}
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
