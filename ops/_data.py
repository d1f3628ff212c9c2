"""Reading example data files into records (torch-free; usable from preflight hooks).

Supported: ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects, or an
object holding one such list), ``.csv`` (header row), ``.parquet`` (needs pyarrow or
pandas), ``.txt`` (one example a line, as ``{"text": line}``).  ``hf:`` datasets are
refused with a clear offline message.  Errors name the file and the first bad line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from weightflow.dsl.diagnostics import OpError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def read_records(path: Path, limit: int | None = None) -> list[dict]:
    """The examples of a data file as dicts (first ``limit`` only, when given)."""
    path = Path(path)
    text = str(path)
    if text.startswith("hf:"):
        raise OpError(f"{text}: hub datasets cannot be fetched here (offline); export the split to a local "
                      ".jsonl/.csv/.parquet file and point the pipeline at it")
    if path.suffix not in SUFFIXES:
        raise OpError(f"{path}: unsupported data format '{path.suffix}'; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise OpError(f"data file not found: {path}")
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise OpError(f"{path}:{i}: not valid JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise OpError(f"{path}:{i}: each line must be a JSON object, got {type(row).__name__}")
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    elif path.suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise OpError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(doc, dict):
            lists = [v for v in doc.values() if isinstance(v, list)]
            doc = lists[0] if len(lists) == 1 else doc
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise OpError(f"{path}: expected a list of objects (or an object holding one list of them)")
        rows = doc[:limit] if limit is not None else doc
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append(dict(row))
                if limit is not None and len(rows) >= limit:
                    break
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise OpError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        rows = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
    else:  # .txt
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if line.strip():
                    rows.append({"text": line})
                    if limit is not None and len(rows) >= limit:
                        break
    if not rows:
        raise OpError(f"{path}: no examples in the file")
    return rows


def require_fields(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Fail naming the field, the file and the first example (line) that lacks it."""
    for field in fields:
        for i, row in enumerate(rows, 1):
            if field not in row or row[field] is None:
                where = f"line {i}" if Path(path).suffix in (".jsonl", ".txt") else f"example {i}"
                known = ", ".join(sorted(map(str, row))) or "none"
                raise OpError(f"{path}: {where} has no field '{field}' (fields there: {known})")
