"""The merge-method registry: one module per method, found by listing this package.

A method module declares ``METHOD = MergeMethod(...)``: its name (the YAML
``method:`` value), its params class (a pydantic model with ``method: Literal[name]``),
and either ``run(inputs, params, ctx)`` for methods over whole models or a
``DeltaRecipe`` (selection × consensus) for generalised task arithmetic.  The merge op's
params union, the JSON Schema, ``weightflow ops merge`` and the README reference are all
derived from these declarations, so adding a method is adding one file here.
Modules whose name starts with ``_`` are helpers, not methods.

``method:`` also takes other spellings of a name: ``_`` for ``-`` and back (mergekit
writes ``task_arithmetic``, ``dare_ties``, ``della_linear``), and a method's explicit
``aliases``.  Each is validated to the canonical name, so both spellings give the same
params, the same ``model_dump`` and the same step key; docs and errors list the
canonical names only (a params class's ``method`` Literal holds the canonical name
first, then the aliases).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import Field, create_model, field_validator


@dataclass(frozen=True)
class MergeMethod:
    """One merge method as the registry holds it."""

    name: str
    params: type
    run: Callable[..., dict] | None = None     # whole-model methods
    recipe: Any = None                         # delta methods: weightflow.ops.lib.merging.DeltaRecipe
    order: int = 100                           # position in docs and schema (lower first)
    aliases: tuple[str, ...] = ()              # other names `method:` accepts (another tool's name)

    def __post_init__(self):
        if (self.run is None) == (self.recipe is None):
            raise TypeError(f"merge method {self.name!r}: give exactly one of run= or recipe=")

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every name ``method:`` accepts for this method, the canonical one first: the
        explicit aliases, and the name with ``_`` for ``-`` and ``-`` for ``_``."""
        out = [self.name]
        for s in (*self.aliases, self.name.replace("-", "_"), self.name.replace("_", "-")):
            if s not in out:
                out.append(s)
        return tuple(out)

    @property
    def doc(self) -> str:
        return " ".join((self.params.__doc__ or "").split())

    def __call__(self, inputs, params, ctx) -> dict:
        from weightflow.ops.lib.vocab import surgery

        with surgery(inputs, params, ctx):  # a step's `tokenizer:`; nothing without one
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
    owner: dict[str, str] = {}
    for m in found:
        for s in m.spellings:
            if owner.setdefault(s, m.name) != m.name:
                raise TypeError(f"merge methods {owner[s]!r} and {m.name!r} both claim the name {s!r}")
    return {m.name: m for m in found}


def canonical_name(method: str) -> str | None:
    """The canonical name of a method spelt ``method`` (an alias or itself), or None."""
    for m in methods().values():
        if method in m.spellings:
            return m.name
    return None


def _accepting_aliases(m: MergeMethod) -> type:
    """``m.params`` with ``method`` also taking the method's other spellings, each
    validated to the canonical name (a subclass, so isinstance checks still hold)."""
    names = m.spellings
    if len(names) == 1:
        return m.params
    canonical = m.name

    def to_canonical(cls, value: str) -> str:
        return canonical

    validator: Any = field_validator("method")(classmethod(to_canonical))
    spelt: Any = Literal[names]  # a Literal of a runtime tuple: one value per spelling
    sub: type = create_model(
        m.params.__name__, __base__=m.params, __module__=m.params.__module__, __doc__=m.params.__doc__,
        __validators__={"_canonical_method": validator},
        method=(spelt, Field(description=f"{canonical} (also spelt {', '.join(names[1:])})")),
    )
    # findable by pickle (and by name) beside the class it extends, under its own name
    sub.__qualname__ = f"{m.params.__qualname__}_spellings"
    setattr(importlib.import_module(m.params.__module__), sub.__qualname__, sub)
    return sub


@lru_cache(maxsize=1)
def _params_classes() -> tuple[type, ...]:
    return tuple(_accepting_aliases(m) for m in methods().values())


def params_union() -> Any:
    """The merge op's params: a union of every method's params, tagged by ``method``."""
    classes: Any = _params_classes()
    # a union built at runtime from a tuple: `X | Y` cannot spell it, and mypy cannot check it
    return Annotated[Union[classes], Field(discriminator="method")]  # noqa: UP007
