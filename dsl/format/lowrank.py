"""Delta tensors stored as LoRA factors: ``Δ ≈ B @ A``, expanded to dense on read.

``extract-lora`` stores each factored tensor ``W`` (logical shape ``[out, in]``) as two
float32 tensors in the delta's safetensors file, ``W::lora_A`` (``[r, in]``) and
``W::lora_B`` (``[out, r]``); the file's ``__metadata__`` key ``weightflow.lowrank``
lists ``{"W": {"dtype": "F32", "shape": [out, in], "rank": r}}`` for the tensors of that
file (both factors of a tensor always share a file).  A rank-r tensor takes
``r·(out + in)`` values instead of ``out·in``.

This module is the only place that knows the encoding: ``lowrank_tensors`` (the header,
checked) and ``LowRankTensor.dense``, which rebuilds dense element ranges for
``ops.lib.tensors.Checkpoint`` and dense exports, so no op sees the factors.

The product is formed in a fixed order -- ``Σ_k B[i,k]·A[k,j]`` accumulated over
``k = 0..r-1`` in float64, then rounded to float32 -- with elementwise numpy operations,
not a BLAS matrix product, whose summation order depends on the CPU and thread count:
the dense view of a stored delta is the same bytes on every machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from weightflow.dsl.format.checkpoint import HeaderError

LOWRANK_META = "weightflow.lowrank"
A_SUFFIX = "::lora_A"
B_SUFFIX = "::lora_B"
FACTOR_DTYPE = "F32"


def metadata_specs(header: dict, key: str, path) -> dict[str, dict]:
    """The JSON object under ``__metadata__[key]`` of a safetensors header ({} when absent),
    each entry an object; ``HeaderError`` otherwise."""
    raw = (header.get("__metadata__") or {}).get(key)
    if raw is None:
        return {}
    try:
        specs = json.loads(raw)
    except ValueError as exc:
        raise HeaderError(path, f"__metadata__ '{key}' is not valid JSON ({exc})") from None
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        raise HeaderError(path, f"__metadata__ '{key}' is not a JSON object of objects")
    return specs


def check_shape(shape, what: str, path) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise HeaderError(path, f"{what}: shape {shape!r} is not a list of non-negative integers")
    return tuple(shape)


def stored_part(header: dict, name: str, dtype: str | tuple[str, ...], shape: list[int], what: str, path) -> dict:
    """The header entry of stored tensor ``name``, which must have ``dtype`` and ``shape``."""
    meta = header.get(name)
    if not isinstance(meta, dict):
        raise HeaderError(path, f"{what}: the file has no '{name}' tensor")
    dtypes = (dtype,) if isinstance(dtype, str) else dtype
    if meta.get("dtype") not in dtypes or meta.get("shape") != shape:
        raise HeaderError(path, f"{what}: '{name}' is {meta.get('dtype')} {meta.get('shape')}; expected "
                                f"{' or '.join(dtypes)} {shape}")
    return meta


@dataclass(frozen=True)
class LowRankTensor:
    """Where one factored tensor's A and B lie in its file (absolute byte offsets)."""

    name: str
    shape: tuple[int, int]
    rank: int
    file: Path
    a_offset: int
    b_offset: int
    dtype: str = FACTOR_DTYPE  # the logical (dense) dtype

    @property
    def parts(self) -> tuple[str, str]:
        return self.name + A_SUFFIX, self.name + B_SUFFIX

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def stored_bytes(self) -> int:
        return 4 * self.rank * (self.shape[0] + self.shape[1])

    @property
    def storage(self) -> str:
        """How ``weightflow show`` names the encoding."""
        return f"lora r={self.rank}"

    def factors(self, read, lo: int = 0, hi: int | None = None):
        """(A, rows ``lo:hi`` of B) as float32 numpy arrays."""
        import numpy as np

        out, inp = self.shape
        hi = out if hi is None else hi
        r = self.rank
        a = np.frombuffer(read(self.a_offset, 4 * r * inp), dtype=np.float32).reshape(r, inp)
        b = np.frombuffer(read(self.b_offset + 4 * lo * r, 4 * (hi - lo) * r), dtype=np.float32).reshape(hi - lo, r)
        return a, b

    def dense(self, read, s: int, e: int):
        """Elements ``[s, e)`` of the flat dense tensor ``B @ A``, float32 (numpy)."""
        import numpy as np

        inp = self.shape[1]
        if e <= s or inp == 0:
            return np.zeros(max(e - s, 0), dtype=np.float32)
        lo, hi = s // inp, (e + inp - 1) // inp
        rows = product(*self.factors(read, lo, hi)[::-1])
        return rows.reshape(-1)[s - lo * inp: e - lo * inp].copy()


def product(b, a):
    """``b @ a`` (float32 in, float32 out), summed over the rank in a fixed order in float64."""
    import numpy as np

    out = np.zeros((b.shape[0], a.shape[1]), dtype=np.float64)
    for k in range(a.shape[0]):
        out += b[:, k:k + 1].astype(np.float64) * a[k].astype(np.float64)
    return out.astype(np.float32)


def lowrank_tensors(header: dict, start: int, path) -> dict[str, LowRankTensor]:
    """The factored tensors of a safetensors file (``read_header``'s header and data start),
    each checked against its two factor tensors; ``HeaderError`` naming the tensor."""
    out = {}
    for name, spec in metadata_specs(header, LOWRANK_META, path).items():
        what = f"low-rank tensor '{name}'"
        shape = check_shape(spec.get("shape"), what, path)
        rank = spec.get("rank")
        if len(shape) != 2 or spec.get("dtype") != FACTOR_DTYPE:
            raise HeaderError(path, f"{what}: expected dtype {FACTOR_DTYPE} and a 2-D shape, got "
                                    f"{spec.get('dtype')} {list(shape)}")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= min(shape):
            raise HeaderError(path, f"{what}: rank {rank!r} is not an integer in [0, {min(shape)}]")
        if name in header:
            raise HeaderError(path, f"{what} is also stored as a dense tensor")
        a = stored_part(header, name + A_SUFFIX, FACTOR_DTYPE, [rank, shape[1]], what, path)
        b = stored_part(header, name + B_SUFFIX, FACTOR_DTYPE, [shape[0], rank], what, path)
        out[name] = LowRankTensor(name, (shape[0], shape[1]), rank, Path(path),
                                  start + a["data_offsets"][0], start + b["data_offsets"][0])
    return out


def encode(name: str, a, b) -> tuple[list[tuple[str, str, list[int], bytes]], dict]:
    """The stored parts (name, dtype, shape, bytes) and the metadata entry of ``Δ = b @ a``
    (``a``: [r, in], ``b``: [out, r], float32 numpy arrays), for ``DeltaWriter.append_encoded``."""
    import numpy as np

    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    r, inp = a.shape
    out = b.shape[0]
    if b.shape[1] != r:
        raise ValueError(f"tensor '{name}': B is {list(b.shape)} but A is {list(a.shape)}")
    parts = [(name + A_SUFFIX, FACTOR_DTYPE, [r, inp], a.tobytes()),
             (name + B_SUFFIX, FACTOR_DTYPE, [out, r], b.tobytes())]
    return parts, {"dtype": FACTOR_DTYPE, "shape": [out, inp], "rank": r}
