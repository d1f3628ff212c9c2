"""Summaries of stored artifacts for ``weightflow show``, read with numpy (no torch).

For a Delta: per tensor its density (nonzero fraction), L2 norm and storage
(dense, or sparse mask + values), plus the base it was taken against.  For a Model:
parameter count, dtypes, and sparsity (overall and per tensor).
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any

from weightflow.dsl.format.checkpoint import read_header
from weightflow.dsl.format.dtypes import FLOAT_CODES, ITEMSIZE, as_float
from weightflow.dsl.format.lowrank import lowrank_tensors
from weightflow.dsl.format.quantized import quantized_tensors
from weightflow.dsl.format.sparse import SparseReader, sparse_parts, sparse_tensors


def _float64(raw, dtype: str):
    """Stored values (a buffer of ``dtype``) as float64 numpy."""
    import numpy as np

    return as_float(raw, dtype).astype(np.float64)


def tensor_stats(directory: Path) -> list[dict]:
    """One row per logical tensor: name, shape, dtype, storage, density, l2, stored bytes."""
    import numpy as np

    rows = []
    for f in sorted(Path(directory).glob("*.safetensors")):
        header, start = read_header(f)
        sparse = sparse_tensors(header, start, f)
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                def read(offset: int, n: int, mm=mm) -> bytes:
                    return mm[offset:offset + n]

                for name, st in sparse.items():
                    vals = _float64(SparseReader(st).values(read), st.dtype)
                    numel = st.numel
                    rows.append({"name": name, "shape": list(st.shape), "dtype": st.dtype,
                                 "storage": "sparse", "density": (int((vals != 0).sum()) / numel) if numel else 0.0,
                                 "l2": float((vals ** 2).sum() ** 0.5), "stored_bytes": st.stored_bytes})
                encoded: dict[str, Any] = {**lowrank_tensors(header, start, f), **quantized_tensors(header, start, f)}
                rows += [_encoded_row(et, read) for et in encoded.values()]
                parts = sparse_parts(sparse) | {p for et in encoded.values() for p in et.parts}
                for name, meta in header.items():
                    if name == "__metadata__" or name in parts:
                        continue
                    a, b = meta["data_offsets"]
                    row = {"name": name, "shape": meta["shape"], "dtype": meta["dtype"], "storage": "dense",
                           "stored_bytes": b - a}
                    if meta["dtype"] in FLOAT_CODES:
                        vals = _float64(np.frombuffer(mm, dtype=np.uint8, count=b - a, offset=start + a),
                                        meta["dtype"])
                        row["density"] = float((vals != 0).mean()) if vals.size else 0.0
                        row["l2"] = float((vals ** 2).sum() ** 0.5)
                    rows.append(row)
            finally:
                mm.close()
    return rows


def _encoded_row(et, read) -> dict:
    """A tensor stored as LoRA factors or quantized codes, decoded in bounded chunks."""
    import numpy as np

    numel = math.prod(et.shape)
    nonzero, sq = 0, 0.0
    for s in range(0, numel, 1 << 22):
        vals = et.dense(read, s, min(numel, s + (1 << 22))).astype(np.float64)
        nonzero += int(np.count_nonzero(vals))
        sq += float((vals ** 2).sum())
    return {"name": et.name, "shape": list(et.shape), "dtype": et.dtype, "storage": et.storage,
            "density": nonzero / numel if numel else 0.0, "l2": sq ** 0.5, "stored_bytes": et.stored_bytes}


def summarize(directory: Path, kind: str) -> dict:
    rows = tensor_stats(directory)
    numel = {r["name"]: math.prod(r["shape"]) for r in rows}
    total = sum(numel.values())
    floats = [r for r in rows if "density" in r]
    nonzero = sum(r["density"] * numel[r["name"]] for r in floats)
    float_total = sum(numel[r["name"]] for r in floats)
    dtypes: dict[str, int] = {}
    for r in rows:
        dtypes[r["dtype"]] = dtypes.get(r["dtype"], 0) + numel[r["name"]]
    stored = sum(r["stored_bytes"] for r in rows)
    dense = sum(numel[r["name"]] * ITEMSIZE[r["dtype"]] for r in rows)
    out = {"tensors": len(rows), "parameters": total, "dtypes": dtypes,
           "stored_bytes": stored, "dense_bytes": dense,
           "density": nonzero / float_total if float_total else None,
           "sparsity": 1 - nonzero / float_total if float_total else None,
           "per_tensor": rows}
    if kind == "Delta":
        out["l2_norm"] = sum(r.get("l2", 0.0) ** 2 for r in rows) ** 0.5
    return out
