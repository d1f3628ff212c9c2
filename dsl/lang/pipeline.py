"""YAML text -> a validated ``Pipeline``: top-level keys, vars, steps and their params.

Everything that can be checked without running a model is checked here or in
``graph.py``, and all problems are collected before reporting, each with the file,
line, column and step.  The result is plain data; nothing downstream re-reads YAML.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from weightflow.dsl.lang import registry
from weightflow.dsl.lang.diagnostics import Diagnostic, PipelineError, did_you_mean
from weightflow.dsl.lang.spec import (
    DataFile,
    Kind,
    OpSpec,
    StepRef,
    check_resources,
    field_markers,
    iter_values,
)
from weightflow.dsl.lang.yamlsource import (
    MAX_FILE_BYTES,
    Positions,
    load_yaml,
    size_problem,
)

SUPPORTED_VERSIONS = (1,)
TOP_LEVEL_KEYS = ("weightflow", "name", "description", "seed", "dtype", "vars", "steps", "outputs",
                  "verify", "reproducible", "store")
# ``store: {remote: URL}``: the remote store this pipeline's local store caches (see
# dsl/store/remote.py); ``--remote`` and $WEIGHTFLOW_REMOTE override it.  Never in a key.
STORE_KEYS = ("remote",)
# ``reproducible: strict`` pins CPU kernels, MKL's code path and the thread count so output
# bytes do not depend on the machine (engine/repro.py); ``platform`` lets torch choose.
REPRODUCIBLE_MODES = ("platform", "strict")
# ``verify: always`` re-hashes every cached artifact and source file on each read instead of
# trusting the memo's (size, mtime, inode) signature: slower, but catches silent corruption.
VERIFY_MODES = ("changed", "always")
DTYPES = ("float32", "float16", "bfloat16")
STEP_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_VAR_WHOLE = re.compile(r"^\$\{\s*vars\.([^}\s]*)\s*\}$")
_VAR_ANY = re.compile(r"\$\{([^}]*)\}")
# Params that, when an op declares them and the step leaves them out, take the
# pipeline-level default; filled before hashing so the key sees the effective value.
PIPELINE_DEFAULTS = ("seed", "dtype")
# A step with one of these keys is a family (a sweep): one member step per combination.
FAMILY_KEYS = ("matrix", "foreach")
# More members than this is a typo in a list (or a combinatorial explosion), not a sweep.
MAX_FAMILY_MEMBERS = 1000
_MATRIX_WHOLE = re.compile(r"^\$\{\s*matrix\.([^}\s]*)\s*\}$")
# Characters a string matrix value may not hold: they delimit the member's name
# ('merged@k=v,k2=v2'), mark the whole family ('@*') or start an interpolation.
_MEMBER_VALUE_FORBIDDEN = re.compile(r"[,=@*\s{}\[\]$]")


@dataclass(frozen=True)
class Edge:
    """``step`` reads the output of ``source`` through param ``field`` (path in params)."""

    source: str
    field: tuple
    kinds: tuple


@dataclass
class Step:
    name: str
    op: OpSpec
    params: BaseModel
    line: int
    col: int
    inputs: list[Edge] = field(default_factory=list)
    data_files: dict[tuple, Path] = field(default_factory=dict)
    # For a member of a family (a step with ``matrix:``/``foreach:``): the family's name
    # and this member's values, in the order written.  Neither enters the key: the values
    # are in ``params`` already, and names never do.
    family: str | None = None
    matrix: dict[str, Any] = field(default_factory=dict)
    # ``resources:`` (cpus/gpus/memory) for a distributed backend's placement; not a
    # parameter and never in the key: where a step runs does not change its bytes.
    resources: dict[str, Any] = field(default_factory=dict)

    def params_json(self) -> dict:
        return self.params.model_dump(mode="json", by_alias=True)

    @property
    def output(self) -> Kind:
        """The kind this step produces (its op's, or what its params make it)."""
        return self.op.kind_of(self.params)


@dataclass(frozen=True)
class FamilyMember:
    """One step of a family: its name (``merged@lambda=0.5,density=0.2``) and the values
    of the family's matrix (or foreach entry) it was made with, in the order written."""

    name: str
    values: dict[str, Any]


def format_member_value(value: Any) -> str:
    """A matrix value as it appears in a member's name: stable across runs and machines.

    Integers as integers (``3``), floats in Python's shortest round-tripping form
    (``0.5``, ``1.0``, ``1e-05``), booleans and null as YAML writes them (``true``,
    ``null``), strings as they are.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def member_name(family: str, values: dict[str, Any]) -> str:
    """``family@k=v,k2=v2`` with the keys in the order given (see format_member_value)."""
    return f"{family}@" + ",".join(f"{k}={format_member_value(v)}" for k, v in values.items())


def parse_member_name(name: str) -> tuple[str, list[tuple[str, str]]] | None:
    """(family, [(key, value as written in the name), ...]) of a member name, or None for a
    name that is not one (no ``@``).  The values stay text: the name does not say whether
    ``1`` was an int or a string; ``Pipeline.families`` has the typed values."""
    family, sep, rest = name.partition("@")
    if not sep or not family or not rest:
        return None
    pairs = []
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            return None
        pairs.append((key, value))
    return family, pairs


@dataclass
class Pipeline:
    path: Path
    name: str
    description: str
    seed: int
    dtype: str
    vars: dict[str, Any]
    steps: dict[str, Step]
    outputs: dict[str, Path]
    positions: Positions
    display: str = ""
    warnings: list[Diagnostic] = field(default_factory=list)
    verify: str = "changed"  # or "always": see VERIFY_MODES
    reproducible: str = "platform"  # or "strict": see REPRODUCIBLE_MODES
    store_remote: str | None = None  # ``store: {remote: URL}``, or None
    # Where the lock file is read and written when not beside the pipeline (the CLI's
    # --out / --lock, so a library recipe runs without writing into the checkout), and
    # the outputs written as relative paths (as written), which --out DIR re-roots.
    lock_file: Path | None = None
    relative_outputs: dict[str, Path] = field(default_factory=dict)
    # family name -> its members in order (matrix: the cartesian product, last key varying
    # fastest; foreach: the entries' order).  Members are ordinary entries of ``steps``.
    families: dict[str, list[FamilyMember]] = field(default_factory=dict)

    def expand_names(self, names: list[str]) -> list[str]:
        """``names`` with each ``FAMILY@*`` replaced by the family's members, in order."""
        out: list[str] = []
        for n in names:
            base = n[:-2] if n.endswith("@*") else None
            if base is not None and base in self.families:
                out.extend(m.name for m in self.families[base])
            else:
                out.append(n)
        return out

    def diagnostic(self, step: str, message: str, path: tuple = ()) -> Diagnostic:
        """A diagnostic at ``path`` inside step ``step`` (for problems found after parsing)."""
        m = self.positions.value(("steps", step) + tuple(path)) if path else self.positions.key(("steps", step))
        return Diagnostic(self.display or str(self.path), m.line, m.col, message, step)

    @property
    def lock_path(self) -> Path:
        """``<pipeline>.lock`` beside the pipeline file (``merge.yaml`` -> ``merge.lock``),
        unless ``lock_file`` puts it elsewhere (``run --out DIR`` / ``--lock FILE``)."""
        return self.lock_file or self.path.with_suffix(".lock")

    @property
    def base_dir(self) -> Path:
        return self.path.parent


class _Collector:
    def __init__(self, filename: str, positions: Positions):
        self.filename = filename
        self.pos = positions
        self.items: list[Diagnostic] = []
        # Paths whose ${vars...} could not be resolved: already reported, so the
        # validation errors the raw '${...}' text causes there are noise.
        self.failed: set[tuple] = set()

    def at_value(self, path, message, step=None):
        step = step if isinstance(step, str) else None  # a non-string name is itself the error
        m = self.pos.value(path)
        self.items.append(Diagnostic(self.filename, m.line, m.col, message, step))

    def at_key(self, path, message, step=None):
        step = step if isinstance(step, str) else None
        m = self.pos.key(path)
        self.items.append(Diagnostic(self.filename, m.line, m.col, message, step))


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


MAX_INT_BITS = 64  # seeds and sizes; anything wider is a typo (and breaks str(), JSON, torch)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "<value>"
    return text if len(text) <= 60 else text[:57] + "..."


def _huge_ints(value: Any, loc: tuple = ()):
    """Locations of integers wider than MAX_INT_BITS inside a (tree-shaped) value."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > MAX_INT_BITS:
            yield loc
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _huge_ints(v, loc + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _huge_ints(v, loc + (i,))


def _short_list(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _not_a_var(expr: str, matrix_ok: bool) -> str:
    """Why ``${expr}`` (not a ``vars.`` reference) cannot be interpolated; '' for a
    ``${matrix.NAME}`` in a family, which its members fill in."""
    if expr.startswith("matrix."):
        return "" if matrix_ok else (f"cannot interpolate '${{{expr}}}': ${{matrix.NAME}} is only "
                                     "available in a step with 'matrix:' or 'foreach:' (a family)")
    return (f"cannot interpolate '${{{expr}}}': only ${{vars.NAME}} is supported "
            "(and ${matrix.NAME} in a step with 'matrix:' or 'foreach:')")


def _interpolate(value: Any, path: tuple, vars_: dict, col: _Collector, step: str | None,
                 matrix_ok: bool = False):
    """Replace ``${vars.NAME}``; a whole-value reference keeps the variable's type.

    ``matrix_ok``: the step is a family, so its ``${matrix.NAME}`` are left in place for
    ``_substitute_matrix`` (each member fills in its own values); elsewhere they are errors.
    """
    if isinstance(value, dict):
        return {k: _interpolate(v, path + (k,), vars_, col, step, matrix_ok) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path + (i,), vars_, col, step, matrix_ok) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(expr: str):
        expr = expr.strip()
        if not expr.startswith("vars."):
            problem = _not_a_var(expr, matrix_ok)
            if problem:
                col.failed.add(path)
                col.at_value(path, problem, step)
            return None, False  # a ${matrix.NAME} of a family stays, for its members to fill in
        name = expr[len("vars."):]
        if name not in vars_:
            col.failed.add(path)
            known = ", ".join(sorted(vars_)) or "none defined"
            col.at_value(
                path,
                f"unknown variable '${{vars.{name}}}'{did_you_mean(name, vars_)}; known vars: {known} "
                "(define it under top-level 'vars:')",
                step,
            )
            return None, False
        return vars_[name], True

    whole = _VAR_WHOLE.match(value)
    if whole:
        got, ok = lookup("vars." + whole.group(1))
        return got if ok else value
    def repl(m):
        got, ok = lookup(m.group(1))
        if not ok:
            return m.group(0)
        try:
            return str(got)
        except ValueError:  # a huge int; reported under 'vars'
            return m.group(0)
    return _VAR_ANY.sub(repl, value)


def _is_member_value(value: Any) -> bool:
    """Whether ``value`` can be a matrix value: a scalar that reads back from the name."""
    if isinstance(value, str):
        return bool(value) and not _MEMBER_VALUE_FORBIDDEN.search(value)
    return value is None or isinstance(value, (bool, int, float))


def _member_value_problem(value: Any) -> str:
    if isinstance(value, str):
        return (f"a string matrix value must be non-empty and hold no ',', '=', '@', '*', '$', "
                f"brackets or spaces (it becomes part of the member's name), got {_short(value)}")
    if isinstance(value, float):
        return f"a matrix value must be a finite number, got {value!r}"
    return (f"a matrix value must be a number, a string, true/false or null, got {_short(value)} "
            "(one list or mapping per member cannot be named; sweep a scalar instead)")


FamilyValues = list[tuple[dict[str, Any], dict[str, tuple[tuple, tuple]]]]


def _family_values(name: str, raw: dict, spath: tuple, col: _Collector) -> FamilyValues | None:
    """The members' values of family step ``raw``, each with, per key, the (key path,
    value path) in the YAML where it is written (for diagnostics); None after an error.

    ``matrix: {a: [1, 2], b: [x, y]}`` is the cartesian product in the order written (the
    last key varying fastest); ``foreach: [{a: 1, b: x}, ...]`` lists the members.
    """
    if all(k in raw for k in FAMILY_KEYS):
        col.at_key(spath + ("foreach",), "a step takes either 'matrix:' (every combination) or "
                   "'foreach:' (a list of members), not both", name)
        return None
    errors = len(col.items)
    if "matrix" in raw:
        combos = _matrix_values(name, raw, spath + ("matrix",), col)
    else:
        combos = _foreach_values(name, raw, spath + ("foreach",), col)
    return None if combos is None or len(col.items) > errors else combos


def _family_key_ok(key: Any, where: tuple, kind: str, raw: dict, name: str, col: _Collector) -> bool:
    """Whether ``key`` of a matrix (or foreach entry) can be a varying parameter; else says why."""
    if not isinstance(key, str) or not key:
        hint = " (YAML reads unquoted on/off/yes/no as booleans: quote the name)" if isinstance(key, bool) else ""
        col.at_key(where, f"{kind} keys are parameter names, got {_short(key)}{hint}", name)
    elif _MEMBER_VALUE_FORBIDDEN.search(key) or "." in key:
        col.at_key(where, f"{kind} key {_short(key)} cannot name a parameter: it holds characters "
                   "member names use as separators", name)
    elif key in FAMILY_KEYS or key in ("op", "resources"):
        col.at_key(where, f"'{key}' cannot vary inside a family; write one step per {key}", name)
    elif key in raw and key not in _matrix_variables(raw):
        col.at_key(where, f"parameter '{key}' is set both in the step and in its {kind}; "
                   "remove one of them", name)
    else:
        return True
    return False


def _value_ok(value: Any, where: tuple, name: str, col: _Collector) -> bool:
    if _is_member_value(value) and not (isinstance(value, float) and not math.isfinite(value)):
        return True
    col.at_value(where, _member_value_problem(value), name)
    return False


def _matrix_values(name: str, raw: dict, kpath: tuple, col: _Collector) -> FamilyValues | None:
    spec = raw["matrix"]
    if not isinstance(spec, dict) or not spec:
        got = "" if isinstance(spec, dict) else f", got {_short(spec)}"
        col.at_value(kpath, "'matrix' must be a non-empty mapping of parameter -> list of values, "
                     f"e.g. matrix: {{lambda: [0.5, 1.0]}}{got}", name)
        return None
    axes: list[tuple[str, list[tuple[Any, tuple]]]] = []
    for key, values in spec.items():
        if not _family_key_ok(key, kpath + (key,), "matrix", raw, name, col):
            continue
        if not isinstance(values, list) or not values:
            col.at_value(kpath + (key,), f"matrix '{key}' is an empty list: a family needs at least one "
                         "value per key" if isinstance(values, list) else
                         f"matrix '{key}' must be a list of values, got {_short(values)} (write "
                         f"[{_short(values)}] for a single value)", name)
            continue
        seen: dict[str, int] = {}
        axis = []
        for i, v in enumerate(values):
            if not _value_ok(v, kpath + (key, i), name, col):
                continue
            text = format_member_value(v)
            if text in seen:
                col.at_value(kpath + (key, i), f"matrix '{key}' lists {text} twice (items {seen[text] + 1} "
                             f"and {i + 1}): both members would be named '{name}@...{key}={text}...'", name)
                continue
            seen[text] = i
            axis.append((v, (kpath + (key,), kpath + (key, i))))
        axes.append((key, axis))
    total = math.prod(len(axis) for _, axis in axes)
    if total > MAX_FAMILY_MEMBERS:
        col.at_value(kpath, f"the matrix makes {total} members; the limit is {MAX_FAMILY_MEMBERS}", name)
        return None
    keys = [key for key, _ in axes]
    return [({k: v for k, (v, _) in zip(keys, picks, strict=True)},
             {k: w for k, (_, w) in zip(keys, picks, strict=True)})
            for picks in itertools.product(*(axis for _, axis in axes))]


def _foreach_values(name: str, raw: dict, kpath: tuple, col: _Collector) -> FamilyValues | None:
    spec = raw["foreach"]
    if not isinstance(spec, list) or not spec:
        got = "" if isinstance(spec, list) else f", got {_short(spec)}"
        col.at_value(kpath, "'foreach' must be a non-empty list of mappings of parameter -> value, "
                     f"e.g. foreach: [{{lambda: 0.5, density: 0.2}}]{got}", name)
        return None
    if len(spec) > MAX_FAMILY_MEMBERS:
        col.at_value(kpath, f"'foreach' lists {len(spec)} members; the limit is {MAX_FAMILY_MEMBERS}", name)
        return None
    combos: FamilyValues = []
    names: dict[str, int] = {}
    for i, entry in enumerate(spec):
        epath = kpath + (i,)
        if not isinstance(entry, dict) or not entry:
            col.at_value(epath, "each foreach entry must be a non-empty mapping of parameter -> value, "
                         f"got {_short(entry)}", name)
            continue
        good = {k: v for k, v in entry.items()
                if _family_key_ok(k, epath + (k,), "foreach", raw, name, col)
                and _value_ok(v, epath + (k,), name, col)}
        if len(good) != len(entry):
            continue
        full = member_name(name, good)
        if full in names:
            col.at_value(epath, f"foreach entry {i + 1} makes the member '{full}' again (as entry "
                         f"{names[full] + 1}); member names must be unique", name)
            continue
        names[full] = i
        combos.append((good, {k: (epath + (k,), epath + (k,)) for k in good}))
    return combos


def _matrix_refs(raw: dict) -> set[str]:
    """The keys a family step refers to as ``${matrix.KEY}`` outside its matrix/foreach:
    those are the members' variables, used where they are referred to, not parameters."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and "${" in value:
            for expr in _VAR_ANY.findall(value):
                if expr.strip().startswith("matrix."):
                    found.add(expr.strip()[len("matrix."):])

    walk({k: v for k, v in raw.items() if k not in FAMILY_KEYS})
    return found


