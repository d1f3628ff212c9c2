"""Delta tensors stored quantized (int8, or int4 packed two a byte), dequantized on read.

``quantize-delta`` stores a tensor ``W`` as

- ``W::codes`` (U8): one unsigned code ``u`` per stored value, in row-major order; with
  4 bits two codes a byte, the first in the low nibble;
- ``W::scales`` (F16 or F32): one scale ``s`` per group;
- ``W::zeros`` (U8, asymmetric only): one zero point ``z`` per group (symmetric
  quantization has the fixed ``z = 2^(bits-1)``);
- ``W::qmask`` (U8, masked tensors only): the nonzero pattern, packed 8 elements a byte
  in little-endian bit order exactly like the sparse bitmask (``dsl/format/sparse.py``);
  only the kept values have codes.  A DARE-pruned delta keeps its mask this way.

and the file's ``__metadata__`` key ``weightflow.quantized`` gives each such tensor's
``dtype`` (F32), ``shape``, ``bits``, ``group_size``, ``symmetric``, ``masked`` and
``count`` (stored values).  A value dequantizes to ``(u − z)·s``, computed in float32.

Groups: ``group_size: null`` gives one group per output channel (row of a tensor of
two or more dimensions; a 1-D or 0-D tensor is one group), which in a masked tensor
holds that row's kept values; ``group_size: g`` cuts the sequence of stored values into
runs of ``g`` (the last may be shorter).  With ``g`` dividing a row's length and no
mask, those are the usual group-wise blocks along the input dimension.

Quantization (``quantize``), per group, with ``n = 2^bits``:

- symmetric: ``s = max|x| / (n/2 − 1)``, ``u = clip(round(x/s), −(n/2 − 1), n/2 − 1) + n/2``;
- asymmetric: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = (hi − lo)/(n − 1)``,
  ``z = clip(round(−lo/s), 0, n − 1)``, ``u = clip(round(x/s) + z, 0, n − 1)``;

``round`` is to nearest, ties to even, and ``x/s`` uses the scale as stored.  A group
whose values are all zero has ``s = 0``.  Scales are float16 unless a tensor's scales
fall outside float16's normal range (about 6.1e-5 to 65504: tiny deltas), in which case
that tensor's scales are float32 (the header says which).

This module is the only place that knows the encoding: ``quantize`` (numpy, whole
tensor), ``quantized_tensors`` (the header, checked) and ``QuantizedTensor.dense``,
which rebuilds dense element ranges for ``ops.lib.tensors.Checkpoint`` and dense
exports, so no op sees the codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from weightflow.dsl.format.checkpoint import HeaderError
from weightflow.dsl.format.lowrank import check_shape, metadata_specs, stored_part

QUANT_META = "weightflow.quantized"
CODES_SUFFIX = "::codes"
SCALES_SUFFIX = "::scales"
ZEROS_SUFFIX = "::zeros"
MASK_SUFFIX = "::qmask"
BITS = (4, 8)
SCALE_DTYPES = {"float16": "F16", "float32": "F32"}
_F16_NORMAL = (2.0 ** -14, 65504.0)


def code_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits."""
    return count if bits == 8 else (count + 1) // 2


