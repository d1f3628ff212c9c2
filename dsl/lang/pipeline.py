"""YAML text -> a validated ``Pipeline``: top-level keys, vars, steps and their params.

Everything that can be checked without running a model is checked here or in
``graph.py``, and all problems are collected before reporting, each with the file,
line, column and step.  The result is plain data; nothing downstream re-reads YAML.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from weightflow.dsl.lang import registry
from weightflow.dsl.lang.diagnostics import Diagnostic, PipelineError, did_you_mean
from weightflow.dsl.lang.spec import (
    DataFile,
    OpSpec,
    StepRef,
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
                  "verify", "reproducible")
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

    def params_json(self) -> dict:
        return self.params.model_dump(mode="json", by_alias=True)


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

    def diagnostic(self, step: str, message: str, path: tuple = ()) -> Diagnostic:
        """A diagnostic at ``path`` inside step ``step`` (for problems found after parsing)."""
        m = self.positions.value(("steps", step) + tuple(path)) if path else self.positions.key(("steps", step))
        return Diagnostic(self.display or str(self.path), m.line, m.col, message, step)

    @property
    def lock_path(self) -> Path:
        """``<pipeline>.lock`` beside the pipeline file (``merge.yaml`` -> ``merge.lock``)."""
        return self.path.with_suffix(".lock")

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


def _interpolate(value: Any, path: tuple, vars_: dict, col: _Collector, step: str | None):
    """Replace ``${vars.NAME}``; a whole-value reference keeps the variable's type."""
    if isinstance(value, dict):
        return {k: _interpolate(v, path + (k,), vars_, col, step) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path + (i,), vars_, col, step) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(expr: str):
        expr = expr.strip()
        if not expr.startswith("vars."):
            col.failed.add(path)
            col.at_value(path, f"cannot interpolate '${{{expr}}}': only ${{vars.NAME}} is supported", step)
            return None, False
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
                tags.extend(f.annotation.__args__)
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


def _validate_step(name, raw, path: tuple, pipeline_defaults: dict, col: _Collector, base_dir: Path):  # noqa: C901
    if not isinstance(name, str) or not STEP_NAME.match(name):
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
    params_raw = {k: v for k, v in raw.items() if k != "op"}
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
    step = Step(name=name, op=spec, params=params, line=key_mark.line, col=key_mark.col)
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
    defaults = {"seed": seed, "dtype": dtype}
    steps: dict[str, Step] = {}
    for name, raw in steps_raw.items():
        spath = ("steps", name)
        raw = _interpolate(raw, spath, vars_, col, name if isinstance(name, str) else None)
        step = _validate_step(name, raw, spath, defaults, col, path.parent)
        if step is not None:
            steps[name] = step

    outputs: dict[str, Path] = {}
    outputs_raw = data.get("outputs") or {}
    if not isinstance(outputs_raw, dict):
        col.at_value(("outputs",), f"'outputs' must be a mapping of step name -> directory, got {_short(outputs_raw)}")
        outputs_raw = {}
    for name, target in outputs_raw.items():
        who = name if isinstance(name, str) else None
        target = _interpolate(target, ("outputs", name), vars_, col, None)
        if name not in steps_raw:
            known = ", ".join(str(k) for k in steps_raw) or "none"
            col.at_key(("outputs", name), f"output names unknown step {_short(name)}"
                       f"{did_you_mean(name, steps_raw) if isinstance(name, str) else ''}; "
                       f"known steps: {_short_list(known)}")
        elif not isinstance(target, str) or not target:
            col.at_value(("outputs", name), f"output directory must be a path string, got {_short(target)}", who)
        elif "\x00" in target:
            col.at_value(("outputs", name), f"output directory contains a NUL character: {_short(target)}", who)
        else:
            p = Path(os.path.expanduser(target))
            outputs[name] = p if p.is_absolute() else path.parent / p

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
    )
    col.items.extend(check_graph(pipeline, set(k for k in steps_raw if isinstance(k, str)), filename))
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
