"""What an op is, as the language sees it: params, input ports, output kind, version.

An op module (in ``ops/`` or in any other installed package) defines a pydantic
params model and exposes an ``OpSpec`` through the ``weightflow.ops`` entry-point
group.  Fields that name other steps are annotated with ``ModelRef``/``DeltaRef``
(or ``StepRef(...)``), fields that name files with ``DataPath``; the graph builder
finds them by inspecting the validated params, so an op never parses references
itself.  Op modules must not import torch at module level: ``validate``, ``plan``,
``schema`` and ``ops`` read the specs and must stay fast.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Kind(str, enum.Enum):
    """The type of what a step produces; edges are checked against these."""

    MODEL = "Model"
    DELTA = "Delta"
    REPORT = "Report"


@dataclass(frozen=True)
class StepRef:
    """Marks a str field as the name of another step producing one of ``kinds``."""

    kinds: tuple[Kind, ...]


@dataclass(frozen=True)
class DataFile:
    """Marks a str field as a data file path, relative to the pipeline file.

    Its content digest (not its path) goes into the step key.
    """


ModelRef = Annotated[str, StepRef((Kind.MODEL,))]
DeltaRef = Annotated[str, StepRef((Kind.DELTA,))]
DataPath = Annotated[str, DataFile()]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Dtype = Annotated[str, Field(pattern=r"^(float32|float16|bfloat16)$")]


class OpParams(BaseModel):
    """Base of every op's params: unknown keys are errors, values are checked strictly."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


@dataclass(frozen=True)
class OpSpec:
    """An op as registered: the registry maps ``name`` to one of these.

    ``params`` is a pydantic model, or a discriminated union of models (then
    ``discriminator`` names the tag field, e.g. merge's ``method``).  ``run`` is
    called as ``run(inputs, params, ctx)``; it writes its artifact into
    ``ctx.out`` and returns a dict of metadata.  Bump ``version`` whenever the op's
    output for the same inputs changes: the version is part of every step key.
    """

    name: str
    version: int
    output: Kind
    params: Any
    run: Callable[..., Any]
    doc: str
    discriminator: str | None = None
    # External inputs (files outside the store, hub revisions): ``fingerprint(params,
    # env)`` returns a JSON-able dict that enters the key; ``env`` offers
    # ``file_digest(path)`` (memoised) and ``base_dir``.  Must not import torch.
    fingerprint: Callable[..., dict] | None = None
    # Params left out of the key because ``fingerprint`` covers their content (a
    # load's ``source`` path: moving the model directory must not invalidate it).
    key_exclude: tuple[str, ...] = ()
    # Cheap checks of external inputs run before any step of the pipeline executes
    # (a data file's fields, label names): ``preflight(params, env)`` raises OpError,
    # reported at the step's line.  ``env`` is the same as for ``fingerprint``.
    preflight: Callable[..., None] | None = None

    @property
    def adapter(self) -> TypeAdapter:
        cached = _ADAPTERS.get(self.name)
        if cached is None or cached[0] is not self.params:
            cached = (self.params, TypeAdapter(self.params))
            _ADAPTERS[self.name] = cached
        return cached[1]

    def summary(self) -> str:
        return (self.doc or "").strip().splitlines()[0] if self.doc else ""


_ADAPTERS: dict[str, tuple[Any, TypeAdapter]] = {}


def field_markers(model: BaseModel, prefix: tuple = ()) -> Iterator[tuple[tuple, Any, Any]]:
    """Yield (path, value, marker) for every ref/data field of a params instance.

    ``path`` uses the YAML spelling (aliases) and reaches into nested models, e.g.
    ``('calibration', 'data')``; list items are handled by ``iter_values``.
    """
    for name, info in type(model).model_fields.items():
        key = prefix + (info.alias or name,)
        value = getattr(model, name)
        for meta in _markers_of(info.annotation, info.metadata):
            yield key, value, meta
        if isinstance(value, BaseModel):
            yield from field_markers(value, key)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from field_markers(item, key + (i,))


def _markers_of(annotation: Any, metadata: list) -> list:
    found = [m for m in metadata if isinstance(m, (StepRef, DataFile))]
    stack = [annotation]
    while stack:
        tp = stack.pop()
        for m in getattr(tp, "__metadata__", ()) or ():
            if isinstance(m, (StepRef, DataFile)):
                found.append(m)
        stack.extend(getattr(tp, "__args__", ()) or ())
    return found


def iter_values(value: Any) -> Iterator[tuple[tuple, Any]]:
    """(sub-path, item) for a scalar ref field or each item of a list-valued one."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if item is not None:
                yield (i,), item
    elif value is not None:
        yield (), value
