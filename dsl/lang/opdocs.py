"""The op reference, generated from the registry so it cannot drift from the code."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from weightflow.dsl.lang import registry
from weightflow.dsl.lang.spec import DataFile, StepRef, _markers_of


def _models(spec) -> list[tuple[str | None, type[BaseModel]]]:
    params = spec.params
    if isinstance(params, type) and issubclass(params, BaseModel):
        return [(None, params)]
    out = []
    for member in getattr(params, "__args__", ()) or ():
        for m in getattr(member, "__args__", ()) or (member,):
            if isinstance(m, type) and issubclass(m, BaseModel):
                tag = get_args(m.model_fields[spec.discriminator].annotation)[0]  # Literal["name"]
                out.append((tag, m))
    return out


def _fmt_type(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _fmt_type(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_fmt_type(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"list[{_fmt_type(args[0])}]" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _type_name(info) -> str:
    for m in _markers_of(info.annotation, info.metadata):
        if isinstance(m, StepRef):
            kinds = "|".join(k.value for k in m.kinds)
            return f"list of {kinds} steps" if get_origin(info.annotation) is list or \
                "list" in _fmt_type(info.annotation) else f"{kinds} step"
        if isinstance(m, DataFile):
            return "data file"
    return _fmt_type(info.annotation)


def _param_rows(model: type[BaseModel], skip: str | None) -> list[dict[str, Any]]:
    rows = []
    for name, info in model.model_fields.items():
        if name == skip:
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        rows.append({
            "name": info.alias or name,
            "type": _type_name(info),
            "required": info.is_required(),
            "default": default,
            "description": info.description or "",
        })
    return rows


def ops_json() -> list[dict]:
    out = []
    for spec in registry.all_ops().values():
        variants = [{"variant": tag, "params": _param_rows(m, spec.discriminator)}
                    for tag, m in _models(spec)]
        out.append({"name": spec.name, "version": spec.version, "output": spec.output.value,
                    "summary": spec.summary(), "doc": (spec.doc or "").strip(),
                    "discriminator": spec.discriminator, "variants": variants})
    return out


def _fmt_default(row) -> str:
    return "required" if row["required"] else f"default {row['default']!r}"


def ops_text(only: str | None = None) -> str:
    """Every op (its summary and parameters), or one op with its whole documentation."""
    lines = []
    for op in ops_json():
        if only is not None and op["name"] != only:
            continue
        summary = op["summary"].replace("``", "")  # the terminal shows no reST markup
        lines.append(f"{op['name']} (v{op['version']}) -> {op['output']}: {summary}")
        if only is not None:
            body = "\n".join(op["doc"].splitlines()[1:]).strip("\n").replace("``", "")  # no reST markup
            lines += ["", *[f"  {line}" if line else "" for line in body.splitlines()], "", "  parameters:"]
        for var in op["variants"]:
            indent = "    "
            if var["variant"] is not None:
                lines.append(f"  {op['discriminator']}: {var['variant']}")
                indent = "      "
            for r in var["params"]:
                desc = f"  {r['description']}" if r["description"] else ""
                lines.append(f"{indent}{r['name']}: {r['type']} ({_fmt_default(r)}){desc}")
        lines.append("")
    return "\n".join(lines)


def ops_markdown() -> str:
    lines = ["| op | output | parameters |", "|---|---|---|"]
    for op in ops_json():
        parts = []
        for var in op["variants"]:
            names = ", ".join(f"`{r['name']}`" + ("" if r["required"] else "?") for r in var["params"])
            parts.append(f"**{op['discriminator']}: {var['variant']}** {names}" if var["variant"] else names)
        lines.append(f"| `{op['name']}` | {op['output']} | {'<br>'.join(parts)} |")
    out = ["### Ops", "", *lines, ""]
    for op in ops_json():
        out += [f"#### `{op['name']}` (v{op['version']}) → {op['output']}", "", op["doc"], ""]
        for var in op["variants"]:
            if var["variant"] is not None:
                out += [f"`{op['discriminator']}: {var['variant']}`", ""]
            out += ["| parameter | type | default | description |", "|---|---|---|---|"]
            for r in var["params"]:
                out.append(f"| `{r['name']}` | {r['type']} | {_fmt_default(r)} | {r['description']} |")
            out.append("")
    return "\n".join(out)


README_BEGIN = "<!-- BEGIN generated by `weightflow ops --markdown --write README.md`; do not edit -->"
README_END = "<!-- END generated op reference -->"


def with_reference(text: str) -> str:
    """``text`` (a README) with the block between the markers replaced by ``ops_markdown()``.

    The README carries a copy of the op reference so it reads well on a code host; the
    markers let ``weightflow ops --markdown --write`` refresh it and a test spot staleness.
    """
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"the file has no '{README_BEGIN}' ... '{README_END}' block")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{ops_markdown().rstrip()}\n{README_END}{tail}"
