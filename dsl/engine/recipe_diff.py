"""What changed between two key materials of one step, in words a user can act on.

A step key is the hash of its material (``engine.keys.key_material``): the op and its
version, the params with every step reference replaced by ``{"input": digest}`` and every
data file by ``{"file": digest}``, and the op's fingerprint of external inputs.  When a
key differs from the lock's, ``run --frozen`` used to say only "would change"; comparing
the material the lock's entry was made from (its manifest keeps it as ``recipe``) with
today's names the parameter, input or file that changed.
"""

from __future__ import annotations

import json
import re
from typing import Any

_DIGEST = re.compile(r"^[0-9a-f]{32,}$")
MAX_CHANGES = 6  # a message, not a dump: the rest is summarised as "and N more"


def _leaf(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"input"}:
        return f"output {str(value['input'])[:12]}"
    if isinstance(value, dict) and set(value) == {"file"}:
        return f"content {str(value['file'])[:12]}"
    if isinstance(value, str) and _DIGEST.match(value):
        return value[:12]  # a file or commit digest: its prefix identifies it
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _walk(old: Any, new: Any, path: tuple, out: list[tuple[tuple, Any, Any]]) -> None:
    """Every place where ``old`` and ``new`` differ, as (path, old value, new value);
    a missing side is ``...`` (Ellipsis), which no JSON value can be."""
    if old == new:
        return
    wrapped = isinstance(old, dict) and len(old) == 1 and set(old) & {"input", "file"}
    if isinstance(old, dict) and isinstance(new, dict) and not wrapped:
        for k in list(old) + [k for k in new if k not in old]:
            _walk(old.get(k, ...), new.get(k, ...), path + (k,), out)
        return
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _walk(a, b, path + (i,), out)
        return
    out.append((path, old, new))


def _dotted(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def describe_changes(old: dict, new: dict, input_names: dict[tuple, str] | None = None,
                     file_names: dict[tuple, str] | None = None) -> list[str]:
    """One phrase per difference between two key materials (``old``: the locked one).

    ``input_names``: param path -> upstream step name, so an input reads "input 'base'";
    ``file_names``: param path -> the data file as the pipeline names it.
    """
    input_names = input_names or {}
    file_names = file_names or {}
    diffs: list[tuple[tuple, Any, Any]] = []
    _walk(old, new, (), diffs)
    phrases = []
    for path, a, b in diffs:
        if path[:1] == ("params",) and path[1:] in input_names:
            what = f"input '{input_names[path[1:]]}' ({_dotted(path[1:])})"
        elif path[:1] == ("params",) and path[1:] in file_names:
            what = f"data file {file_names[path[1:]]} ({_dotted(path[1:])})"
        elif path[:1] == ("params",):
            what = f"parameter {_dotted(path[1:])}"
        elif path[:1] == ("external",):
            what = f"external input {_dotted(path[1:]) or '(fingerprint)'}"
        elif path == ("version",):
            what = "op version"
        else:
            what = _dotted(path) or "recipe"
        if a is ...:
            phrases.append(f"{what} added ({_leaf(b)})")
        elif b is ...:
            phrases.append(f"{what} removed (was {_leaf(a)})")
        else:
            phrases.append(f"{what}: locked {_leaf(a)}, now {_leaf(b)}")
    if len(phrases) > MAX_CHANGES:
        phrases = phrases[:MAX_CHANGES] + [f"and {len(phrases) - MAX_CHANGES} more"]
    return phrases
