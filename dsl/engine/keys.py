"""Step keys: blake3 over the canonical JSON of everything that determines an output.

key = blake3(JSON{op, op version, validated params with defaults filled, where every
step reference is replaced by the *content digest* of that step's output, every data
file by its content digest, plus the op's fingerprint of its external inputs}).

Step names and file paths never enter a key, so renaming a step or moving a data
file re-executes nothing; keying on upstream content (not upstream recipes) gives
early cutoff: a recomputed step that produced the same bytes invalidates nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import blake3


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _set_path(doc, path: tuple, value) -> None:
    cur = doc
    for part in path[:-1]:
        cur = cur[part]
    cur[path[-1]] = value


def key_material(step, input_digests: dict[str, str], file_digest: Callable, external: dict | None) -> dict:
    """The JSON document whose hash is ``step``'s key.

    ``input_digests`` maps upstream step name -> output digest (all must be known).
    """
    params = copy.deepcopy(step.params_json())
    for edge in step.inputs:
        _set_path(params, edge.field, {"input": input_digests[edge.source]})
    for path, file in step.data_files.items():
        _set_path(params, path, {"file": file_digest(file)})
    for name in getattr(step.op, "key_exclude", ()) or ():
        params.pop(name, None)
    doc = {"op": step.op.name, "version": step.op.version, "params": params}
    if external:
        doc["external"] = external
    return doc


def step_key(material: dict) -> str:
    return blake3.blake3(canonical_json(material)).hexdigest()
