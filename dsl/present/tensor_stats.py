"""Summaries of stored artifacts for ``weightflow show``, read with numpy (no torch).

For a Delta: per tensor its density (nonzero fraction), L2 norm and storage
(dense, or sparse mask + values), plus the base it was taken against.  For a Model:
parameter count, dtypes, and sparsity (overall and per tensor).
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

from weightflow.dsl.format.checkpoint import read_header
from weightflow.dsl.format.sparse import MASK_SUFFIX, SPARSE_META, VALUES_SUFFIX

_NP = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _values(mm, start: int, meta: dict):
    """Stored values of one safetensors entry as float64 numpy (BF16 widened by hand)."""
    import numpy as np

    a, b = meta["data_offsets"]
    raw = np.frombuffer(mm, dtype=np.uint8, count=b - a, offset=start + a)
    if meta["dtype"] == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.view(_NP[meta["dtype"]]).astype(np.float64)


def tensor_stats(directory: Path) -> list[dict]:
    """One row per logical tensor: name, shape, dtype, storage, density, l2, stored bytes."""
    rows = []
    for f in sorted(Path(directory).glob("*.safetensors")):
        header, start = read_header(f)
        sparse = json.loads((header.get("__metadata__") or {}).get(SPARSE_META, "{}"))
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                for name, spec in sparse.items():
                    vals = _values(mm, start, header[name + VALUES_SUFFIX])
                    numel = math.prod(spec["shape"])
                    stored = sum(header[name + s]["data_offsets"][1] - header[name + s]["data_offsets"][0]
                                 for s in (MASK_SUFFIX, VALUES_SUFFIX))
                    rows.append({"name": name, "shape": spec["shape"], "dtype": spec["dtype"],
                                 "storage": "sparse", "density": (int((vals != 0).sum()) / numel) if numel else 0.0,
                                 "l2": float((vals ** 2).sum() ** 0.5), "stored_bytes": stored})
                for name, meta in header.items():
                    if name == "__metadata__" or name.split("::")[0] in sparse:
                        continue
                    a, b = meta["data_offsets"]
                    row = {"name": name, "shape": meta["shape"], "dtype": meta["dtype"], "storage": "dense",
                           "stored_bytes": b - a}
                    if meta["dtype"] in ("F64", "F32", "F16", "BF16"):
                        vals = _values(mm, start, meta)
                        row["density"] = float((vals != 0).mean()) if vals.size else 0.0
                        row["l2"] = float((vals ** 2).sum() ** 0.5)
                    rows.append(row)
            finally:
                mm.close()
    return rows


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
    dense = sum(numel[r["name"]] * {"F64": 8, "F32": 4, "I64": 8, "I32": 4}.get(r["dtype"], 2 if r["dtype"] in
                ("F16", "BF16", "I16") else 1) for r in rows)
    out = {"tensors": len(rows), "parameters": total, "dtypes": dtypes,
           "stored_bytes": stored, "dense_bytes": dense,
           "density": nonzero / float_total if float_total else None,
           "sparsity": 1 - nonzero / float_total if float_total else None,
           "per_tensor": rows}
    if kind == "Delta":
        out["l2_norm"] = sum(r.get("l2", 0.0) ** 2 for r in rows) ** 0.5
    return out