def rows_of(shape) -> tuple[int, int]:
    """(rows, elements per row) of the per-channel grouping."""
    numel = 1
    for d in shape:
        numel *= d
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def group_count(shape, group_size: int | None, count: int) -> int:
    return rows_of(shape)[0] if group_size is None else -(-count // group_size)


def pack(codes, bits: int):
    """Codes (uint8 numpy) as stored bytes: as is for 8 bits, two a byte (low nibble first) for 4."""
    import numpy as np

    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack(raw, bits: int, first: int, count: int):
    """``count`` codes starting at code ``first`` from ``raw`` (the stored bytes beginning at
    the byte holding code ``first``)."""
    import numpy as np

    data = np.frombuffer(raw, dtype=np.uint8)
    if bits == 8:
        return data[:count]
    both = np.empty(data.size * 2, dtype=np.uint8)
    both[0::2] = data & 0x0F
    both[1::2] = data >> 4
    off = first % 2
    return both[off:off + count]


def dequantize(codes, zeros, scales):
    """``(u − z)·s`` in float32, elementwise (``zeros`` and ``scales`` already per value)."""
    import numpy as np

    return (codes.astype(np.float32) - np.asarray(zeros).astype(np.float32)) * np.asarray(scales).astype(np.float32)


@dataclass
class Quantized:
    """One tensor quantized: its stored parts and metadata entry, and how far the values it
    reads back are from the input (``max_error``, ``sq_error`` = ‖x − x̂‖², ``sq_norm`` = ‖x‖²)."""

    parts: list[tuple[str, str, list[int], bytes]]
    spec: dict
    max_error: float = 0.0
    sq_error: float = 0.0
    sq_norm: float = 0.0

    @property
    def stored_bytes(self) -> int:
        return sum(len(p[3]) for p in self.parts)

    @property
    def scale_dtype(self) -> str:
        return next(p[1] for p in self.parts if p[0].endswith(SCALES_SUFFIX))

    @property
    def relative_error(self) -> float:
        return (self.sq_error / self.sq_norm) ** 0.5 if self.sq_norm else 0.0


_SLICE = 1 << 22  # values quantized per step: float64 temporaries stay at tens of MB


def _bounds(keep, shape, group_size: int | None, count: int, masked: bool):
    """Where each group's stored values begin and end: ``bounds[g]:bounds[g + 1]``."""
    import numpy as np

    if group_size is not None:
        n = group_count(shape, group_size, count)
        return np.minimum(np.arange(n + 1, dtype=np.int64) * group_size, count)
    rows, per_row = rows_of(shape)
    if not masked or rows == 0:
        return np.arange(rows + 1, dtype=np.int64) * per_row
    per = np.count_nonzero(keep.reshape(rows, per_row), axis=1)
    return np.concatenate([[0], np.cumsum(per)]).astype(np.int64)


def _slices(bounds, step: int = _SLICE):
    """Runs of whole groups ``(g0, g1)`` holding about ``step`` values each (at least one group)."""
    import numpy as np

    g0, n = 0, len(bounds) - 1
    while g0 < n:
        g1 = int(np.searchsorted(bounds, bounds[g0] + step, side="right")) - 1
        g1 = min(n, max(g0 + 1, g1))
        yield g0, g1
        g0 = g1


def _group_ids(bounds, g0: int, g1: int):
    """The group (counted from ``g0``) of each value of groups ``g0:g1``."""
    import numpy as np

    return np.repeat(np.arange(g1 - g0), np.diff(bounds[g0:g1 + 1]))


def _scales(values, bounds, bits: int, symmetric: bool, scale_dtype: str):
    """(stored scale dtype, scales, zero points) of each group: from its largest magnitude
    (symmetric) or its range including 0 (asymmetric); see the module docstring."""
    import numpy as np

    n_groups = len(bounds) - 1
    hi, lo = np.zeros(n_groups), np.zeros(n_groups)
    for g0, g1 in _slices(bounds):
        v = values[bounds[g0]:bounds[g1]].astype(np.float64)
        starts = bounds[g0:g1] - bounds[g0]
        filled = np.diff(bounds[g0:g1 + 1]) > 0
        if filled.any():
            hi[g0:g1][filled] = np.maximum.reduceat(v, starts[filled])
            lo[g0:g1][filled] = np.minimum.reduceat(v, starts[filled])
    levels = 1 << bits
    if symmetric:
        raw = np.maximum(np.abs(hi), np.abs(lo)) / (levels // 2 - 1)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        raw = (hi - lo) / (levels - 1)
    sdtype = SCALE_DTYPES[scale_dtype]
    nz = raw[raw > 0]
    if sdtype == "F16" and nz.size and (nz.min() < _F16_NORMAL[0] or nz.max() > _F16_NORMAL[1]):
        sdtype = "F32"
    scales = raw.astype(np.float16 if sdtype == "F16" else np.float32)
    s = scales.astype(np.float64)
    if symmetric:
        zero = np.full(n_groups, levels // 2, dtype=np.int64)
    else:
        zero = np.where(s > 0, np.clip(np.rint(-lo / np.where(s > 0, s, 1.0)), 0, levels - 1), 0).astype(np.int64)
    return sdtype, scales, zero


def quantize(name: str, x, shape, bits: int, group_size: int | None = None, symmetric: bool = True,
             scale_dtype: str = "float16", masked: bool | None = None) -> Quantized:
    """Quantize the flat float32 numpy array ``x`` (tensor ``name`` of ``shape``).

    ``masked``: store the nonzero pattern and code only the nonzeros (None: when that is
    smaller).  See the module docstring for the formulas.  Two passes over runs of whole
    groups (ranges, then codes), so besides ``x`` it holds about 2.5 bytes per element
    (mask, codes, packed codes) and float64 temporaries of a few million values.
    """
    import numpy as np

    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    numel = x.size
    keep = x != 0
    nnz = int(np.count_nonzero(keep))
    if masked is None:
        masked = (numel + 7) // 8 + code_bytes(nnz, bits) < code_bytes(numel, bits)
    values = x[keep] if masked else x
    count = values.size
    bounds = _bounds(keep, shape, group_size, count, bool(masked))
    n_groups = len(bounds) - 1
    sdtype, scales, zero = _scales(values, bounds, bits, symmetric, scale_dtype)
    s = scales.astype(np.float64)
    safe = np.where(s > 0, s, 1.0)
    levels = 1 << bits
    half = levels // 2
    codes = np.empty(count, dtype=np.uint8)
    out = Quantized([], {})
    for g0, g1 in _slices(bounds):
        a, b = bounds[g0], bounds[g1]
        gid = g0 + _group_ids(bounds, g0, g1)
        v = values[a:b].astype(np.float64)
        scaled = np.where(s[gid] > 0, np.rint(v / safe[gid]), 0.0)
        if symmetric:
            codes[a:b] = np.clip(scaled, -(half - 1), half - 1) + half
        else:
            codes[a:b] = np.clip(scaled + zero[gid], 0, levels - 1)
        err = dequantize(codes[a:b], zero[gid], scales[gid]).astype(np.float64) - v
        if err.size:
            out.max_error = max(out.max_error, float(np.abs(err).max()))
        out.sq_error += float(err @ err)
        out.sq_norm += float(v @ v)
    out.parts = [(name + CODES_SUFFIX, "U8", [code_bytes(count, bits)], pack(codes, bits).tobytes()),
                 (name + SCALES_SUFFIX, sdtype, [n_groups], scales.tobytes())]
    if not symmetric:
        out.parts.append((name + ZEROS_SUFFIX, "U8", [n_groups], zero.astype(np.uint8).tobytes()))
    if masked:
        out.parts.append((name + MASK_SUFFIX, "U8", [(numel + 7) // 8],
                          np.packbits(keep, bitorder="little").tobytes()))
    out.spec = {"dtype": "F32", "shape": list(shape), "bits": bits, "group_size": group_size,
                "symmetric": symmetric, "masked": bool(masked), "count": count}
    return out


class QuantizedDataError(ValueError):
    """A quantized tensor whose mask sets a different number of bits than it has codes."""


@dataclass
class QuantizedTensor:
    """Where one quantized tensor's parts lie in its file (absolute byte offsets)."""

    name: str
    shape: tuple[int, ...]
    bits: int
    group_size: int | None
    symmetric: bool
    count: int
    file: Path
    codes_offset: int
    scales_offset: int
    scale_dtype: str
    zeros_offset: int | None = None
    mask_offset: int | None = None
    dtype: str = "F32"  # the logical (dense) dtype
    _cursor: tuple[int, int] = field(default=(0, 0), repr=False)  # (element, values before it)

    @property
    def masked(self) -> bool:
        return self.mask_offset is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def groups(self) -> int:
        return group_count(self.shape, self.group_size, self.count)

    @property
    def parts(self) -> tuple[str, ...]:
        out = [self.name + CODES_SUFFIX, self.name + SCALES_SUFFIX]
        out += [self.name + ZEROS_SUFFIX] if not self.symmetric else []
        out += [self.name + MASK_SUFFIX] if self.masked else []
        return tuple(out)

    @property
    def stored_bytes(self) -> int:
        item = 2 if self.scale_dtype == "F16" else 4
        return (code_bytes(self.count, self.bits) + self.groups * (item + (0 if self.symmetric else 1))
                + ((self.numel + 7) // 8 if self.masked else 0))

    @property
    def storage(self) -> str:
        """How ``weightflow show`` names the encoding: ``int4 g64``, ``int8 row+mask``, ..."""
        groups = f"g{self.group_size}" if self.group_size else "row"
        return f"int{self.bits} {groups}" + ("" if self.symmetric else " asym") + ("+mask" if self.masked else "")

    def dense(self, read, s: int, e: int):
        """Elements ``[s, e)`` of the flat dequantized tensor, float32 (numpy)."""
        import numpy as np

        if e <= s:
            return np.zeros(0, dtype=np.float32)
        if self.mask_offset is not None:
            if self._cursor[0] != s:
                self._cursor = (s, self._bits_before(read, s))
            done = self._cursor[1]
            keep = _mask_bits(read(self.mask_offset + s // 8, (e + 7) // 8 - s // 8), s, e - s)
            k = int(np.count_nonzero(keep))
            if done + k > self.count or (e == self.numel and done + k != self.count):
                raise QuantizedDataError(f"its mask sets {done + k} bits in its first {e} elements but it "
                                         f"has {self.count} codes")
            positions = s + np.flatnonzero(keep)
            self._cursor = (e, done + k)
        else:
            done, k, keep, positions = s, e - s, None, np.arange(s, e)
        if k == 0:
            return np.zeros(e - s, dtype=np.float32)
        c0 = done // 2 if self.bits == 4 else done
        codes = unpack(read(self.codes_offset + c0, code_bytes(done + k, self.bits) - c0), self.bits, done, k)
        if self.group_size is None:
            gid = positions // rows_of(self.shape)[1]
        else:
            gid = np.arange(done, done + k) // self.group_size
        g0, g1 = int(gid[0]), int(gid[-1]) + 1
        item = 2 if self.scale_dtype == "F16" else 4
        scales = np.frombuffer(read(self.scales_offset + g0 * item, (g1 - g0) * item),
                               dtype=np.float16 if item == 2 else np.float32)
        if self.zeros_offset is None:  # symmetric
            zeros = np.full(g1 - g0, 1 << (self.bits - 1), dtype=np.int64)
        else:
            zeros = np.frombuffer(read(self.zeros_offset + g0, g1 - g0), dtype=np.uint8).astype(np.int64)
        values = dequantize(codes, zeros[gid - g0], scales[gid - g0])
        if keep is None:
            return values
        out = np.zeros(e - s, dtype=np.float32)
        out[keep] = values
        return out

    def _bits_before(self, read, s: int) -> int:
        import numpy as np

        if s == 0 or self.mask_offset is None:
            return 0
        return int(np.count_nonzero(_mask_bits(read(self.mask_offset, (s + 7) // 8), 0, s)))


def _mask_bits(raw, start: int, numel: int):
    import numpy as np

    first = start % 8
    return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[first:first + numel].view(bool)


def _spec_int(spec: dict, key: str, what: str, path, allowed=None, nullable: bool = False):
    v = spec.get(key)
    if v is None and nullable:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or (allowed is not None and not allowed(v)):
        raise HeaderError(path, f"{what}: '{key}' is {v!r}")
    return v


def quantized_tensors(header: dict, start: int, path) -> dict[str, QuantizedTensor]:
    """The quantized tensors of a safetensors file (``read_header``'s header and data start),
    each checked against its parts; ``HeaderError`` naming the tensor."""
    out = {}
    for name, spec in metadata_specs(header, QUANT_META, path).items():
        what = f"quantized tensor '{name}'"
        shape = check_shape(spec.get("shape"), what, path)
        if spec.get("dtype") != "F32":
            raise HeaderError(path, f"{what}: dtype {spec.get('dtype')!r}; only F32 is written")
        if name in header:
            raise HeaderError(path, f"{what} is also stored as a dense tensor")
        bits = _spec_int(spec, "bits", what, path, lambda v: v in BITS)
        group_size = _spec_int(spec, "group_size", what, path, lambda v: v > 0, nullable=True)
        symmetric, masked = spec.get("symmetric"), spec.get("masked")
        if not isinstance(symmetric, bool) or not isinstance(masked, bool):
            raise HeaderError(path, f"{what}: 'symmetric' and 'masked' must be true or false")
        numel = math.prod(shape)
        count = _spec_int(spec, "count", what, path, lambda v, numel=numel: 0 <= v <= numel)
        if not masked and count != numel:
            raise HeaderError(path, f"{what}: {count} codes for {numel} elements and no mask")
        groups = group_count(shape, group_size, count)
        codes = stored_part(header, name + CODES_SUFFIX, "U8", [code_bytes(count, bits)], what, path)
        scales = stored_part(header, name + SCALES_SUFFIX, ("F16", "F32"), [groups], what, path)
        zeros = None if symmetric else stored_part(header, name + ZEROS_SUFFIX, "U8", [groups], what, path)
        mask = stored_part(header, name + MASK_SUFFIX, "U8", [(numel + 7) // 8], what, path) if masked else None
        out[name] = QuantizedTensor(
            name, shape, bits, group_size, symmetric, count, Path(path),
            start + codes["data_offsets"][0], start + scales["data_offsets"][0], scales["dtype"],
            None if zeros is None else start + zeros["data_offsets"][0],
            None if mask is None else start + mask["data_offsets"][0])
    return out
