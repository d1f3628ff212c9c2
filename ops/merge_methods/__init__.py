"""The merge-method registry: one module per method, found by listing this package.

A method module declares ``METHOD = MergeMethod(...)``: its name (the YAML
``method:`` value), its params class (a pydantic model with ``method: Literal[name]``),
and either ``run(inputs, params, ctx)`` for methods over whole models or a
``DeltaRecipe`` (selection × consensus) for generalised task arithmetic.  The merge op's
params union, the JSON Schema, ``weightflow ops merge`` and the README reference are all
derived from these declarations, so adding a method is adding one file here.
Modules whose name starts with ``_`` are helpers, not methods.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Union

from pydantic import Field


@dataclass(frozen=True)
class MergeMethod:
    """One merge method as the registry holds it."""

    name: str
    params: type
    run: Callable[..., dict] | None = None     # whole-model methods
    recipe: Any = None                         # delta methods: weightflow.ops.lib.merging.DeltaRecipe
    order: int = 100                           # position in docs and schema (lower first)

    def __post_init__(self):
        if (self.run is None) == (self.recipe is None):
            raise TypeError(f"merge method {self.name!r}: give exactly one of run= or recipe=")

    @property
    def doc(self) -> str:
        return " ".join((self.params.__doc__ or "").split())

    def __call__(self, inputs, params, ctx) -> dict:
        if self.run is not None:
            return self.run(inputs, params, ctx)
        from weightflow.ops.lib.merging import merge_deltas

        return merge_deltas(inputs, params, ctx, self.recipe)


@lru_cache(maxsize=1)
def methods() -> dict[str, MergeMethod]:
    """Every method declared in this package, in documentation order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if not isinstance(method, MergeMethod):
            raise TypeError(f"{module.__name__} must declare METHOD = MergeMethod(...)")
        found.append(method)
    found.sort(key=lambda m: (m.order, m.name))
    return {m.name: m for m in found}


def params_union() -> Any:
    """The merge op's params: a union of every method's params, tagged by ``method``."""
    classes = tuple(m.params for m in methods().values())
    # a union built at runtime from a tuple: `X | Y` cannot spell it, and mypy cannot check it
    return Annotated[Union[classes], Field(discriminator="method")]  # type: ignore[valid-type]  # noqa: UP007
