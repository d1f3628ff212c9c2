"""``weightflow diff``: what a change to a pipeline *does*, for a reviewer.

A YAML diff shows which lines changed; this shows, per step, whether it was added,
removed, renamed (the same recipe under another name: free) or changed, each changed
parameter as ``old → new``; which steps that invalidates and why (their own recipe, or
which upstream input); what would run and how long that took when it last ran; and where
both sides have reports in the store, every metric side by side with its change.

How the comparison works (nothing here re-implements the planner or the key):

- Both sides are parsed by ``lang.pipeline.parse_text``, so defaults, pipeline-level
  ``seed``/``dtype`` and ``${vars}`` are resolved before anything is compared: a
  reformatting or an alias spelling is no change.
- A step's *recipe id* is ``Planner.key_of`` fed, instead of upstream output digests, the
  recipe ids of its inputs (a Nix-style key over recipes rather than contents).  It is
  independent of step names and of what the store holds, so it tells "same computation"
  on both sides even when nothing has run; equal ids under different names is a rename.
- A step's own parameters are compared on ``Planner.material_of`` (the key's JSON
  document: defaults filled, data files by content digest, ``key_exclude`` params left
  out), with each input replaced by the (new-side) name of the step it reads.
- What would run, and the keys, come from ``engine.planner.plan`` on the new side; the
  recorded run time is the ``seconds`` of the store's action manifest of that key, else
  of the old side's key for the same step (its plan, its lock file), else of the key the
  working copy's lock file names for it.

Like ``plan`` (and unlike the read-only views), ``diff`` fingerprints inputs through the
memo to compute keys; it runs no model and never imports torch.

``--json`` prints one object with these fields (stable; new fields may be added):

- ``format``: 1.  ``old``, ``new``: ``{label, kind (git|file|none), rev, path}``.
- ``steps``: one object per step, new-side order, removed steps last: ``name`` (new name;
  the old one for a removed step), ``old_name`` (null for an added step), ``op``, ``change``
  (``added|removed|renamed|changed|invalidated|unchanged``), ``params`` (list of ``{path,
  old, new}``, plus ``absent: old|new`` where one side lacks the value), ``because`` (the
  upstream steps whose change invalidates it), ``state`` (``cached|to run|removed``),
  ``key``, ``old_key`` (null where unknown), ``seconds`` (recorded run time or null),
  ``seconds_from`` (``this key|previous run|null``), ``family`` (the part of a sweep
  member's name before ``@``, else null).
- ``families``: ``{family, members, changes: {change: count}, cached, to_run, seconds}``.
- ``summary``: a count per change kind, ``to_run``, ``cached``, ``seconds_to_run`` (sum of
  the known times), ``unknown_seconds`` (steps to run with no recorded time),
  ``would_rerun`` (bool).
- ``reports``: per Report step on both sides: ``step``, ``old_step``, ``status``
  (``compared|same|old missing|new missing``), ``old_digest``, ``new_digest``, ``rows``:
  ``{model, metric, column, better, old, new, delta, direction (better|worse|same|null)}``.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from weightflow.dsl.format.text import fmt
from weightflow.dsl.lang.diagnostics import WeightflowError
from weightflow.dsl.present.diff_sides import Side

if TYPE_CHECKING:
    from weightflow.dsl.engine.planner import Planner, StepStatus
    from weightflow.dsl.lang.pipeline import Pipeline
    from weightflow.dsl.store.content import Store
    from weightflow.dsl.store.lockfile import LockEntry

FORMAT = 1
CHANGES = ("added", "removed", "renamed", "changed", "invalidated", "unchanged")
# a step whose change reaches its dependants (a renamed step is the same computation)
PROPAGATES = ("added", "changed", "invalidated")
ARROW = "→"


# -- markers inside compared recipes --------------------------------------------------------

@dataclass(frozen=True)
class StepName:
    """An input reference in a compared recipe: the (new-side) name of the step it reads."""

    name: str


@dataclass(frozen=True)
class DataRef:
    """A data file in a compared recipe: equal when the content is (the key's view), shown
    as the path the file wrote."""

    text: str
    digest: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataRef) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)


class _Missing:
    def __repr__(self) -> str:
        return "–"


MISSING: Any = _Missing()  # a value one side does not have


def plain(value: Any) -> Any:
    """A compared value as JSON: markers become the text a user wrote."""
    if isinstance(value, StepName):
        return value.name
    if isinstance(value, DataRef):
        return value.text
    if value is MISSING:
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def show(value: Any) -> str:
    """A compared value as the terminal shows it: ``0.9``, ``merged``, ``[a, b]``."""
    if value is MISSING:
        return "–"
    value = plain(value)
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(value) + "]"
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# -- results --------------------------------------------------------------------------------

@dataclass
class ParamChange:
    path: str
    old: Any
    new: Any

    def as_json(self) -> dict:
        out = {"path": self.path, "old": plain(self.old), "new": plain(self.new)}
        if self.old is MISSING:
            out["absent"] = "old"
        elif self.new is MISSING:
            out["absent"] = "new"
        return out

    def text(self) -> str:
        return f"{self.path}: {show(self.old)} {ARROW} {show(self.new)}"


@dataclass
class StepDiff:
    name: str                 # the new-side name (the old one for a removed step)
    old_name: str | None      # None for an added step
    op: str
    change: str               # one of CHANGES
    params: list[ParamChange] = field(default_factory=list)
    because: list[str] = field(default_factory=list)  # upstream steps whose change reaches it
    state: str = "removed"    # cached | to run | removed
    key: str | None = None
    old_key: str | None = None
    seconds: float | None = None
    seconds_from: str | None = None  # "this key" | "previous run"

    @property
    def family(self) -> str | None:
        """A sweep member (``merged@lambda=0.5``) belongs to the family before the ``@``."""
        return self.name.split("@", 1)[0] if "@" in self.name else None

    def as_json(self) -> dict:
        return {"name": self.name, "old_name": self.old_name, "op": self.op, "change": self.change,
                "params": [p.as_json() for p in self.params], "because": self.because,
                "state": self.state, "key": self.key, "old_key": self.old_key,
                "seconds": self.seconds, "seconds_from": self.seconds_from, "family": self.family}


@dataclass
class ReportDiff:
    step: str
    old_step: str
    status: str               # compared | same | old missing | new missing
    old_digest: str | None
    new_digest: str | None
    rows: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"step": self.step, "old_step": self.old_step, "status": self.status,
                "old_digest": self.old_digest, "new_digest": self.new_digest, "rows": self.rows}


@dataclass
class Diff:
    old: Side
    new: Side
    steps: list[StepDiff]
    reports: list[ReportDiff]

    @property
    def to_run(self) -> list[StepDiff]:
        return [s for s in self.steps if s.state == "to run"]

    @property
    def would_rerun(self) -> bool:
        return bool(self.to_run)

    def summary(self) -> dict:
        out: dict[str, Any] = {c: sum(s.change == c for s in self.steps) for c in CHANGES}
        todo = self.to_run
        out["to_run"] = len(todo)
        out["cached"] = sum(s.state == "cached" for s in self.steps)
        out["seconds_to_run"] = round(sum(s.seconds or 0.0 for s in todo), 3)
        out["unknown_seconds"] = sum(s.seconds is None for s in todo)
        out["would_rerun"] = self.would_rerun
        return out

    def as_json(self) -> dict:
        return {"format": FORMAT, "old": self.old.as_json(), "new": self.new.as_json(),
                "steps": [s.as_json() for s in self.steps],
                "families": [f.as_json() for f in families(self.steps)],
                "summary": self.summary(), "reports": [r.as_json() for r in self.reports]}


# -- one side, analysed -----------------------------------------------------------------------

@dataclass
class Analysed:
    """A side parsed and planned: recipe ids, the planner's statuses, its lock entries."""

    side: Side
    pipeline: Pipeline | None = None
    planner: Planner | None = None
    recipe: dict[str, str] = field(default_factory=dict)
    plan: dict[str, StepStatus] = field(default_factory=dict)
    warn: Callable[[str], None] = lambda m: None
    _lock: dict[str, LockEntry] | None = None  # read when first needed (only for fallbacks)

    def key(self, name: str | None) -> str | None:
        """The key the planner computed for ``name`` (None: after a miss, or no such step)."""
        s = self.plan.get(name) if name else None
        return s.key if s else None

    def locked_key(self, name: str | None) -> str | None:
        """The key the side's lock file names for ``name``."""
        if name is None or self.pipeline is None:
            return None
        if self._lock is None:
            self._lock = _lock_of(self.side, self.pipeline, self.warn)
        entry = self._lock.get(name)
        return entry.key if entry else None


def _lock_of(side: Side, pipeline: Pipeline, warn: Callable[[str], None]) -> dict[str, LockEntry]:
    """The side's lock entries: the lock committed at its revision, or the file's own lock."""
    from weightflow.dsl.store import lockfile

    try:
        if side.rev is None:
            return lockfile.read(pipeline.lock_path)
        if side.lock_text is None:
            return {}
        where = Path(side.label).with_suffix(".lock")  # "HEAD:examples/q.lock" in messages
        node, data = lockfile._parse(where, side.lock_text)  # the reader's own checks, on text
        return {} if data is None else lockfile._entries(where, node, data)
    except lockfile.LockfileError as exc:
        warn(f"ignoring the lock file of {side.label}: {exc}")
        return {}


def analyse(side: Side, store: Store, overrides: dict | None = None,
            warn: Callable[[str], None] = lambda m: None) -> Analysed:
    """Parse ``side`` at its working-copy path, compute its recipe ids and plan it."""
    from weightflow.dsl.engine.planner import Planner, plan
    from weightflow.dsl.lang import graph
    from weightflow.dsl.lang.pipeline import parse_text

    out = Analysed(side, warn=warn)
    if side.text is None:
        return out
    pipeline = parse_text(side.text, side.path, display=side.label, var_overrides=overrides)
    for w in pipeline.warnings:
        warn(w.format())
    planner = Planner(pipeline, store)
    for name in graph.topo_order(pipeline):
        inputs = {e.source: out.recipe[e.source] for e in pipeline.steps[name].inputs}
        out.recipe[name] = planner.key_of(name, inputs)
    out.pipeline, out.planner = pipeline, planner
    out.plan = {s.name: s for s in plan(pipeline, store, warn=warn)}
    return out


# -- comparing --------------------------------------------------------------------------------

def match(old: Analysed, new: Analysed) -> dict[str, str]:
    """Old step name -> new step name: the same name, or (renamed) an old step no longer
    there whose recipe id a new step has."""
    pairs = {n: n for n in old.recipe if n in new.recipe}
    gone: dict[str, list[str]] = {}
    for n, rid in old.recipe.items():
        if n not in new.recipe:
            gone.setdefault(rid, []).append(n)
    for n, rid in new.recipe.items():
        if n not in old.recipe and gone.get(rid):
            pairs[gone[rid].pop(0)] = n
    return pairs


def _get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _compared(a: Analysed, name: str, rename: Callable[[str], str]) -> dict:
    """The key's document of step ``name`` with each input as the name of the step it reads
    (``rename``: to the new side's names) and each data file as a ``DataRef``."""
    assert a.pipeline is not None and a.planner is not None
    step = a.pipeline.steps[name]
    # each input digest stands in as a StepName, which the key document keeps as the step's name
    names = cast(dict[str, str], {e.source: StepName(rename(e.source)) for e in step.inputs})
    doc = a.planner.material_of(name, names)
    written = step.params_json()
    excluded = set(getattr(step.op, "key_exclude", ()) or ())
    for path in step.data_files:
        if path[0] not in excluded:
            holder = _get(doc["params"], path[:-1])
            holder[path[-1]] = DataRef(str(_get(written, path)), holder[path[-1]]["file"])
    for edge in step.inputs:  # {"input": StepName} -> StepName
        if edge.field[0] not in excluded:
            holder = _get(doc["params"], edge.field[:-1])
            holder[edge.field[-1]] = holder[edge.field[-1]]["input"]
    return doc


def _same(a: Any, b: Any) -> bool:
    """Equal as the key sees it (``1`` and ``1.0`` differ there, and so here)."""
    from weightflow.dsl.engine.keys import canonical_json

    if isinstance(a, (StepName, DataRef)) or isinstance(b, (StepName, DataRef)) or MISSING in (a, b):
        return a == b
    try:
        return canonical_json(a) == canonical_json(b)
    except (TypeError, ValueError):
        return bool(a == b)


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else str(part)


def changes(old: Any, new: Any, path: str = "") -> list[ParamChange]:
    """Leaf-by-leaf differences; a list of plain values that changed length is one change."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += changes(old.get(k, MISSING), new.get(k, MISSING), _join(path, k))
        return out
    if isinstance(old, list) and isinstance(new, list):
        scalars = all(not isinstance(v, (dict, list)) for v in old + new)
        if len(old) == len(new) or not scalars:
            out = []
            for i in range(max(len(old), len(new))):
                out += changes(old[i] if i < len(old) else MISSING, new[i] if i < len(new) else MISSING,
                               _join(path, i))
            return out
    return [] if _same(old, new) else [ParamChange(path or "value", old, new)]


def own_changes(old: Analysed, old_name: str, new: Analysed, new_name: str,
                pairs: dict[str, str]) -> list[ParamChange]:
    """How a step's own recipe differs: op, op version, parameters, external inputs."""
    a = _compared(old, old_name, lambda n: pairs.get(n, n))
    b = _compared(new, new_name, lambda n: n)
    if a["op"] != b["op"]:  # another op: its parameters are not comparable one by one
        return [ParamChange("op", a["op"], b["op"])]
    out = changes(a["params"], b["params"])
    tag = new.pipeline.steps[new_name].op.discriminator if new.pipeline is not None else None
    out.sort(key=lambda c: c.path != tag)  # a merge's 'method' before the params it brings
    for part, label in (("op", "op"), ("version", "op version"), ("external", "external input")):
        if not _same(a.get(part, MISSING), b.get(part, MISSING)):
            out.append(ParamChange(label, a.get(part, MISSING), b.get(part, MISSING)))
    return out


def _recorded(store: Store, keys: Iterator[tuple[str | None, str]]) -> tuple[float | None, str | None]:
    """The run time the store's action manifest records for the first key that has one."""
    for key, source in keys:
        if not key:
            continue
        m = store.read_action(key)
        secs = m.get("seconds") if m else None
        if isinstance(secs, (int, float)) and not isinstance(secs, bool) and math.isfinite(secs):
            return float(secs), source
    return None, None


def _cost(d: StepDiff, old: Analysed, new: Analysed, store: Store) -> None:
    status = new.plan.get(d.name)
    d.state = "cached" if status is not None and status.status == "cached" else "to run"
    d.key = status.key if status else None
    d.old_key = old.key(d.old_name) or old.locked_key(d.old_name)

    def candidates() -> Iterator[tuple[str | None, str]]:  # lazily: the lock files only if needed
        yield d.key, "this key"
        yield d.old_key, "previous run"
        yield new.locked_key(d.name), "previous run"

    d.seconds, d.seconds_from = _recorded(store, candidates())


def _classify(name: str, old: Analysed, new: Analysed, pairs: dict[str, str],
              back: dict[str, str], done: dict[str, StepDiff]) -> StepDiff:
    assert new.pipeline is not None
    step = new.pipeline.steps[name]
    old_name = back.get(name)
    if old_name is None:
        return StepDiff(name, None, step.op.name, "added")
    if old.recipe[old_name] == new.recipe[name]:
        return StepDiff(name, old_name, step.op.name, "renamed" if old_name != name else "unchanged")
    params = own_changes(old, old_name, new, name, pairs)
    sources = dict.fromkeys(e.source for e in step.inputs)
    because = [s for s in sources if done[s].change in PROPAGATES]
    change = "changed" if params or not because else "invalidated"
    return StepDiff(name, old_name, step.op.name, change, params, because)


def compare(old_side: Side, new_side: Side, store: Store, overrides: dict | None = None,
            warn: Callable[[str], None] = lambda m: None) -> Diff:
    """The semantic diff of two sides (see the module docstring)."""
    from weightflow.dsl.lang import graph

    old = analyse(old_side, store, overrides, warn)
    new = analyse(new_side, store, overrides, warn)
    pairs = match(old, new)
    back = {v: k for k, v in pairs.items()}
    done: dict[str, StepDiff] = {}
    if new.pipeline is not None:
        for name in graph.topo_order(new.pipeline):
            done[name] = _classify(name, old, new, pairs, back, done)
            _cost(done[name], old, new, store)
    order = list(new.pipeline.steps) if new.pipeline is not None else []
    steps = [done[n] for n in order]
    for n in old.recipe:
        if n not in pairs:
            assert old.pipeline is not None
            steps.append(StepDiff(n, n, old.pipeline.steps[n].op.name, "removed",
                                  old_key=old.key(n) or old.locked_key(n)))
    return Diff(old_side, new_side, steps, compare_reports(old, new, pairs, store))


# -- reports ----------------------------------------------------------------------------------

def _report_of(a: Analysed, name: str, store: Store, trust_lock: bool) -> tuple[dict | None, str | None]:
    """(report.json, digest) of a Report step: the entry of its planned key when cached, else
    (``trust_lock``) the entry its side's lock file names."""
    status = a.plan.get(name)
    keys = [status.key if status is not None and status.status == "cached" else None]
    if trust_lock:
        keys.append(a.locked_key(name))
    for key in keys:
        entry = store.lookup(key, touch=False) if key else None
        if entry is None:
            continue
        try:
            return json.loads((entry.path / "report.json").read_text()), entry.digest
        except (OSError, ValueError):
            continue
    return None, None


def _model_names(a: Analysed, name: str, report: dict, rename: Callable[[str], str]) -> list[str]:
    """The report's rows named by the steps its ``models`` field lists (as ``report`` does);
    by digest when the report is laid out otherwise."""
    assert a.pipeline is not None
    sources = [rename(e.source) for e in a.pipeline.steps[name].inputs if e.field and e.field[0] == "models"]
    models = report.get("models") or []
    if len(sources) == len(models):
        return sources
    return [str(m.get("digest") or "?")[:12] for m in models]


def _values(report: dict, names: list[str]) -> dict[tuple[str, str, str], Any]:
    """(model, metric label, column) -> value, and the columns' directions under key ''."""
    out: dict[tuple[str, str, str], Any] = {}
    results = report.get("results") or []
    for j, metric in enumerate(report.get("metrics") or []):
        label = str(metric.get("label") or metric.get("metric") or j)
        for col in metric.get("columns") or []:
            out[("", label, col["name"])] = col.get("better")
            for i, model in enumerate(names):
                row = results[i][j].get("values", {}) if i < len(results) and j < len(results[i]) else {}
                out[(model, label, col["name"])] = row.get(col["name"])
    return out


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_rows(old: dict, old_names: list[str], new: dict, new_names: list[str]) -> list[dict]:
    """Every (model, metric, column) of either report: old, new and the change."""
    a, b = _values(old, old_names), _values(new, new_names)
    columns = list(dict.fromkeys([k[1:] for k in b if k[0] == ""] + [k[1:] for k in a if k[0] == ""]))
    models = list(dict.fromkeys(new_names + old_names))
    rows = []
    for label, col in columns:
        better = b.get(("", label, col), a.get(("", label, col)))
        for model in models:
            if (model, label, col) not in a and (model, label, col) not in b:
                continue
            ov, nv = a.get((model, label, col)), b.get((model, label, col))
            delta = nv - ov if _number(ov) and _number(nv) else None
            direction = None
            if delta is not None:
                if delta == 0:
                    direction = "same"
                elif better in ("higher", "lower"):
                    direction = "better" if (delta > 0) == (better == "higher") else "worse"
            rows.append({"model": model, "metric": label, "column": col, "better": better,
                         "old": ov, "new": nv, "delta": delta, "direction": direction})
    return rows


def compare_reports(old: Analysed, new: Analysed, pairs: dict[str, str], store: Store) -> list[ReportDiff]:
    """Every Report step both sides have (the same step, or renamed): its metrics side by side."""
    from weightflow.dsl.lang.spec import Kind

    if old.pipeline is None or new.pipeline is None:
        return []
    out = []
    for old_name, name in pairs.items():
        if new.pipeline.steps[name].output != Kind.REPORT:
            continue
        rold, dold = _report_of(old, old_name, store, trust_lock=True)
        rnew, dnew = _report_of(new, name, store, trust_lock=new.side.rev is not None)
        if rold is None or rnew is None:
            status = "old missing" if rold is None else "new missing"
            out.append(ReportDiff(name, old_name, status, dold, dnew))
            continue
        rows = metric_rows(rold, _model_names(old, old_name, rold, lambda n: pairs.get(n, n)),
                           rnew, _model_names(new, name, rnew, lambda n: n))
        out.append(ReportDiff(name, old_name, "same" if dold == dnew else "compared", dold, dnew, rows))
    return out


# -- sweep families ---------------------------------------------------------------------------

@dataclass
class Family:
    """The members of a sweep (``merged@k=v``) shown as one row."""

    name: str
    members: list[StepDiff]

    def counts(self) -> dict[str, int]:
        return {c: n for c in CHANGES if (n := sum(m.change == c for m in self.members))}

    def as_json(self) -> dict:
        todo = [m for m in self.members if m.state == "to run"]
        return {"family": self.name, "members": [m.name for m in self.members], "changes": self.counts(),
                "cached": sum(m.state == "cached" for m in self.members), "to_run": len(todo),
                "seconds": round(sum(m.seconds or 0.0 for m in todo), 3)}

    def label(self) -> str:
        return f"{self.name}@* ({len(self.members)} member{'s' if len(self.members) != 1 else ''})"


def families(steps: list[StepDiff]) -> list[Family]:
    groups: dict[str, list[StepDiff]] = {}
    for s in steps:
        if s.family is not None:
            groups.setdefault(s.family, []).append(s)
    return [Family(k, v) for k, v in groups.items()]


def grouped(steps: list[StepDiff], expand: bool) -> list[StepDiff | Family]:
    """``steps`` with each family's members replaced by one Family, where the first was."""
    if expand:
        return list(steps)
    fams = {f.name: f for f in families(steps)}
    out: list[StepDiff | Family] = []
    for s in steps:
        if s.family is None:
            out.append(s)
        elif s is fams[s.family].members[0]:
            out.append(fams[s.family])
    return out


# -- rendering --------------------------------------------------------------------------------

def seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 0.05:
        return "<0.1 s"
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {s % 60:.0f} s"


def about(s: float) -> str:
    """A recorded time as an estimate: ``~12 s``, ``<0.1 s``."""
    text = seconds(s)
    return text if text.startswith("<") else "~" + text


def _cost_text(d: StepDiff) -> str:
    if d.state == "removed":
        return "-"
    if d.state == "cached":
        return "cached"
    return f"to run {about(d.seconds)}" if d.seconds is not None else "to run (time unknown)"


def _why(d: StepDiff) -> list[str]:
    lines = [p.text() for p in d.params]
    if d.change == "added":
        lines.append("new step")
    elif d.change == "removed":
        lines.append("no longer in the pipeline")
    elif d.change == "renamed":
        lines.append(f"renamed from {d.old_name}: same recipe")
    if d.because:
        word = "input" if len(d.because) == 1 else "inputs"
        lines.append(f"{'and ' if d.params else ''}{word} {', '.join(d.because)} changed")
    if d.change == "changed" and not lines:
        lines.append("recipe differs")
    return lines


def _family_row(f: Family) -> list:
    c = f.as_json()
    changes_text = ", ".join(f"{n} {k}" for k, n in c["changes"].items())
    cost = f"{c['cached']} cached, {c['to_run']} to run" + (f" {about(c['seconds'])}" if c["seconds"] else "")
    ops = sorted({m.op for m in f.members})
    reasons: dict[str, int] = {}  # each distinct reason once, with how many members give it
    for m in f.members:
        for line in _why(m) or ["unchanged"]:
            reasons[line] = reasons.get(line, 0) + 1
    why = [f"{line} ({n} member{'s' if n != 1 else ''})" for line, n in reasons.items()]
    return [f.label(), ops[0] if len(ops) == 1 else "mixed", changes_text, cost, why]


def _rows(d: Diff, expand: bool) -> tuple[list[list], list[StepDiff]]:
    """Table rows for the steps that changed (or whose family did), and the unchanged steps."""
    shown = [s for s in d.steps if s.change != "unchanged"]
    fam_changed = {s.family for s in shown if s.family}
    shown = [s for s in d.steps if s.change != "unchanged" or (s.family in fam_changed and not expand)]
    quiet = [s for s in d.steps if s not in shown]
    rows: list[list] = []
    for item in grouped(shown, expand):
        if isinstance(item, Family):
            rows.append(_family_row(item))
        else:
            name = item.name if item.change != "renamed" else f"{item.name} (was {item.old_name})"
            rows.append([name, item.op, item.change, _cost_text(item), _why(item)])
    return rows, quiet


def _unchanged_line(quiet: list[StepDiff], expand: bool) -> str:
    if not quiet:
        return ""
    names = [x.label() if isinstance(x, Family) else x.name for x in grouped(quiet, expand)]
    listed = ", ".join(names[:12]) + (f", … ({len(names) - 12} more)" if len(names) > 12 else "")
    todo = [s for s in quiet if s.state == "to run"]
    tail = "all cached" if not todo else (
        f"{len(todo)} not in the store would run: {', '.join(s.name for s in todo[:8])}"
        + (" …" if len(todo) > 8 else ""))
    return f"unchanged: {len(quiet)} step{'s' if len(quiet) != 1 else ''} ({listed}); {tail}"


def _summary_line(d: Diff) -> str:
    s = d.summary()
    if not s["to_run"]:
        return "nothing would run: every step of the new side is cached"
    known = f", {about(s['seconds_to_run'])} recorded" if s["seconds_to_run"] else ""
    unknown = f" ({s['unknown_seconds']} with no recorded time)" if s["unknown_seconds"] else ""
    return f"would run: {s['to_run']} step{'s' if s['to_run'] != 1 else ''}{known}{unknown}; {s['cached']} cached"


def _table(header: list[str], rows: list[list]) -> list[str]:
    """Aligned columns; the last cell of a row may be several lines (continuation lines
    are indented to its column)."""
    flat = [r[:-1] + [r[-1][0] if r[-1] else ""] for r in rows]
    widths = [max(len(str(r[k])) for r in flat + [header]) for k in range(len(header) - 1)]
    indent = sum(widths) + 2 * len(widths)
    out = []
    for r, full in zip([header] + flat, [[*header[:-1], [header[-1]]]] + rows, strict=True):
        out.append(("  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]).rstrip())
        out += [" " * indent + extra for extra in full[-1][1:]]
    return out


def _delta_text(row: dict) -> str:
    if row["delta"] is None:
        return "–"
    sign = "+" if row["delta"] > 0 else ""
    note = {"better": " (better)", "worse": " (worse)"}.get(row["direction"] or "", "")
    return f"{sign}{fmt(row['delta'])}{note}"


def _metric_name(row: dict) -> str:
    arrow = {"lower": " ↓", "higher": " ↑"}.get(row["better"] or "", "")
    name = row["column"] if row["metric"] == row["column"] else f"{row['metric']} {row['column']}"
    return name + arrow


def _shown_metric_rows(rows: list[dict], expand: bool) -> tuple[list[dict], int]:
    """The metric rows a reader needs (those whose value changed; every row with
    ``expand``) and how many unchanged ones were left out: a reviewer looks for what moved,
    and a report of six models has a hundred values (``--json`` keeps them all)."""
    if expand:
        return rows, 0
    changed = [r for r in rows if r["old"] != r["new"]]
    return changed, len(rows) - len(changed)


def _unchanged_metrics_line(hidden: int) -> str:
    return (f"{hidden} unchanged value{'s' if hidden != 1 else ''} not shown (--expand shows every value)"
            if hidden else "")


def _report_note(r: ReportDiff, old: str, new: str) -> str:
    if r.status == "old missing":
        return f"no report of '{r.old_step}' in the store for {old}: no metrics to compare"
    if r.status == "new missing":
        return f"report '{r.step}' of {new} is not in the store yet (it would run): run it, then diff again"
    return f"report '{r.step}': identical results (same digest {(r.new_digest or '')[:12]})"


def text(d: Diff, expand: bool = False) -> str:
    """The diff as a terminal table."""
    out = [f"weightflow diff {d.old.label} {ARROW} {d.new.label}", ""]
    rows, quiet = _rows(d, expand)
    if rows:
        out += _table(["STEP", "OP", "CHANGE", "COST", "WHY"], rows)
        out.append("")
    if line := _unchanged_line(quiet, expand):
        out.append(line)
    out.append(_summary_line(d))
    for r in d.reports:
        out.append("")
        if r.status != "compared":
            out.append(_report_note(r, d.old.label, d.new.label))
            continue
        out.append(f"metrics of '{r.step}' ({d.old.label} {ARROW} {d.new.label}):")
        shown, hidden = _shown_metric_rows(r.rows, expand)
        table = [[row["model"], _metric_name(row), fmt(row["old"]), fmt(row["new"]), [_delta_text(row)]]
                 for row in shown]
        if table:
            out += ["  " + line for line in _table(["MODEL", "METRIC", "OLD", "NEW", "Δ"], table)]
        if note := _unchanged_metrics_line(hidden):
            out.append("  " + note)
    return "\n".join(out) + "\n"


def _md(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def markdown(d: Diff, expand: bool = False) -> str:
    """The diff as Markdown for a pull-request comment."""
    out = [f"### weightflow diff: `{d.old.label}` {ARROW} `{d.new.label}`", "", f"**{_summary_line(d)}**", ""]
    rows, quiet = _rows(d, expand)
    if rows:
        out += ["| step | op | change | cost | why |", "|---|---|---|---|---|"]
        for r in rows:
            why = "<br>".join(_md(x) for x in r[4])
            name, sep, rest = r[0].partition(" (")  # "ft (was d)", "merged@* (6 members)"
            rest = rest.replace("was ", "was `").replace(")", "`)") if rest.startswith("was ") else rest
            out.append(f"| `{_md(name)}`{sep[:1] + '(' + _md(rest) if sep else ''} | {_md(r[1])} | {r[2]} | "
                       f"{_md(r[3])} | {why} |")
        out.append("")
    if line := _unchanged_line(quiet, expand):
        out += [_md(line[0].upper() + line[1:]), ""]
    for rep in d.reports:
        if rep.status != "compared":
            out += [f"_{_md(_report_note(rep, d.old.label, d.new.label))}_", ""]
            continue
        shown, hidden = _shown_metric_rows(rep.rows, expand)
        out += [f"#### Metrics of `{rep.step}`", ""]
        if shown:
            out += ["| model | metric | old | new | Δ |", "|---|---|---:|---:|---:|"]
            out += [f"| `{_md(row['model'])}` | {_md(_metric_name(row))} | {fmt(row['old'])} | {fmt(row['new'])} | "
                    f"{_md(_delta_text(row))} |" for row in shown]
        if note := _unchanged_metrics_line(hidden):
            out += ["", f"_{note}_"]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# -- git's external diff driver ---------------------------------------------------------------

def unified(old: Side, new: Side) -> str:
    """The line diff of the two texts (what git would have shown)."""
    lines = difflib.unified_diff((old.text or "").splitlines(keepends=True), (new.text or "").splitlines(keepends=True),
                                 fromfile=old.label, tofile=new.label)
    body = "".join(x if x.endswith("\n") else x + "\n\\ No newline at end of file\n" for x in lines)
    return body


def _is_pipeline(side: Side) -> bool:
    """A text with a top-level ``weightflow:`` key (a ``*.yaml`` pattern also catches CI files)."""
    return side.text is None or any(line.startswith("weightflow:") for line in side.text.splitlines())


def driver(argv: list[str], store: Store, overrides: dict | None, fmt_md: bool, expand: bool,
           warn: Callable[[str], None]) -> str:
    """What git's external diff driver prints: the semantic diff, then the line diff.  Never
    raises for a bad pipeline (git stops the whole diff when a driver fails): then it says why
    and shows the line diff alone."""
    from weightflow.dsl.present.diff_sides import driver_sides

    if len(argv) == 1:  # git's call for an unmerged path
        return f"* Unmerged path {argv[0]}\n"
    if len(argv) != 7:
        raise WeightflowError(f"--git-driver expects git's 7 arguments (path old-file old-hex old-mode "
                              f"new-file new-hex new-mode), got {len(argv)}")
    old, new, path = driver_sides(argv)
    head = f"diff --weightflow a/{path} b/{path}\n"
    if not (_is_pipeline(old) and _is_pipeline(new)) or (old.text is None and new.text is None):
        return head + unified(old, new)
    try:
        d = compare(old, new, store, overrides, warn)
    except WeightflowError as exc:
        reason = "\n".join(exc.lines())
        return head + f"weightflow diff: cannot compare the pipelines:\n{reason}\n\n" + unified(old, new)
    body = markdown(d, expand) if fmt_md else text(d, expand)
    return head + body + "\n" + unified(old, new)


# -- the command ------------------------------------------------------------------------------

HELP = """\
Show what a change to a pipeline does: per step added / removed / renamed (same recipe under
another name: free) / changed (each parameter old → new, after defaults and ${vars} are
resolved) / invalidated (by which upstream input); what is cached already and the recorded
run time of what would run; and, where both sides have reports in the store, every metric
side by side with its change.  Runs no model.

Arguments (as git diff reads them):
  diff P                 the committed HEAD:P against the working copy P
  diff REV P             REV:P (a branch, a tag, HEAD~1) against the working copy P
  diff REV1 REV2 P       REV1:P against REV2:P
  diff OLD NEW           each a pipeline file, /dev/null (no file) or REV:PATH
                         (main:pipelines/x.yaml; :PATH is the index); PATH is relative to
                         the repository's top level unless it starts with ./ or ../

A side read from git is parsed as if it were the working copy's file: its relative data
and model paths resolve against the working copy's pipeline directory (a diff compares
recipes, not the data files of another checkout).  --var applies to both sides.

As git's external diff driver (git diff then shows the semantic diff, then the line diff):
  echo '*.yaml diff=weightflow' >> .gitattributes     (or a narrower pattern)
  git config diff.weightflow.command "weightflow diff --git-driver"
A file that is not a pipeline (no top-level 'weightflow:') gets the plain line diff;
`git diff --no-ext-diff` shows the plain diff of everything.

Exit status: 0; with --exit-code, 1 when something would run (as git diff --exit-code).
The --json fields are documented in weightflow/dsl/present/diff.py."""


def cli(args, store: Store, overrides: dict | None, warn: Callable[[str], None]) -> tuple[str, int]:
    """(what ``weightflow diff`` prints, its exit status) for parsed arguments ``args``."""
    from weightflow.dsl.present.diff_sides import resolve

    if args.git_driver:
        return driver(args.sides, store, overrides, args.md, args.expand, warn), 0
    old, new = resolve(args.sides)
    d = compare(old, new, store, overrides, warn)
    if args.json:
        out = json.dumps(d.as_json(), indent=1) + "\n"
    else:
        out = markdown(d, args.expand) if args.md else text(d, args.expand)
    return out, 1 if args.exit_code and d.would_rerun else 0
