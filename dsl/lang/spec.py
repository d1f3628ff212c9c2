"""What an op is, as the language sees it: params, input ports, output kind, version.

An op module (in ``ops/`` or in any other installed package) defines a pydantic
params model and exposes an ``OpSpec`` through the ``weightflow.ops`` entry-point
group.  Fields that name other steps are annotated with ``ModelRef``/``DeltaRef``
(or ``StepRef(...)``), fields that name files with ``DataPath``; the graph builder
finds them by inspecting the validated params, so an op never parses references
itself.  Op modules must not import torch at module level: ``validate``, ``plan``,
``schema`` and ``ops`` read the specs and must stay fast.

A params class that takes the pipeline's ``seed`` or ``dtype`` as its default says so by
deriving from ``SeedParam`` / ``DtypeParam`` (and declaring the field, with its own
description); the runner resolves ``ctx.seed`` / ``ctx.dtype`` from those only.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

if TYPE_CHECKING:  # the engine imports this module; these are for annotations only
    from weightflow.dsl.engine.context import Inputs, RunContext


class Kind(str, enum.Enum):
    """The type of what a step produces; edges are checked against these."""

    MODEL = "Model"
    DELTA = "Delta"
    REPORT = "Report"
    STATS = "Stats"  # calibration statistics of a model (Gram matrices, Fisher diagonals)
    COMPOSITE = "Composite"  # a rule over stored models (contrast, ensemble, guarded): see ops/lib/composite.py


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
# what evaluate and export take: a model, or a composite of models (scored by forward passes)
ScorableRef = Annotated[str, StepRef((Kind.MODEL, Kind.COMPOSITE))]
DeltaRef = Annotated[str, StepRef((Kind.DELTA,))]
StatsRef = Annotated[str, StepRef((Kind.STATS,))]  # collect-stats: Gram matrices, Fisher diagonals
DataPath = Annotated[str, DataFile()]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Dtype = Annotated[str, Field(pattern=r"^(float32|float16|bfloat16)$")]


class OpParams(BaseModel):
    """Base of every op's params: unknown keys are errors, values are checked strictly."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SeedParam(OpParams):
    """Params whose ``seed`` field is the step's seed: ``ctx.seed`` is it, or the pipeline's
    ``seed`` where it is null.  Declares no field itself (so the params' JSON, and the key,
    are those of the subclass): the subclass declares ``seed: int | None`` with its own
    description.  Params without this base run with the pipeline's seed."""

    if TYPE_CHECKING:
        seed: int | None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _require_field(cls, "seed", SeedParam)


class DtypeParam(OpParams):
    """Params whose ``dtype`` field is the step's dtype: ``ctx.dtype`` is it, or the pipeline's
    ``dtype`` where it is null.  Like ``SeedParam``, the subclass declares the field
    (``dtype: Dtype | None``)."""

    if TYPE_CHECKING:
        dtype: str | None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _require_field(cls, "dtype", DtypeParam)


def _require_field(cls: type[BaseModel], name: str, base: type) -> None:
    if name not in cls.model_fields:
        raise TypeError(f"{cls.__qualname__} derives from {base.__name__} but declares no "
                        f"'{name}' field")


def step_seed(params: object, default: int) -> int:
    """The seed a step with ``params`` runs with, given the pipeline's ``default``."""
    seed = params.seed if isinstance(params, SeedParam) else None
    return default if seed is None else seed


def step_dtype(params: object, default: str) -> str:
    """The dtype a step with ``params`` runs with, given the pipeline's ``default``."""
    dtype = params.dtype if isinstance(params, DtypeParam) else None
    return dtype or default


class OpEnv(Protocol):
    """What ``fingerprint`` and ``preflight`` hooks get (no torch, no model loading)."""

    base_dir: Path

    def file_digest(self, path: Any) -> str: ...

    def data_path(self, path: str) -> Path: ...


P = TypeVar("P")


