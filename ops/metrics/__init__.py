"""The metrics of ``evaluate``: a metric is one declaration in one file.

Every module of this package whose name does not start with ``_`` is a metric: it defines
``METRIC = Metric(...)`` -- the metric's name in YAML, its params model, its report columns
and its ``compute``.  Everything else is derived from these declarations: the choices of
``metrics:`` and their validation, the JSON Schema, ``weightflow ops`` and the README's op
reference, the report's columns and labels, and which params stay out of the report (data
files, step names and other paths: the key holds their digests instead).  Adding a metric
is adding a file.  Modules starting with ``_`` hold shared code (``_scoring``: the model
under evaluation and token scoring).

Metric modules must not import torch at module level (``validate``, ``schema`` and ``ops``
import them all); ``compute`` imports what it needs when it runs.

``compute(subject, params, ctx) -> (values, details)``: ``values`` holds the report's numbers,
one per column (None where it does not apply; a column no model has is left out of the
report), ``details`` anything else worth keeping (per-block sparsity, generated answers).
``subject`` is a ``_scoring.Subject``: the model (loaded on demand), its tokenizer, and
``subject.ref(field)``, the artifact of a step named by one of the metric's params.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from weightflow.dsl.lang.spec import DataFile, OpParams, StepRef

Better = Literal["lower", "higher"] | None
Column = tuple[str, Better, bool]  # (name, which way is better or None, drawn as a bar chart)


class PathParam:
    """Marks a str param as a path that is not a data file (a directory of task files, say):
    like data files and step names, it never enters the report."""


LocalPath = Annotated[str, PathParam()]


class MetricParams(OpParams):
    """Base of every metric's params."""

    label: str | None = Field(None, description="name of this metric's columns in the report "
                              "(default: the metric's name)")


def _markers(annotation: Any) -> list:
    found, stack = [], [annotation]
    while stack:
        tp = stack.pop()
        found += [m for m in getattr(tp, "__metadata__", ()) or () if isinstance(m, (DataFile, StepRef, PathParam))]
        stack.extend(getattr(tp, "__args__", ()) or ())
    return found


@dataclass(frozen=True)
class Metric:
    """One metric of ``evaluate``, as its module declares it."""

    name: str  # as written in YAML
    params: type[MetricParams]
    # the report's columns in order; None: ``compute`` names them (the keys of ``values``,
    # in order of appearance) and says which way is better in ``details["better"]``
    columns: tuple[Column, ...] | None
    compute: Callable[..., tuple[dict, dict]]
    doc: str  # for ``weightflow ops`` and the README
    # cheap checks of the data files before any step runs: ``preflight(params, env)``
    preflight: Callable[[Any, Any], None] | None = None
    # external inputs: ``fingerprint([params of every use of this metric], env)`` -> a dict
    # merged into the evaluate step's fingerprint (so into its key), or None
    fingerprint: Callable[[list, Any], dict | None] | None = None
    # the file whose stem tells apart unlabelled uses of the metric (default: the first
    # data file param that is set)
    label_file: Callable[[Any], str | None] | None = None
    # enters the key of every score evaluate caches for this metric: bump it when
    # ``compute`` gives other numbers for the same model and params, so cached scores
    # are recomputed instead of reused
    version: int = 1
    # False for metrics that read stored weights rather than run the model (sparsity,
    # delta_norm) or hand the model to another library (lm-eval): a Composite has no weights
    # of its own, only components and a rule
    scores_composites: bool = True

    @property
    def field(self) -> str:
        """The Python name of the metric's key (``lm-eval`` -> ``lm_eval``)."""
        return self.name.replace("-", "_")

    def _fields(self, *kinds) -> tuple[str, ...]:
        return tuple(name for name, info in self.params.model_fields.items()
                     if any(isinstance(m, kinds) for m in _markers(info.annotation) + list(info.metadata)))

    @property
    def files(self) -> tuple[str, ...]:
        """The params that name data files (annotated ``DataPath``), in declaration order."""
        return self._fields(DataFile)

    @property
    def not_in_report(self) -> frozenset[str]:
        """``label`` and every param naming a file, a directory or a step."""
        return frozenset({"label", *self._fields(DataFile, StepRef, PathParam)})

    def stem_file(self, params) -> str | None:
        if self.label_file is not None:
            return self.label_file(params)
        return next((getattr(params, f) for f in self.files if getattr(params, f) is not None), None)


def _discover() -> dict[str, Metric]:
    found: dict[str, Metric] = {}
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        metric = getattr(module, "METRIC", None)
        if not isinstance(metric, Metric):
            raise TypeError(f"{module.__name__} is a metric module but defines no METRIC = Metric(...) "
                            "(shared code goes in a module whose name starts with '_')")
        if metric.name in found or any(m.field == metric.field for m in found.values()):
            raise TypeError(f"{module.__name__}: metric name '{metric.name}' is declared twice")
        found[metric.name] = metric
    return found


METRICS: dict[str, Metric] = _discover()
