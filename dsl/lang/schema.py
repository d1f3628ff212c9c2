"""The JSON Schema of the whole language, ops included, for editors.

Point an editor at it with ``# yaml-language-server: $schema=weightflow.schema.json``
(after ``weightflow schema > weightflow.schema.json``).  Every op parameter also
accepts a ``${vars.NAME}`` string, since interpolation happens before validation.
"""

from __future__ import annotations

import copy
from typing import Any

from weightflow.dsl.lang import registry
from weightflow.dsl.lang.pipeline import DTYPES, SUPPORTED_VERSIONS

VAR_REF = {"type": "string",
           "pattern": r"^.*\$\{\s*(vars|matrix)\.[A-Za-z_][A-Za-z0-9_-]*\s*\}.*$",
           "description": "a ${vars.NAME} interpolation (or ${matrix.NAME} in a step family)"}
# A matrix value names its member (``merged@lambda=0.5``), so it is a scalar.
MEMBER_VALUE = {"type": ["number", "string", "boolean", "null"]}


def _or_var(sub: dict) -> dict:
    if VAR_REF in sub.get("anyOf", []):
        return sub
    return {**sub, "anyOf": [*sub["anyOf"], VAR_REF]} if "anyOf" in sub else {"anyOf": [sub, VAR_REF]}


def _allow_vars(schema: dict) -> None:
    """Let every property of every object schema also be a ${vars.X} string."""
    if not isinstance(schema, dict):
        return
    props = schema.get("properties")
    if isinstance(props, dict):
        for name, sub in list(props.items()):
            _allow_vars(sub)
            if name not in ("op", "method"):
                props[name] = _or_var(sub)
    items = schema.get("items")
    if isinstance(items, dict):
        _allow_vars(items)
        schema["items"] = _or_var(items)
    for key in ("$defs", "definitions"):
        for sub in (schema.get(key) or {}).values():
            _allow_vars(sub)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or []:
            _allow_vars(sub)


_SIZE = r"^\s*[0-9]+(\.[0-9]+)?\s*([KkMmGgTt]([Ii]?[Bb])?|[Bb])?\s*$"  # spec.parse_memory's forms
# A step's placement on a distributed backend (not a parameter; never in the key).
RESOURCES = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "cpus": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"const": "all"}],
                 "description": "CPUs one run needs (all: every CPU of a worker)"},
        "gpus": {"type": "number", "minimum": 0, "description": "GPUs one run needs (device: cuda: 1)"},
        "memory": {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                             {"type": "string", "pattern": _SIZE}],
                   "description": "memory one run needs: bytes, or a size such as 16GB or 512MiB"},
    },
    "description": "what a run of this step needs from a worker of `--backend ray` (task num_cpus/"
    "num_gpus/memory); defaults come from the op; not part of the step's key",
}


def _family_keys(schema: dict, fixed: tuple[str, ...]) -> None:
    """Let an op's step schema be a family: ``matrix:`` (parameter -> list of values) or
    ``foreach:`` (a list of parameter -> value mappings), whose keys are the op's parameters.
    A parameter the family varies is not written in the step, so the required ones are
    required only of a step that is not a family (``fixed``: required always)."""
    names = [n for n in schema.get("properties", {}) if n not in fixed]
    keys = {"enum": names}
    schema["properties"]["matrix"] = {
        "type": "object", "minProperties": 1, "propertyNames": keys,
        "additionalProperties": _or_var({"type": "array", "minItems": 1, "items": MEMBER_VALUE}),
        "description": "a step family: one member per combination of these values, named "
        "STEP@KEY=VALUE,... (refer to all of them as STEP@* in a list)"}
    schema["properties"]["foreach"] = {
        "type": "array", "minItems": 1,
        "items": {"type": "object", "minProperties": 1, "propertyNames": keys,
                  "additionalProperties": MEMBER_VALUE},
        "description": "a step family: one member per entry, named STEP@KEY=VALUE,..."}
    rest = [n for n in schema.get("required", []) if n not in fixed]
    schema["required"] = [n for n in schema.get("required", []) if n in fixed]
    if rest:
        schema["anyOf"] = [{"required": rest}, {"required": ["matrix"]}, {"required": ["foreach"]}]
    schema["not"] = {"required": ["matrix", "foreach"]}


def _step_schema(spec, defs: dict) -> dict:
    schema = spec.adapter.json_schema(by_alias=True, ref_template="#/$defs/{model}")
    for name, sub in (schema.pop("$defs", None) or {}).items():
        defs[name] = sub
    _allow_vars(schema)
    op_prop = {"const": spec.name, "description": spec.summary()}
    if "properties" in schema:
        schema["properties"] = {"op": op_prop, **schema["properties"]}
        schema["required"] = ["op", *schema.get("required", [])]
        schema["additionalProperties"] = False
        _family_keys(schema, ("op",))
        schema["properties"]["resources"] = RESOURCES
        return schema
    # a discriminated union: add `op` to each variant
    variants = []
    for sub in schema.get("oneOf", schema.get("anyOf", [])):
        ref = sub.get("$ref", "")
        target = copy.deepcopy(defs.pop(ref.rsplit("/", 1)[-1]) if ref else sub)
        _allow_vars(target)
        target["properties"] = {"op": op_prop, **target.get("properties", {})}
        target["required"] = ["op", *target.get("required", [])]
        target["additionalProperties"] = False
        _family_keys(target, ("op", spec.discriminator))
        target["properties"]["resources"] = RESOURCES
        variants.append(target)
    return {"oneOf": variants, "description": spec.summary()}


def language_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    steps = []
    for spec in registry.all_ops().values():
        step = _step_schema(spec, defs)
        steps.append({"if": {"properties": {"op": {"const": spec.name}}, "required": ["op"]},
                      "then": step})
    for sub in defs.values():
        _allow_vars(sub)
    op_names = list(registry.all_ops())
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://weightflow.dev/schema/v1.json",
        "title": "weightflow pipeline",
        "type": "object",
        "additionalProperties": False,
        "required": ["weightflow", "steps"],
        "properties": {
            "weightflow": {"enum": list(SUPPORTED_VERSIONS), "description": "DSL version"},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "seed": {"type": "integer", "minimum": 0, "default": 0,
                     "description": "default seed of every stochastic step"},
            "dtype": {"enum": list(DTYPES), "default": "float32",
                      "description": "default dtype of produced checkpoints"},
            "vars": {"type": "object", "description": "values interpolated as ${vars.NAME}"},
            "reproducible": {"enum": ["platform", "strict"], "default": "platform",
                             "description": "strict: output bytes independent of the CPU model, its "
                             "instruction sets and the thread count (slower); platform: torch's fastest "
                             "kernels, digests hold for this platform"},
            "store": {"type": "object", "additionalProperties": False,
                      "properties": {"remote": {"type": "string", "minLength": 1,
                                                "description": "a URL fsspec opens: s3://bucket/prefix, "
                                                "gs://..., file:///mnt/nfs/..."}},
                      "description": "the remote store the local store caches (read-through, "
                      "write-through); --remote and $WEIGHTFLOW_REMOTE override it"},
            "verify": {"enum": ["changed", "always"], "default": "changed",
                       "description": "re-hash cached entries and inputs only when their files changed "
                       "(size, mtime, inode), or on every read"},
            "steps": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": "^[A-Za-z0-9_-]+$"},
                "additionalProperties": {
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"enum": op_names}},
                    "allOf": steps,
                },
            },
            "outputs": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "step name -> directory to export to after a run"},
        },
        "$defs": defs,
    }