@dataclass(frozen=True)
class OpSpec(Generic[P]):
    """An op as registered: the registry maps ``name`` to one of these.

    ``params`` is a pydantic model, or a discriminated union of models (then
    ``discriminator`` names the tag field, e.g. merge's ``method``); ``P`` is the type
    of a validated params instance, so declare an op as ``OpSpec[MyParams](...)`` and
    mypy checks ``run``, ``fingerprint`` and ``preflight`` against it.  ``run`` is
    called as ``run(inputs, params, ctx)`` (``inputs``: the ``Inputs`` of the step's
    refs); it writes its artifact into ``ctx.out`` and returns a dict of metadata.
    Bump ``version`` whenever the op's output for the same inputs changes: the version
    is part of every step key.
    """

    name: str
    version: int
    output: Kind
    params: Any  # type[P], or for a union the (annotated) union itself
    run: Callable[[Inputs, P, RunContext], dict]
    doc: str
    discriminator: str | None = None
    # External inputs (files outside the store, hub revisions): ``fingerprint(params,
    # env)`` returns a JSON-able dict that enters the key; ``env`` offers
    # ``file_digest(path)`` (memoised) and ``base_dir``.  Must not import torch.
    fingerprint: Callable[[P, OpEnv], dict | None] | None = None
    # Params left out of the key because ``fingerprint`` covers their content (a
    # load's ``source`` path: moving the model directory must not invalidate it).
    key_exclude: tuple[str, ...] = ()
    # Cheap checks of external inputs run before any step of the pipeline executes
    # (a data file's fields, label names): ``preflight(params, env)`` raises OpError,
    # reported at the step's line.  ``env`` is the same as for ``fingerprint``.
    preflight: Callable[[P, OpEnv], None] | None = None
    # What one run of the op needs from a worker of a distributed backend (Ray), as a
    # step's ``resources:`` writes it ({cpus: 1, gpus: 0, memory: 4GB}; cpus: all = every
    # CPU of a worker); a step's own ``resources:`` wins key by key.  Never in the key.
    resources: Mapping[str, Any] | None = None
    # The kind a step of this op produces when it depends on the step's params (unlearn's
    # ``method: uld`` gives a Composite, its other methods a Model): ``output_for(params)``.
    # ``output`` is then the usual kind, shown in docs; ``outputs`` lists every possible one.
    output_for: Callable[[P], Kind] | None = None
    other_outputs: tuple[Kind, ...] = ()

    def kind_of(self, params: Any) -> Kind:
        """The kind a step with ``params`` produces."""
        return self.output_for(params) if self.output_for is not None else self.output

    @property
    def outputs(self) -> tuple[Kind, ...]:
        return (self.output, *self.other_outputs)

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


#: The keys of a step's ``resources:`` (see OpSpec.resources).
RESOURCE_KEYS = ("cpus", "gpus", "memory")

_MEMORY_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
                 "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
                 "tib": 2**40}
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_memory(value: Any) -> int:
    """Bytes from ``16GB``, ``512MiB`` or a number of bytes; ValueError naming the forms."""
    if isinstance(value, bool):
        raise ValueError(f"memory: expected a size such as 16GB or 512MiB, got {value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"memory: must be positive, got {value!r}")
        return int(value)
    m = _MEMORY.match(str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _MEMORY_UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"memory: expected a size such as 16GB or 512MiB, got {value!r}")
    return int(float(m.group(1)) * _MEMORY_UNITS[unit])


def check_resources(value: Any) -> dict[str, Any]:
    """A step's ``resources:`` mapping, checked (ValueError says what was expected): cpus a
    positive number or ``all``, gpus a number >= 0, memory a size; nothing else."""
    if not isinstance(value, dict):
        raise ValueError(f"'resources' must be a mapping such as {{cpus: 4, gpus: 1, memory: 16GB}}, "
                         f"got {value!r}")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if k not in RESOURCE_KEYS:
            raise ValueError(f"'resources' has no key {k!r}; its keys: {', '.join(RESOURCE_KEYS)}")
        if k == "memory":
            parse_memory(v)
        elif k == "cpus" and v == "all":
            pass
        elif isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or (k == "cpus" and v == 0):
            want = "a positive number (or all)" if k == "cpus" else "a number >= 0"
            raise ValueError(f"resources.{k}: expected {want}, got {v!r}")
        out[k] = v
    return out
