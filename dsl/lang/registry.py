"""The flat name -> OpSpec table, fed by the ``weightflow.ops`` entry-point group.

Built-in ops register through the same entry points (see pyproject.toml), so a
separate package adds an op by declaring, in its own pyproject::

    [project.entry-points."weightflow.ops"]
    my-op = "my_package.my_op:OP"

Tests and embedding code may also call ``register`` directly.
"""

from __future__ import annotations

from importlib import metadata

from weightflow.dsl.lang.diagnostics import WeightflowError
from weightflow.dsl.lang.spec import OpSpec

GROUP = "weightflow.ops"

_OPS: dict[str, OpSpec] | None = None
_EXTRA: dict[str, OpSpec] = {}


def _discover() -> dict[str, OpSpec]:
    ops: dict[str, OpSpec] = {}
    for ep in metadata.entry_points(group=GROUP):
        try:
            spec = ep.load()
        except Exception as exc:  # a broken plug-in must not break every command
            raise WeightflowError(f"cannot load op '{ep.name}' from {ep.value}: {exc}") from exc
        if not isinstance(spec, OpSpec):
            raise WeightflowError(f"entry point '{ep.name}' ({ep.value}) is not an OpSpec")
        if spec.name != ep.name:
            raise WeightflowError(
                f"entry point '{ep.name}' ({ep.value}) declares op name '{spec.name}'"
            )
        ops[spec.name] = spec
    if not ops:
        raise WeightflowError(
            "no ops are registered: weightflow is not installed as a package "
            "(run `pip install -e .` in the repository)"
        )
    return ops


def all_ops() -> dict[str, OpSpec]:
    """Every known op, sorted by name."""
    global _OPS
    if _OPS is None:
        _OPS = _discover()
    merged = {**_OPS, **_EXTRA}
    return dict(sorted(merged.items()))


def get(name: str) -> OpSpec | None:
    return all_ops().get(name)


def register(spec: OpSpec) -> None:
    """Add or replace an op at run time (tests, notebooks)."""
    _EXTRA[spec.name] = spec


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)
