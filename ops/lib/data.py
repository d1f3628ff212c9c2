"""Reading example data files into records (torch-free; usable from preflight hooks).

Supported: ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects, or an
object holding one such list), ``.csv`` (header row), ``.parquet`` (needs pyarrow or
pandas), ``.txt`` (one example a line, as ``{"text": line}``).  ``hf:`` datasets are
refused with a clear offline message.  Errors name the file and the first bad line:
text must be UTF-8 (a bad byte is reported with its line, column and byte offset) and
JSON may nest at most ``MAX_JSON_DEPTH`` levels of ``[``/``{``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from weightflow.dsl.lang.diagnostics import OpError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")

# Examples are flat records; a line of 200,000 '[' would otherwise end in a RecursionError
# deep inside json (and anything walking the record afterwards).
MAX_JSON_DEPTH = 100

# A JSON string (skipped: brackets inside do not nest) or a bracket.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def _utf8_error(path: Path, line_no: int, line_start: int, raw: bytes, at: int) -> OpError:
    """``raw[at]`` (``raw`` starts at byte ``line_start`` of the file) is not valid UTF-8."""
    return OpError(f"{path}:{line_no}: not valid UTF-8: byte 0x{raw[at]:02x} at column {at + 1} "
                   f"(byte offset {line_start + at} in the file); save the file as UTF-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text with its line ending) of each line, decoded as strict UTF-8.

    Lines end at '\\n', '\\r\\n' or '\\r', as in Python's text mode; only the lines
    asked for are read, and a bad byte is reported where it is.
    """
    offset, number = 0, 0
    with path.open("rb") as fh:
        for chunk in fh:  # chunks end at b"\\n", so a b"\\r\\n" is never split
            for raw in chunk.splitlines(keepends=True):
                number += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _utf8_error(path, number, offset, raw, exc.start) from None
                offset += len(raw)
                yield number, text


def _line_number(text, offset: int) -> int:
    """1-based line of ``text[offset]`` (str or bytes), lines ending as in ``_lines``."""
    nl, cr, crlf = ("\n", "\r", "\r\n") if isinstance(text, str) else (b"\n", b"\r", b"\r\n")
    return text.count(nl, 0, offset) + text.count(cr, 0, offset) - text.count(crlf, 0, offset) + 1


def _decode_all(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = max(raw.rfind(b"\n", 0, exc.start), raw.rfind(b"\r", 0, exc.start)) + 1
        line_no = _line_number(raw, start)
        raise _utf8_error(path, line_no, start, raw[start:exc.start + 1], exc.start - start) from None


def read_text(path: Path) -> str:
    """A whole text file as strict UTF-8; a bad byte is an OpError naming line and offset."""
    return _decode_all(Path(path))


def _too_deep(text: str) -> int | None:
    """Character offset in ``text`` where JSON nesting first exceeds MAX_JSON_DEPTH, or None."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None  # cannot nest that deep: the common case costs two counts
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok in ("[", "{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return m.start()
        elif tok in ("]", "}"):
            depth -= 1
    return None


def _json(text: str, path: Path, line: int | None = None):
    """json.loads of a line (``line``) or of a whole file, with the nesting limit."""
    where = f"{path}:{line}" if line is not None else str(path)
    at = _too_deep(text)
    if at is not None:
        if line is None:  # a whole file: find the line
            line = _line_number(text, at)
            where = f"{path}:{line}"
        col = at - max(text.rfind("\n", 0, at), text.rfind("\r", 0, at))
        raise OpError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep at column {col} "
                      "('[' and '{' inside each other); examples must be flat records")
    try:
        return json.loads(text)
    except RecursionError:  # a fallback: _too_deep has said it unless the JSON is invalid
        raise OpError(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:
        raise OpError(f"{where}: not valid JSON ({exc})") from None


def read_records(path: Path, limit: int | None = None) -> list[dict]:  # noqa: C901
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
        for i, line in _lines(path):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            row = _json(line, path, i)
            if not isinstance(row, dict):
                raise OpError(f"{path}:{i}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    elif path.suffix == ".json":
        doc_text = _decode_all(path)

        doc = _json(doc_text, path)
        if isinstance(doc, dict):
            lists = [v for v in doc.values() if isinstance(v, list)]
            doc = lists[0] if len(lists) == 1 else doc
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise OpError(f"{path}: expected a list of objects (or an object holding one list of them)")
        rows = doc[:limit] if limit is not None else doc
    elif path.suffix == ".csv":
        at = [0]  # the line the csv module is reading

        def feed():
            for at[0], line in _lines(path):
                yield line  # with its ending: csv tells a break inside quotes from a row's end

        reader = csv.DictReader(feed())
        try:
            for row in reader:
                rows.append(dict(row))
                if limit is not None and len(rows) >= limit:
                    break
        except csv.Error as exc:
            hint = "; give long texts as .jsonl instead" if "field limit" in str(exc) else ""
            raise OpError(f"{path}:{at[0]}: cannot read CSV ({exc}){hint}") from None
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise OpError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except (ValueError, TypeError, NotImplementedError) as exc:  # pyarrow.ArrowInvalid & co.
            raise OpError(f"{path}: not a readable parquet file ({exc})") from None
        rows = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
    else:  # .txt
        for _, line in _lines(path):
            line = line.rstrip("\r\n")
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