def _matrix_variables(raw: dict) -> set[str]:
    """The matrix keys of family step ``raw`` that are its members' variables rather than
    parameters: used as ``${matrix.KEY}`` and not a parameter of the op (a parameter is set
    even where the step also refers to it)."""
    refs = _matrix_refs(raw)
    op = raw.get("op")
    spec = registry.all_ops().get(op) if refs and isinstance(op, str) else None
    if spec is None:
        return refs
    names: set[str] = set()
    for model in _models_for(spec, raw):
        for fname, info in model.model_fields.items():
            names |= {fname, info.alias or fname, *(getattr(info.validation_alias, "choices", None) or ())}
    return {r for r in refs if r not in names}


def _substitute_matrix(value: Any, values: dict, path: tuple, col: _Collector, step: str):
    """Replace ``${matrix.NAME}`` with this member's value (a whole-value reference keeps
    the value's type; inside a longer string it is written as in the member's name)."""
    if isinstance(value, dict):
        return {k: _substitute_matrix(v, values, path + (k,), col, step) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_matrix(v, values, path + (i,), col, step) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(expr: str) -> tuple[Any, bool]:
        key = expr.strip()[len("matrix."):]
        if key not in values:
            col.failed.add(path)
            col.at_value(path, f"unknown matrix key '${{matrix.{key}}}'{did_you_mean(key, values)}; "
                         f"this member's keys: {', '.join(values)}", step)
            return None, False
        return values[key], True

    whole = _MATRIX_WHOLE.match(value)
    if whole:
        got, ok = lookup("matrix." + whole.group(1))
        return got if ok else value

    def repl(m):
        if not m.group(1).strip().startswith("matrix."):
            return m.group(0)
        got, ok = lookup(m.group(1).strip())
        return format_member_value(got) if ok else m.group(0)
    return _VAR_ANY.sub(repl, value)


def _copy_positions(pos: Positions, src: tuple, dst: tuple, skip: tuple[str, ...] = ()) -> None:
    """Give the paths under ``dst`` the marks of those under ``src`` (but ``src + (s,)`` for
    ``s`` in ``skip``): a member's parameters point at the family's lines."""
    n = len(src)
    for table in (pos.keys, pos.values):
        for p, mark in list(table.items()):
            if p[:n] == src and not (len(p) > n and p[n] in skip):
                table[dst + p[n:]] = mark


def _expand_star_refs(raw: Any, path: tuple, families: dict[str, list[FamilyMember]],
                      pos: Positions) -> Any:
    """Replace each list item ``FAMILY@*`` by the family's members, in order; the positions
    of the list's items follow (every member points at the ``FAMILY@*`` it came from)."""
    if isinstance(raw, dict):
        return {k: _expand_star_refs(v, path + (k,), families, pos) for k, v in raw.items()}
    if not isinstance(raw, list):
        return raw
    items = [_expand_star_refs(v, path + (i,), families, pos) for i, v in enumerate(raw)]
    spans = []  # (old index, replacement items)
    for i, item in enumerate(items):
        fam = item[:-2] if isinstance(item, str) and item.endswith("@*") else None
        spans.append((i, [m.name for m in families[fam]] if fam in families and families[fam] else [item]))
    if all(len(new) == 1 and new[0] is items[i] for i, new in spans):
        return items
    n = len(path)
    for table in (pos.keys, pos.values):
        moved = {p: mark for p, mark in table.items()
                 if len(p) > n and p[:n] == path and isinstance(p[n], int)}
        for p in moved:
            del table[p]
        j = 0
        for i, new in spans:
            for _ in new:
                for p, mark in moved.items():
                    if p[n] == i:
                        table[path + (j,) + p[n + 1:]] = mark
                j += 1
    return [x for _, new in spans for x in new]


def _dedupe_family_diagnostics(items: list[Diagnostic], families: dict[str, list[FamilyMember]]
                               ) -> list[Diagnostic]:
    """One diagnostic for a problem every (or several) members of a family share: a wrong
    value in the matrix is found once per member, at the same place."""
    family_of = {m.name: base for base, members in families.items() for m in members}
    groups: dict[tuple, list[Diagnostic]] = {}
    order: list[tuple] = []
    for d in items:
        base = family_of.get(d.step or "")
        k = (base, d.line, d.col, d.message, d.severity) if base else (id(d),)
        if k not in groups:
            groups[k] = []
            order.append(k)
        groups[k].append(d)
    out = []
    for k in order:
        ds = groups[k]
        base = family_of.get(ds[0].step or "")
        if len(ds) == 1 or base is None:
            out.extend(ds)
            continue
        total = len(families[base])
        if len(ds) == total:
            out.append(replace(ds[0], step=f"{base}@*", message=f"{ds[0].message} (in every member)"))
        else:
            out.append(replace(ds[0], message=f"{ds[0].message} (in {len(ds)} of {total} members)"))
    return out


def _check_top(data: dict, col: _Collector) -> tuple[int, str, dict]:  # noqa: C901
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            col.at_key((key,), f"unknown top-level key '{key}'{did_you_mean(key, TOP_LEVEL_KEYS)}; "
                       f"expected one of: {', '.join(TOP_LEVEL_KEYS)}")
    if "weightflow" not in data:
        col.at_value((), "missing required top-level key 'weightflow' (the DSL version); "
                     "add 'weightflow: 1'")
    elif data["weightflow"] not in SUPPORTED_VERSIONS or isinstance(data["weightflow"], bool):
        got = data["weightflow"]
        quoted = (f" (write it as a number, without quotes: weightflow: {got})"
                  if isinstance(got, str) and re.fullmatch(r"[0-9]{1,6}", got.strip())
                  and int(got) in SUPPORTED_VERSIONS
                  else "")
        col.at_value(("weightflow",), f"unsupported DSL version {_short(got)}; this release reads "
                     f"weightflow: {', '.join(map(str, SUPPORTED_VERSIONS))}{quoted}")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            col.at_value((key,), f"'{key}' must be a string, got {_short(data[key])}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0 or seed.bit_length() > MAX_INT_BITS:
        col.at_value(("seed",), f"'seed' must be a non-negative integer below 2**{MAX_INT_BITS}, "
                     f"got {_short(seed)}")
        seed = 0
    dtype = data.get("dtype", "float32")
    if dtype not in DTYPES:
        col.at_value(("dtype",), f"'dtype' must be one of {', '.join(DTYPES)}, got {_short(dtype)}"
                     f"{did_you_mean(dtype, DTYPES) if isinstance(dtype, str) else ''}")
        dtype = "float32"
    vars_ = data.get("vars") or {}
    if not isinstance(vars_, dict):
        col.at_value(("vars",), f"'vars' must be a mapping of names to values, got {_short(vars_)}")
        vars_ = {}
    for name in list(vars_):
        if not isinstance(name, str) or not VAR_NAME.match(name):
            col.at_key(("vars", name), f"invalid variable name {_short(name)}: use letters, digits, '_', '-'")
    for name, value in vars_.items():
        for loc in _huge_ints(value):
            col.at_value(("vars", name) + loc, f"variable '{name}': integer too large "
                         f"(more than {MAX_INT_BITS} bits)")
    # Only well-named vars can be referenced (and listed in "known vars" hints).
    vars_ = {k: v for k, v in vars_.items() if isinstance(k, str) and VAR_NAME.match(k)}
    return seed, dtype, vars_


def _split_loc(loc: tuple, raw: Any, kind: str) -> tuple[tuple, tuple | None, str | None]:
    """Separate a pydantic error location into the path the user wrote and its union branch.

    pydantic puts the name of a union member into locations (``('weights', 0, 'float')``,
    ``(..., 'function-after[..., list[Rule]]', 0, 'value')``).  Walking the input along
    the location tells those apart from real keys and indices: a part that is not a key
    or index of the input there is a member name.  Returns (path as written, the path at
    which the first union branches or None, that branch's name).
    """
    shown: list = []
    cur, can_walk = raw, True
    branch_at, branch = None, None
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        # two branches with the same body: each keeps its isinstance narrowing (for mypy)
        if can_walk and isinstance(cur, dict) and isinstance(part, (str, int)) and part in cur:  # noqa: SIM114
            shown.append(part)
            cur = cur[part]
        elif can_walk and isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            shown.append(part)
            cur = cur[part]
        elif isinstance(part, int) or (last and kind in ("missing", "extra_forbidden")):
            shown.append(part)  # past what the input has: keep what pydantic says
            can_walk = False
        else:  # a union member's name: not part of the input
            if branch_at is None:
                branch_at, branch = tuple(shown), str(part)
    return tuple(shown), branch_at, branch


def _shape(value: Any) -> str:
    return "list" if isinstance(value, (list, tuple)) else "dict" if isinstance(value, dict) else "scalar"


def _branch_shape(name: str) -> str:
    """What input a union member (as pydantic names it in locations) takes."""
    inner = name.rsplit(",", 1)[-1].strip(" ]") if name.startswith("function-") else name
    if re.match(r"^(list|tuple|set|frozenset)\b", inner) or "list[" in name:
        return "list"
    if inner.startswith("dict") or "dict[" in name or (inner[:1].isupper() and "[" not in inner):
        return "dict"  # dict[...] or a nested model such as 'Rule'
    return "scalar"


def _walk(raw: Any, path: tuple) -> Any:
    for part in path:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _pydantic_diags(exc: ValidationError, spec: OpSpec, raw: dict, name: str, col: _Collector,  # noqa: C901
                    reported: AbstractSet[tuple] = frozenset()):
    base = ("steps", name)
    allowed = _param_names(spec, raw)
    entries = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        kind = err.get("type", "")
        if spec.discriminator and loc and loc[0] == raw.get(spec.discriminator):
            loc = loc[1:]
        shown, branch_at, branch = _split_loc(loc, raw, kind)
        entries.append((err, kind, shown, branch_at, branch))

    # A value that fits no member of a union gets one error per member.  Keep those of
    # the members shaped like the value (a list for a list...); if none is, all of them.
    by_union: dict[tuple, set[str]] = {}
    for _, _, _, at, branch in entries:
        if at is not None and branch is not None:  # _split_loc sets both or neither
            by_union.setdefault(at, set()).add(branch)
    keep: dict[tuple, set[str]] = {}
    for at, branches in by_union.items():
        shape = _shape(_walk(raw, at))
        fitting = {b for b in branches if _branch_shape(b) == shape}
        keep[at] = fitting or branches
    entries = [e for e in entries if e[3] is None or e[4] in keep[e[3]]]

    # A misspelt key is both "unknown 'patern'" and "missing 'pattern'": say it once, as
    # the unknown key with its correction.
    missing: dict[tuple, set] = {}
    for _, kind, loc, _, _ in entries:
        if kind == "missing" and loc:
            missing.setdefault(loc[:-1], set()).add(loc[-1])
    explained: set[tuple] = set()
    for _, kind, loc, _, _ in entries:
        if kind == "extra_forbidden" and loc:
            siblings = [m for m in missing.get(loc[:-1], ()) if isinstance(m, str)]
            close = difflib.get_close_matches(str(loc[-1]), siblings, n=1, cutoff=0.6)
            if close:
                explained.add(loc[:-1] + (close[0],))

    # Errors of several members at one place become one message ("a valid number or a valid list").
    generic: dict[tuple, list] = {}
    for err, kind, loc, _, _ in entries:
        if any(base + loc[:len(f) - 2] == f for f in col.failed if f[:2] == base):
            continue  # an unresolved ${vars...} here is reported already
        if loc in reported:
            continue  # _strict_scalar_problems said it more plainly
        where = _fmt_loc(loc)
        if kind == "extra_forbidden":
            key = loc[-1] if loc else "?"
            opts = sorted(allowed) if len(loc) == 1 else []
            siblings = [m for m in missing.get(loc[:-1], ()) if isinstance(m, str)]
            hint = did_you_mean(str(key), opts or siblings)
            exp = f"; expected one of: {', '.join(opts)}" if opts else ""
            col.at_key(base + loc, f"unknown parameter '{where}' for op '{spec.name}'{hint}{exp}", name)
        elif kind == "missing":
            if loc in explained:
                continue
            col.at_key(base + loc[:-1], f"missing required parameter '{where}' for op '{spec.name}'", name)
        elif kind in ("union_tag_invalid", "union_tag_not_found") and not loc:
            tags = _tags(spec)
            got = raw.get(spec.discriminator)
            if kind == "union_tag_not_found":
                col.at_key(base, f"missing required parameter '{spec.discriminator}' for op "
                           f"'{spec.name}'; expected one of: {', '.join(tags)}", name)
            else:
                hint = did_you_mean(got, tags) if isinstance(got, str) else ""
                col.at_value(base + (spec.discriminator,), f"unknown {spec.discriminator} "
                             f"{_short(got)} for op '{spec.name}'{hint}; "
                             f"expected one of: {', '.join(tags)}", name)
        else:
            generic.setdefault(loc, []).append((err, kind))

    for loc, errs in generic.items():
        msgs, got = [], errs[0][0].get("input")
        got_note = f" (got {_short(got)})" if not isinstance(got, dict) else ""
        for err, kind in errs:
            msg = err.get("msg") or "invalid value"
            if kind in ("value_error", "assertion_error"):
                # Our own validators' messages say what is wrong; drop pydantic's prefix.
                msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
                got_note = ""
            elif kind == "string_pattern_mismatch":
                choices = _pattern_choices((err.get("ctx") or {}).get("pattern", ""))
                if choices:
                    hint = did_you_mean(got, choices) if isinstance(got, str) else ""
                    msg = f"must be one of {', '.join(choices)}, got {_short(got)}{hint}"
                    got_note = ""
            msg = msg[0].lower() + msg[1:]
            if msg not in msgs:
                msgs.append(msg)
        lead = "input should be "
        if len(msgs) > 1 and all(m.startswith(lead) for m in msgs):
            msg = lead + " or ".join(m[len(lead):] for m in msgs)
        else:
            msg = "; or ".join(msgs)
        if not loc:
            # A check across several parameters (e.g. load's 'source' vs 'config').
            col.at_key(base, f"invalid parameters for op '{spec.name}': {msg}{got_note}", name)
        else:
            col.at_value(base + loc, f"parameter '{_fmt_loc(loc)}': {msg}{got_note}", name)


def _pattern_choices(pattern: str) -> list[str]:
    """['a', 'b'] for a choice pattern such as '^(a|b)$', else []."""
    m = re.fullmatch(r"\^\(([\w.|-]+)\)\$", pattern or "")
    return m.group(1).split("|") if m else []


def _union_members(tp: Any) -> list:
    """The alternatives of ``tp`` with Annotated/Optional peeled off."""
    import typing

    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and origin.__name__ == "UnionType"):
        out = []
        for arg in typing.get_args(tp):
            out.extend(_union_members(arg))
        return out
    return [tp]


def _strict_scalar_problems(model: type[BaseModel], raw: dict) -> list[tuple[tuple, str]]:
    """Booleans where numbers are expected and non-booleans where a flag is expected.

    pydantic's lax mode turns ``init_seed: true`` into 1 and ``normalize: "yes"`` into
    True; in a pipeline file those are almost always mistakes, so they are errors.
    """
    import typing

    problems: list[tuple[tuple, str]] = []

    def check(tp, value, loc):
        members = [m for m in _union_members(tp) if m is not type(None)]
        if not members or any(m is Any for m in members):
            return
        if isinstance(value, list):
            lists = [m for m in members if typing.get_origin(m) is list
                     or (typing.get_origin(m) is tuple and typing.get_args(m)[-1:] == (Ellipsis,))]
            if len(lists) == 1 and typing.get_args(lists[0]):
                for i, item in enumerate(value):
                    check(typing.get_args(lists[0])[0], item, loc + (i,))
            return
        if isinstance(value, bool):
            # a list, mapping, model or str member does not take a boolean either
            if bool not in members and any(m in (int, float) for m in members):
                wanted = "an integer" if float not in members else "a number"
                problems.append((loc, f"expected {wanted}, got a boolean ({str(value).lower()})"))
        elif value is not None and all(m is bool for m in members):
            problems.append((loc, f"expected true or false, got {_short(value)}"))

    for fname, info in model.model_fields.items():
        key = info.alias or fname
        if key in raw:
            check(info.annotation, raw[key], (key,))
    return problems


def _tags(spec: OpSpec) -> list[str]:
    tags = []
    for member in getattr(spec.params, "__args__", ()) or ():
        for m in getattr(member, "__args__", ()) or (member,):
            f = getattr(m, "model_fields", {}).get(spec.discriminator)
            if f is not None and getattr(f.annotation, "__args__", None):
                tags.append(f.annotation.__args__[0])  # the canonical name; the others are aliases
    return sorted(set(map(str, tags)))


def _models_for(spec: OpSpec, raw: dict) -> list[type[BaseModel]]:
    """The params model(s) ``raw`` is validated against (the matching union branch)."""
    models = []
    params = spec.params
    if isinstance(params, type) and issubclass(params, BaseModel):
        models = [params]
    else:
        for member in getattr(params, "__args__", ()) or ():
            for m in getattr(member, "__args__", ()) or (member,):
                if isinstance(m, type) and issubclass(m, BaseModel):
                    f = m.model_fields.get(spec.discriminator or "")
                    tags = getattr(f.annotation, "__args__", ()) if f is not None else ()
                    if not spec.discriminator or raw.get(spec.discriminator) in tags:
                        models.append(m)
    return models


def _param_names(spec: OpSpec, raw: dict) -> set[str]:
    names = {"op"}
    for m in _models_for(spec, raw):
        for fname, info in m.model_fields.items():
            names.add(info.alias or fname)
    return names


def _store_remote(raw: Any, col: _Collector) -> str | None:
    """The ``store: {remote: URL}`` key's URL (None when absent), its errors reported."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        col.at_value(("store",), f"'store' must be a mapping such as {{remote: s3://bucket/prefix}}, "
                     f"got {_short(raw)}")
        return None
    for key in raw:
        if key not in STORE_KEYS:
            col.at_key(("store", key), f"unknown key '{key}' in 'store'{did_you_mean(str(key), STORE_KEYS)}; "
                       f"expected one of: {', '.join(STORE_KEYS)}")
    url = raw.get("remote")
    if url is None:
        return None
    if not isinstance(url, str) or not url.strip():
        col.at_value(("store", "remote"), "'store.remote' must be a URL fsspec opens (s3://bucket/prefix, "
                     f"file:///path, ...), got {_short(url)}")
        return None
    return url.strip()


def _validate_step(name, raw, path: tuple, pipeline_defaults: dict, col: _Collector, base_dir: Path,  # noqa: C901
                   member: bool = False):
    """The validated step ``raw`` (None after reporting its problems).  ``member``: ``name``
    is a family member's generated name (``base@k=v``), whose base was checked already."""
    if not member and (not isinstance(name, str) or not STEP_NAME.match(name)):
        col.at_key(path, f"invalid step name {_short(name)}: use only letters, digits, '_' and '-' "
                   "(step names are used in paths)", name if isinstance(name, str) else None)
        return None
    if not isinstance(raw, dict):
        col.at_value(path, f"a step must be a mapping with 'op:' and its parameters, got {_short(raw)}", name)
        return None
    ops = registry.all_ops()
    op_name = raw.get("op")
    if op_name is None:
        col.at_key(path, f"missing 'op:'; known ops: {', '.join(ops)}", name)
        return None
    spec = ops.get(op_name) if isinstance(op_name, str) else None
    if spec is None:
        col.at_value(path + ("op",), f"unknown op {_short(op_name)}"
                     f"{did_you_mean(op_name, ops) if isinstance(op_name, str) else ''}; "
                     f"known ops: {', '.join(ops)}", name)
        return None
    params_raw = {k: v for k, v in raw.items() if k not in ("op", "resources")}
    resources: dict[str, Any] = {}
    if "resources" in raw:
        try:
            resources = check_resources(raw["resources"])
        except ValueError as exc:
            col.at_value(path + ("resources",), str(exc), name)
            return None
    for k in list(params_raw):
        if not isinstance(k, str):
            col.at_key(path + (k,), f"parameter names must be strings, got {_short(k)}", name)
            return None
    accepted = _param_names(spec, params_raw)
    for key in PIPELINE_DEFAULTS:
        if key in accepted and params_raw.get(key) is None:
            params_raw[key] = pipeline_defaults[key]
    models = _models_for(spec, params_raw)
    strict = _strict_scalar_problems(models[0], params_raw) if len(models) == 1 else []
    strict += [(loc, f"integer too large (more than {MAX_INT_BITS} bits)")
               for loc in _huge_ints(params_raw)]
    for loc, message in strict:
        col.at_value(path + loc, f"parameter '{_fmt_loc(loc)}': {message}", name)
    try:
        params = spec.adapter.validate_python(params_raw)
    except ValidationError as exc:
        _pydantic_diags(exc, spec, params_raw, name, col, {loc for loc, _ in strict})
        return None
    except (ValueError, TypeError) as exc:
        col.at_key(path, f"invalid parameters for op '{spec.name}': {exc}", name)
        return None
    if strict:
        return None
    key_mark = col.pos.key(path)
    step = Step(name=name, op=spec, params=params, line=key_mark.line, col=key_mark.col, resources=resources)
    for fpath, value, marker in field_markers(params):
        for sub, item in iter_values(value):
            if isinstance(marker, StepRef):
                step.inputs.append(Edge(source=item, field=fpath + sub, kinds=marker.kinds))
            elif isinstance(marker, DataFile):
                if "\x00" in item:
                    col.at_value(path + fpath + sub, f"data file path contains a NUL character: "
                                 f"{_short(item)}", name)
                    continue
                p = Path(os.path.expanduser(item))
                p = p if p.is_absolute() else (base_dir / p)
                step.data_files[fpath + sub] = p
                if not p.is_file():
                    col.at_value(path + fpath + sub, f"data file not found: {p}", name)
    return step


def _check_overrides(overrides: dict, vars_: dict, data: dict, col: _Collector) -> dict:
    """The ``--var`` overrides that name a variable of the file; the others are errors
    (a misspelt ``--var drop_rat=...`` would otherwise be ignored without a word)."""
    where = ("vars",) if "vars" in data else ()
    out = {}
    for name, value in overrides.items():
        if name not in vars_:
            if vars_:
                col.at_key(where, f"--var {name}: the pipeline has no variable '{name}'"
                           f"{did_you_mean(name, vars_)}; its vars: {', '.join(sorted(vars_))} "
                           "(--var can only override a variable defined under 'vars:')")
            else:
                col.at_key(where, f"--var {name}: the pipeline defines no variables (under 'vars:'), "
                           f"so there is no '{name}' to override")
            continue
        if any(True for _ in _huge_ints(value)):
            col.at_key(where, f"--var {name}: integer too large (more than {MAX_INT_BITS} bits)")
            continue
        out[name] = value
    return out


def parse_text(text: str, path: Path, display: str | None = None,
               var_overrides: dict | None = None) -> Pipeline:
    """Parse and validate pipeline ``text`` (read from ``path``); raise PipelineError.

    ``var_overrides`` replace ``vars`` before interpolation (each must be defined there): the CLI's
    ``--var NAME=VALUE``, so a library pipeline runs on a user's own inputs unedited.
    """
    try:
        return _parse_text(text, path, display or str(path), var_overrides or {})
    except RecursionError:
        # YAML reading already refuses deep documents; this guards the later walks.
        raise PipelineError([Diagnostic(display or str(path), 1, 1,
                                        "the pipeline nests too deeply to be checked")]) from None


def _parse_text(text: str, path: Path, filename: str, var_overrides: dict) -> Pipeline:  # noqa: C901
    from weightflow.dsl.lang.graph import (
        check_graph,  # graph checks need parsed steps first
    )

    data, pos, yaml_diags = load_yaml(text, filename)
    col = _Collector(filename, pos)
    col.items.extend(yaml_diags)
    if data is None and not yaml_diags:
        col.at_value((), "the pipeline file is empty; it needs at least 'weightflow: 1' and 'steps:'")
    if data is None or col.items and any("YAML" in d.message for d in col.items):
        raise PipelineError(col.items)
    if not isinstance(data, dict):
        col.at_value((), f"a pipeline must be a mapping of top-level keys, got {type(data).__name__}")
        raise PipelineError(col.items)

    seed, dtype, vars_ = _check_top(data, col)
    if var_overrides:
        vars_ = {**vars_, **_check_overrides(var_overrides, vars_, data, col)}
    steps_raw = data.get("steps")
    if "steps" not in data:
        col.at_value((), "missing required top-level key 'steps' (a mapping of step name -> step)")
        steps_raw = {}
    elif steps_raw is None:
        col.at_key(("steps",), "'steps' is empty: a pipeline needs at least one step")
        steps_raw = {}
    elif not isinstance(steps_raw, dict):
        col.at_value(("steps",), f"'steps' must be a mapping of step name -> step, got {_short(steps_raw)}")
        steps_raw = {}
    elif not steps_raw:
        col.at_value(("steps",), "'steps' is empty: a pipeline needs at least one step")

    reproducible = data.get("reproducible", "platform")
    if reproducible not in REPRODUCIBLE_MODES:
        col.at_value(("reproducible",), f"'reproducible' must be one of {', '.join(REPRODUCIBLE_MODES)}, "
                     f"got {_short(reproducible)}")
        reproducible = "platform"
    verify = data.get("verify", "changed")
    if verify not in VERIFY_MODES:
        col.at_value(("verify",), f"'verify' must be one of {', '.join(VERIFY_MODES)}, got {_short(verify)}")
        verify = "changed"
    store_remote = _store_remote(data.get("store"), col)
    defaults = {"seed": seed, "dtype": dtype}
    steps: dict[str, Step] = {}
    families: dict[str, list[FamilyMember]] = {}
    # (name, raw, family or None, member values) of every step to validate, families expanded
    todo: list[tuple[Any, Any, str | None, dict]] = []
    broken: set[str] = set()  # families whose matrix is invalid (reported; members unknown)
    for name, raw in steps_raw.items():
        spath = ("steps", name)
        is_family = (isinstance(name, str) and bool(STEP_NAME.match(name)) and isinstance(raw, dict)
                     and any(k in raw for k in FAMILY_KEYS))
        raw = _interpolate(raw, spath, vars_, col, name if isinstance(name, str) else None, is_family)
        if not is_family:
            todo.append((name, raw, None, {}))
            continue
        combos = _family_values(name, raw, spath, col)
        if combos is None:
            broken.add(name)
            continue
        families[name] = []
        body = {k: v for k, v in raw.items() if k not in FAMILY_KEYS}
        variables = _matrix_variables(raw)  # keys only used as ${matrix.KEY}, not parameters
        for values, where in combos:
            full = member_name(name, values)
            mpath = ("steps", full)
            _copy_positions(pos, spath, mpath, skip=FAMILY_KEYS)
            params = {k: v for k, v in values.items() if k not in variables}
            for k in params:
                pos.keys[mpath + (k,)] = pos.key(where[k][0])
                pos.values[mpath + (k,)] = pos.value(where[k][1])
            member_raw = _substitute_matrix(body, values, mpath, col, full)
            families[name].append(FamilyMember(full, dict(values)))
            todo.append((full, {**member_raw, **params}, name, values))
    for name, raw, family, values in todo:
        spath = ("steps", name)
        if families:
            raw = _expand_star_refs(raw, spath, families, pos)
        step = _validate_step(name, raw, spath, defaults, col, path.parent, member=family is not None)
        if step is not None:
            step.family, step.matrix = family, dict(values)
            steps[name] = step
    known_names = {n for n, _, _, _ in todo if isinstance(n, str)} | set(families) | broken

    outputs: dict[str, Path] = {}
    relative_outputs: dict[str, Path] = {}  # as written, for --out DIR
    outputs_raw = data.get("outputs") or {}
    if not isinstance(outputs_raw, dict):
        col.at_value(("outputs",), f"'outputs' must be a mapping of step name -> directory, got {_short(outputs_raw)}")
        outputs_raw = {}
    for name, target in outputs_raw.items():
        who = name if isinstance(name, str) else None
        target = _interpolate(target, ("outputs", name), vars_, col, None)
        if name in families:
            col.at_key(("outputs", name), f"'{name}' is a step family ({len(families[name])} members): "
                       f"an output names one member, e.g. '{families[name][0].name}'")
        elif name not in known_names:
            known = ", ".join(str(k) for k in steps_raw) or "none"
            col.at_key(("outputs", name), f"output names unknown step {_short(name)}"
                       f"{did_you_mean(name, known_names) if isinstance(name, str) else ''}; "
                       f"known steps: {_short_list(known)}")
        elif not isinstance(target, str) or not target:
            col.at_value(("outputs", name), f"output directory must be a path string, got {_short(target)}", who)
        elif "\x00" in target:
            col.at_value(("outputs", name), f"output directory contains a NUL character: {_short(target)}", who)
        else:
            p = Path(os.path.expanduser(target))
            outputs[name] = p if p.is_absolute() else path.parent / p
            if not p.is_absolute():
                relative_outputs[name] = p

    name_raw, description_raw = data.get("name"), data.get("description")
    pipeline = Pipeline(
        path=path,
        name=name_raw if isinstance(name_raw, str) else path.stem,
        description=description_raw if isinstance(description_raw, str) else "",
        seed=seed,
        dtype=dtype,
        vars=vars_,
        steps=steps,
        outputs=outputs,
        positions=pos,
        display=filename,
        verify=verify,
        reproducible=reproducible,
        store_remote=store_remote,
        families=families,
        relative_outputs=relative_outputs,
    )
    col.items.extend(check_graph(pipeline, known_names, filename))
    if families:
        col.items = _dedupe_family_diagnostics(col.items, families)
    errors = [d for d in col.items if d.severity == "error"]
    if errors:
        raise PipelineError(col.items)
    pipeline.warnings = [d for d in col.items if d.severity != "error"]
    return pipeline


def load_pipeline(path: str | os.PathLike, var_overrides: dict | None = None) -> Pipeline:
    """Read and validate the pipeline file at ``path`` (``var_overrides``: see parse_text)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            # Size first, before reading (let alone parsing) a file far too big to be a pipeline;
            # a device or FIFO has no size, so read one byte past the limit to be sure.
            too_big = size_problem(os.fstat(fh.fileno()).st_size)
            if not too_big:
                raw = fh.read(MAX_FILE_BYTES + 1)
                too_big = size_problem(len(raw), exact=False)
    except FileNotFoundError as exc:
        raise PipelineError([Diagnostic(str(path), 1, 1, "pipeline file not found")]) from exc
    except OSError as exc:
        raise PipelineError([Diagnostic(str(path), 1, 1, f"cannot read pipeline file: {exc}")]) from exc
    if too_big:
        raise PipelineError([Diagnostic(str(path), 1, 1, too_big)])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PipelineError([Diagnostic(str(path), line, col, f"cannot read pipeline file: not valid "
                                        f"UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset "
                                        f"{exc.start}); save it as UTF-8")]) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    return parse_text(text, p.resolve(), display=str(path), var_overrides=var_overrides)
