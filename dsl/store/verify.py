"""``weightflow verify``: check that the store still holds what its entries claim.

For every entry in scope (the whole store, or the keys named by some lock files) it
checks that the action file is readable and names its own key, that its object
exists, that the object's provenance record says this key published it, and that
the object's content still hashes to its digest.

The content check normally trusts the memo: an object whose files keep the (size,
mtime, inode) they had when last verified is not re-read, so a check of a large
store takes seconds.  Corruption that keeps those (bit rot, a tool that rewrites a
file in place and restores its mtime) is only found by ``deep``, which re-reads
every byte: as slow as reading the whole store from disk.

``repair`` discards what is bad -- the action of an untrusted entry; for a corrupt
object the object and every action that points at it -- so the next run recomputes.

A check of the whole store also reads every score entry (``scores/``, evaluate's cache
of one model's values for one metric): one that is unreadable, of another format, names
another key or fails its checksum is a ``corrupt-score``; ``repair`` discards it (a run
would discard and recompute it anyway).  Lock files name reports, not scores, so a
check scoped to lock files skips them.
Torch is never imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weightflow.dsl.lang.diagnostics import WeightflowError
from weightflow.dsl.store.content import Store, is_hex_id, parse_score, tree_size

PROBLEMS = {
    "unreadable-action": "the action file is unreadable or names no valid object",
    "wrong-key": "the action file belongs to another key",
    "missing-object": "the object it points at is missing",
    "unrecorded": "the object was not published by this key",
    "corrupt-object": "the object's content no longer matches its digest",
    "corrupt-score": "the score entry is unsound",
}


def lock_scope(paths: list[str]) -> dict[str, dict]:
    """key -> {step, pipeline} for every entry of the given lock files (or pipelines)."""
    from weightflow.dsl.store import lockfile

    scope: dict[str, dict] = {}
    for item in paths:
        path = Path(item)
        if path.suffix in (".yaml", ".yml"):
            path = path.with_suffix(".lock")
        if not path.is_file():
            raise WeightflowError(f"lock file not found: {path} (run the pipeline first, or name "
                                  "its .lock file)")
        for step, e in lockfile.read(path).items():
            scope.setdefault(e.key, {"step": step, "pipeline": str(path), "digest": e.digest})
    return scope


def verify_store(store: Store, scope: dict[str, dict] | None = None, deep: bool = False,
                 repair: bool = False) -> dict:
    """Check the entries of ``store`` (all, or the keys of ``scope``); see the module doc."""
    if scope is None:
        keys: dict[str, dict] = {key: {} for key, _ in store.actions()}
    else:
        keys = scope
    problems: list[dict] = []
    missing: list[dict] = []
    by_digest: dict[str, list[dict]] = {}
    checked = 0
    for key, ctx in keys.items():
        base: dict[str, Any] = {"key": key, "step": ctx.get("step"), "pipeline": ctx.get("pipeline"),
                                "digest": None}
        if not is_hex_id(key) or not store.action_path(key).exists():
            if scope is not None:
                missing.append(base)
            continue
        checked += 1
        problem = _entry_problem(store, key, base)
        if problem is not None:
            problems.append(problem)
        else:
            by_digest.setdefault(base["digest"], []).append(base)
    hashed_bytes = 0
    for digest, rows in by_digest.items():
        if deep:
            hashed_bytes += tree_size(store.object_path(digest))
        if not store.verify_object(digest, deep=deep):
            problems.extend({**row, "problem": "corrupt-object"} for row in rows)
    scores, bad_scores = _score_problems(store) if scope is None else (0, [])
    problems += bad_scores
    for p in problems:
        p["message"] = PROBLEMS[p["problem"]] + (f" ({p['detail']})" if p.get("detail") else "")
        p.pop("detail", None)
        p["repaired"] = False
    if repair:
        _repair(store, problems)
    return {
        "store": str(store.root),
        "deep": deep,
        "checked": checked,
        "objects": len(by_digest),
        "scores": scores,
        "hashed_bytes": hashed_bytes,
        "problems": problems,
        "missing": missing,
        "ok": all(p["repaired"] for p in problems),
    }


def _entry_problem(store: Store, key: str, base: dict) -> dict | None:
    """Check the action of ``key`` (which exists), filling in ``base``'s step, pipeline and
    digest from it: its problem row, or None when all but the content check pass."""
    m = store.read_action(key)
    if m is not None:
        base["step"] = m.get("step") if isinstance(m.get("step"), str) else base["step"]
        base["pipeline"] = m.get("pipeline") if isinstance(m.get("pipeline"), str) else base["pipeline"]
    digest = m.get("digest") if m is not None else None
    if m is None or not is_hex_id(digest):
        return {**base, "problem": "unreadable-action"}
    base["digest"] = digest
    if m.get("key") != key:
        return {**base, "problem": "wrong-key", "detail": f"it names key {str(m.get('key'))[:12]}"}
    if not store.object_path(digest).is_dir():
        return {**base, "problem": "missing-object"}
    why = store.provenance_problem(key, digest, m)
    if why:
        return {**base, "problem": "unrecorded", "detail": why}
    return None


def _score_problems(store: Store) -> tuple[int, list[dict]]:
    """(how many score entries there are, the problem rows of the unsound ones)."""
    count, rows = 0, []
    for key, path in store.scores():
        count += 1
        raw: bytes | None = None
        try:
            raw = path.read_bytes()
        except OSError as exc:
            why: str | None = f"it cannot be read ({exc.strerror or exc})"
        else:
            _, why = parse_score(key, raw)
        if why is not None:
            rows.append({"key": key, "step": _score_step(raw) if raw is not None else None,
                         "pipeline": None, "digest": None, "problem": "corrupt-score", "detail": why})
    return count, rows


def _score_step(raw: bytes) -> str | None:
    """The evaluate step an unsound score entry says it was computed by, where it still
    says so readably (only to name it in the problem row)."""
    try:
        step = json.loads(raw)["score"]["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, str) else None


def _repair(store: Store, problems: list[dict]) -> None:
    """Discard what ``problems`` found bad (see the module doc); mark each row repaired or not."""
    corrupt = {p["digest"] for p in problems if p["problem"] == "corrupt-object"}
    for key, _apath in list(store.actions()):  # every action pointing at a corrupt object
        m = store.read_action(key) or {}
        if m.get("digest") in corrupt:
            store.discard_action(key)
    for digest in corrupt:
        store.discard_object(digest)
    for p in problems:
        if p["problem"] == "corrupt-score":
            store.discard_score(p["key"])
            p["repaired"] = not store.score_path(p["key"]).exists()
            continue
        if p["problem"] != "corrupt-object":
            store.discard_action(p["key"])
        p["repaired"] = not store.action_path(p["key"]).exists()
