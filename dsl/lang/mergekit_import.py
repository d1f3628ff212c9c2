"""``weightflow import mergekit CONFIG.yml``: a mergekit merge config as a weightflow pipeline.

A mergekit user switches with one command: every model becomes a ``load`` step, delta
methods (task arithmetic, TIES, DARE, breadcrumbs, DELLA, ...) get one ``extract-delta``
per fine-tune against ``base_model`` and a ``merge`` over ``deltas``, whole-model methods a
``merge`` over ``models``.  The pipeline produces the tensors mergekit would, so the
translation must reproduce mergekit's parameter semantics exactly (``mergekit/config.py``,
``evaluate_setting``, and ``mergekit/plan.py``):

- A parameter is looked up per tensor in scopes of falling precedence: the model's own
  ``parameters`` (per-model parameters only), the slice's, then the top-level ones.  In a
  scope, a list of ``{filter, value}`` conditions takes the first whose ``filter`` is a
  *substring* of the tensor name (no filter, or ``*``, matches every tensor); a scope
  where none matches falls through to the next, and the method's default comes last.
- A list of numbers is a gradient over the layers: layer ``i`` of ``L`` takes it at
  ``t = i / (L − 1)`` (``t = 1`` when ``L = 1``), interpolating linearly between the two
  nearest entries (``scaled = t·(n − 1)``, ``v = (1 − f)·v[⌊scaled⌋] + f·v[⌊scaled⌋ + 1]``);
  tensors outside the layers (embeddings, final norm, head) take it at ``t = 0``.

That becomes weightflow's per-tensor rules (first matching glob wins, ``*`` last): one rule
per layer for a gradient, a filter ``f`` as the glob ``*f*`` (escaped; for one layer, the
globs that say "under ``model.layers.i.`` and containing ``f``", straddling the prefix
included).  Where the models are local, their tensor names (read from the safetensors
headers, no torch) check the rules against mergekit's semantics name by name, and rules that
match no tensor are left out.  The pipeline is then validated as weightflow would
validate the file, so what is written is a pipeline that loads.

A per-model parameter that a weightflow method takes once (``density``, ``gamma``,
``epsilon``) must agree across the models, or the method's field must take one value per
model (the task-vector merges take a ``density`` per delta).  mergekit's ``normalize`` on a plain weighted
sum divides the weights by their sum.  Random masks (DARE, DELLA) come from weightflow's
seed, so those merges equal mergekit's in distribution, not bit for bit.

What has no weightflow equivalent is an ``ImportProblem`` naming the config key and why
(the CLI prints ``CONFIG.yml: key 'X': ...`` and exits 2), never a silent approximation.
Adding a method is one ``MethodMap`` entry in ``METHODS``.  Nothing here imports torch.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightflow.dsl.lang.diagnostics import PipelineError, WeightflowError, did_you_mean

HEADER = "# weightflow pipeline imported from the mergekit config"  # marks files this command wrote
DEFAULT_LAYER_PREFIX = "model.layers."
MERGED_STEP = "merged"
REQUIRED = object()  # a mergekit parameter without a default


class ImportProblem(WeightflowError):
    """A key of the mergekit config that cannot be translated, and why."""

    def __init__(self, source: str, key: str, why: str, line: int | None = None):
        self.source, self.key, self.why, self.line = source, key, why, line
        where = f" (line {line})" if line else ""
        super().__init__(f"{source}: key '{key}'{where}: {why}")

    def lines(self) -> list[str]:
        return [str(self)]


# -- what each mergekit method becomes ------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One mergekit parameter of a method and what it becomes in the weightflow step.

    ``scope``: ``shared`` (one value per tensor), ``input`` (per model, base included) or
    ``non_base`` (per model except the base), as mergekit's ``ParameterScope``.
    ``kind`` says how the value type-checks (``float``, ``bool``, ``int``).
    ``to``: how it becomes the step's field ``field``:

    - ``rules``: a number or per-tensor rules (weightflow's ``PerTensor``), one for all models;
    - ``number``: one number (or boolean) for every tensor and every model;
    - ``rescale``: mergekit's ``rescale: true`` (match the L1 norm) as ``rescale: l1 | none``;
    - ``weights``: per-model values (numbers or rules) forming the step's ``weights`` list;
    - ``divide``: mergekit's ``normalize: true`` on a plain weighted sum, translated by
      dividing the weights by their sum (weightflow's delta sums have no normalize);
    - ``fixed``: weightflow does only mergekit's default; another value is an error (``why``);
    - ``none``: does not change the tensors (int8_mask; density without sparsification).
    """

    name: str
    scope: str
    kind: str = "float"
    default: Any = REQUIRED
    to: str = "rules"
    field: str | None = None
    why: str = ""


@dataclass(frozen=True)
class MethodMap:
    """A mergekit method and the weightflow merge method that reproduces it.

    ``inputs``: ``models`` (every input, base included, in ``models:``), ``pair``
    (``models: [base, other]``), ``base+models`` (``base:`` and the others in ``models:``),
    ``base?+models`` (the same, ``base:`` only where the config has a base_model),
    ``deltas`` (``base:`` and an ``extract-delta`` per other model in ``deltas:``),
    ``slices`` (passthrough: ``slices:`` or the one model).  ``base``: mergekit's base
    policy (``required``, ``optional``, ``ignored``); ``others``: the (min, max) number of
    non-base inputs.  ``random``: masks are drawn by weightflow's seed, so tensors equal
    mergekit's in distribution, not bit for bit.
    """

    mergekit: str
    weightflow: str
    inputs: str
    params: tuple[Param, ...] = ()
    base: str = "required"
    others: tuple[int, int | None] = (1, None)
    random: bool = False


_NO_L1 = "weightflow has no L1 rescale for this method (mergekit's rescale: true)"


def _numbers(value) -> list[float]:
    """Every number a density holds: one number, per-tensor rules, or one of those per delta."""
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [float(value["value"])]
    return [x for item in value for x in _numbers(item)]


def _gta(name: str, weightflow: str, *, density: str = "rules", normalize: bool = False, normalize_to: str = "number",
         rescale: bool = False, rescale_to: str = "fixed", extra: tuple[Param, ...] = (),
         random: bool = False) -> MethodMap:
    """mergekit's generalised task arithmetic methods share their parameters."""
    params = (
        Param("weight", "non_base", to="weights"),
        Param("density", "non_base", default=1.0, to=density, field="density"),
        Param("lambda", "shared", default=1.0, to="number", field="lambda"),
        Param("normalize", "shared", "bool", default=normalize, to=normalize_to, field="normalize"),
        Param("rescale", "shared", "bool", default=rescale, to=rescale_to, field="rescale", why=_NO_L1),
        Param("int8_mask", "shared", "bool", default=False, to="none"),
        *extra,
    )
    return MethodMap(name, weightflow, "deltas", params, random=random)


_GAMMA = Param("gamma", "non_base", default=0.01, to="number", field="gamma")
_EPSILON = Param("epsilon", "non_base", default=0.15, to="number", field="epsilon")

#: mergekit method -> weightflow merge method; adding one is one entry here
METHODS: dict[str, MethodMap] = {m.mergekit: m for m in (
    MethodMap("linear", "linear", "models", (
        Param("weight", "input", to="weights"),
        Param("normalize", "shared", "bool", default=True, to="number", field="normalize"),
    ), base="ignored"),
    MethodMap("slerp", "slerp", "pair", (Param("t", "shared", field="t"),), others=(1, 1)),
    MethodMap("nearswap", "nearswap", "base+models", (Param("t", "shared", to="number", field="t"),),
              others=(1, 1)),
    MethodMap("model_stock", "model_stock", "base+models", (
        Param("filter_wise", "shared", "bool", default=False, to="number", field="filter_wise"),
    ), others=(2, None)),
    MethodMap("nuslerp", "nuslerp", "base?+models", (
        Param("weight", "non_base", to="weights"),
        Param("nuslerp_row_wise", "shared", "bool", default=False, to="number", field="nuslerp_row_wise"),
        Param("nuslerp_flatten", "shared", "bool", default=True, to="number", field="nuslerp_flatten"),
    ), base="optional", others=(2, 2)),
    MethodMap("multislerp", "multislerp", "base?+models", (
        Param("weight", "non_base", to="weights"),
        Param("normalize_weights", "shared", "bool", default=True, to="number", field="normalize_weights"),
        Param("eps", "shared", default=1e-8, to="number", field="eps"),
    ), base="optional", others=(2, None)),
    MethodMap("karcher", "karcher", "models", (
        Param("max_iter", "shared", "int", default=10, to="number", field="max_iter"),
        Param("tol", "shared", default=1e-5, to="number", field="tol"),
    ), base="ignored", others=(2, None)),
    MethodMap("arcee_fusion", "arcee_fusion", "base+models", others=(1, 1)),
    MethodMap("passthrough", "passthrough", "slices", (
        Param("scale", "input", default=1.0, to="weights", field="scale"),
    ), base="ignored", others=(1, 1)),
    _gta("task_arithmetic", "task-arithmetic", density="none", normalize_to="divide", rescale_to="none"),
    _gta("ties", "ties", normalize=True),
    _gta("dare_ties", "dare-ties", rescale=True, rescale_to="rescale", random=True),
    _gta("dare_linear", "dare-linear", normalize_to="divide", rescale=True, rescale_to="rescale", random=True),
    _gta("breadcrumbs", "breadcrumbs", normalize_to="divide", extra=(_GAMMA,)),
    _gta("breadcrumbs_ties", "breadcrumbs-ties", rescale_to="rescale", extra=(_GAMMA,)),
    _gta("della", "della", normalize=True, rescale=True, rescale_to="rescale", extra=(_EPSILON,), random=True),
    _gta("della_linear", "della-linear", rescale=True, rescale_to="rescale", extra=(_EPSILON,), random=True),
    MethodMap("sce", "sce", "deltas", (
        Param("select_topk", "shared", default=1.0, to="number", field="select_topk"),
        Param("int8_mask", "shared", "bool", default=False, to="none"),
    )),
    MethodMap("ram", "ram", "deltas", (Param("epsilon", "shared", default=1e-5, to="number", field="epsilon"),)),
    MethodMap("ramplus_tl", "ramplus_tl", "deltas", (
        Param("r", "shared", default=0.1, to="number", field="r"),
        Param("alpha", "shared", default=0.2, to="number", field="alpha"),
        Param("epsilon", "shared", default=1e-5, to="number", field="epsilon"),
    )),
)}

#: the fixed extra fields of a weightflow method, where they differ from its defaults
FIXED = {"breadcrumbs": {"sign_consensus": False}, "della": {"sign_consensus": True}}

MERGEKIT_DTYPES = ("float32", "float16", "bfloat16")
TOP_LEVEL = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template")


def _weightflow_methods() -> dict[str, type]:
    """weightflow's merge methods here: name -> params class (torch-free declarations)."""
    from weightflow.ops.merge_methods import methods

    return {name: m.params for name, m in methods().items()}


def supported_methods() -> dict[str, str]:
    """mergekit method -> the weightflow method it becomes, for the methods this install has."""
    have = _weightflow_methods()
    return {name: mm.weightflow for name, mm in METHODS.items() if mm.weightflow in have}


# -- parameter settings, evaluated as mergekit evaluates them --------------------------

@dataclass(frozen=True)
class Cond:
    """One ``{filter, value}`` condition of a setting (``filter`` None matches everything);
    ``value`` a scalar or a gradient (tuple); ``key`` where the config writes it."""

    filter: str | None
    value: Any
    key: str


_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def _check_value(v: Any, kind: str) -> Any | None:
    """``v`` as pydantic's lax mode reads it for ``kind`` (mergekit validates so), or None."""
    if kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
        return None
    if kind == "int":
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            return None
        try:
            return int(v) if isinstance(v, (int, float)) else int(str(v).strip())
        except ValueError:
            return None
    try:
        f = float(v) if isinstance(v, (bool, int, float)) else float(str(v).strip())
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def at_t(value: Any, t: float, kind: str) -> Any:
    """A scalar, or a gradient at ``t``, exactly as mergekit's ``evaluate_setting``."""
    if not isinstance(value, tuple):
        return value
    if kind != "float":
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def _matches(cond: Cond, name: str) -> bool:
    return cond.filter is None or cond.filter == "*" or (bool(name) and cond.filter in name)


def evaluate(chain: list[Cond], name: str, t: float, kind: str) -> Any | None:
    """The value mergekit gives tensor ``name`` at gradient position ``t`` (None: unset)."""
    for cond in chain:
        if _matches(cond, name):
            return at_t(cond.value, t, kind)
    return None


# -- layers and rules ---------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Layers ``first .. first + count - 1``: tensors named ``prefix + i + '.' ...``; a
    gradient runs over them (mergekit: over a slice's layers, or all of a model's)."""

    prefix: str
    first: int
    count: int

    def layer_of(self, name: str) -> int | None:
        """The layer index in this range that tensor ``name`` belongs to, if any."""
        i = layer_index(self.prefix, name)
        return i if i is not None and self.first <= i < self.first + self.count else None

    def t(self, layer: int | None) -> float:
        """mergekit's gradient position of a layer (0 for tensors outside the layers)."""
        if layer is None:
            return 0.0
        return (layer - self.first) / (self.count - 1) if self.count > 1 else 1.0


def layer_index(prefix: str, name: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)
    return int(head[0]) if len(head) == 2 and head[0].isdigit() else None


def glob_escape(text: str) -> str:
    """``text`` as a glob that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _contains(filter_: str | None) -> str:
    return "*" if filter_ in (None, "*") else f"*{glob_escape(filter_)}*"


def _layer_globs(prefix: str, filter_: str | None) -> list[str]:
    """Globs matching exactly the names that start with ``prefix`` and contain ``filter_``
    (after the prefix, inside it, or straddling its end)."""
    p = glob_escape(prefix)
    if filter_ in (None, "*") or filter_ in prefix:
        return [p + "*"]
    globs = [f"{p}*{glob_escape(filter_)}*"]
    globs += [p + glob_escape(filter_[k:]) + "*" for k in range(1, len(filter_)) if prefix.endswith(filter_[:k])]
    return globs


Rules = list[tuple[str, Any]]


def first_match(rules: Rules, name: str) -> int | None:
    for i, (pattern, _) in enumerate(rules):
        if fnmatch.fnmatchcase(name, pattern):
            return i
    return None


def to_rules(chain: list[Cond], kind: str, layout: Layout | None) -> Rules | None:
    """weightflow rules ``[(glob, value), ...]`` giving each tensor mergekit's value (None:
    a gradient, and no layout to spread it over); the last rule is ``*`` where some
    condition matches every tensor."""
    rules: Rules = []
    for cond in chain:
        if isinstance(cond.value, tuple):
            if layout is None:
                return None
            for i in range(layout.first, layout.first + layout.count):
                v = at_t(cond.value, layout.t(i), kind)
                rules += [(g, v) for g in _layer_globs(f"{layout.prefix}{i}.", cond.filter)]
            rules.append((_contains(cond.filter), at_t(cond.value, 0.0, kind)))
        else:
            rules.append((_contains(cond.filter), cond.value))
        if cond.filter in (None, "*"):
            break
    return rules


def simplify(rules: Rules, names: list[str] | None) -> Rules:
    """The same values, fewer rules: with the tensor names known, only rules that are the
    first match of some tensor stay (and the final ``*``); rules just before the final
    ``*`` that give its value go."""
    if names is not None:
        used = {first_match(rules, n) for n in names}
        rules = [r for i, r in enumerate(rules) if i in used or (i == len(rules) - 1 and r[0] == "*")]
    if rules and rules[-1][0] == "*":
        while len(rules) > 1 and rules[-2][1] == rules[-1][1]:
            del rules[-2]
    return rules


# -- models ---------------------------------------------------------------------------

_HUB = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")
_LAYER = re.compile(r"^(.*?\.)(\d+)\.")
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class Model:
    """One model of the config, as it will be loaded."""

    ref: str                      # as the config writes it
    key: str                      # where it is written, for errors
    parameters: dict | None = None
    param_key: str = ""           # where its parameters are written
    layer_range: tuple[int, int] | None = None
    step: str = ""
    source: str = ""
    names: list[str] | None = None    # tensor names (local models)
    prefix: str | None = None         # where its layers are: prefix + i + "."
    layers: int | None = None
    float_dtype: str | None = None


def _read_local(model: Model, path: Path, problem: Any) -> None:
    """Tensor names, layers and float dtype of a local model directory (headers only)."""
    from weightflow.dsl.format.checkpoint import list_tensors

    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (it has {', '.join(pickled)}: weightflow never loads pickle checkpoints)" if pickled else ""
        raise problem(model.key, f"{path} holds no .safetensors weights{hint}")
    names: list[str] = []
    dtypes: set[str] = set()
    for f in files:
        try:
            infos = list_tensors(f)
        except (OSError, ValueError) as exc:
            raise problem(model.key, f"cannot read {f}: {exc}") from None
        names += [i.name for i in infos]
        dtypes |= {_ST_DTYPES[i.dtype] for i in infos if i.dtype in _ST_DTYPES}
    model.names = sorted(names)
    model.float_dtype = dtypes.pop() if len(dtypes) == 1 else None
    counts: dict[str, set[int]] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            counts.setdefault(m.group(1), set()).add(int(m.group(2)))
    if counts:
        model.prefix = max(counts, key=lambda p: (len(counts[p]), -len(p)))
        model.layers = _config_layers(path) or max(counts[model.prefix]) + 1


def _config_layers(path: Path) -> int | None:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = cfg.get(k) if isinstance(cfg, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _step_name(ref: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(ref.split("@")[0].rstrip("/")).name).strip("_") or "model"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


# -- the translation --------------------------------------------------------------------

@dataclass
class Imported:
    """The translated pipeline and what the CLI reports about it."""

    text: str
    mergekit_method: str
    method: str
    steps: list[str]
    exact: bool
    warnings: list[str] = field(default_factory=list)


class _Translator:
    """One config's translation: read, resolve the models, map the parameters, write."""

    def __init__(self, text: str, source: str, *, cwd: Path, out_path: Path | None, layers: int | None,
                 layer_prefix: str | None, trust_remote_code: bool, out_dir: str | None):
        self.text, self.source, self.cwd, self.out_path = text, source, cwd, out_path
        self.layers, self.layer_prefix = layers, layer_prefix
        self.trust_remote_code, self.out_dir = trust_remote_code, out_dir
        self.warnings: list[str] = []
        self.pos: Any = None
        self.taken: set[str] = {MERGED_STEP}
        self.loads: dict[str, Model] = {}   # ref -> the model loaded for it
        self.delta_steps: dict[str, dict] = {}
        self.params_cls: type | None = None  # the weightflow method's params

    # errors --------------------------------------------------------------------------
    def problem(self, key: str, why: str) -> ImportProblem:
        return ImportProblem(self.source, key, why, self._line(key))

    def _line(self, key: str) -> int | None:
        if self.pos is None:
            return None
        path = tuple(int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"[^.\[\]]+|\[\d+\]", key))
        return self.pos.key(path).line if path else None

    def warn(self, key: str, why: str) -> None:
        self.warnings.append(f"{self.source}: key '{key}': {why}")

    # reading -------------------------------------------------------------------------
    def read(self) -> dict:
        from weightflow.dsl.lang.yamlsource import load_yaml

        data, pos, diags = load_yaml(self.text, self.source)
        errors = [d for d in diags if d.severity == "error"]
        if errors:
            raise PipelineError(errors)
        self.pos = pos
        if not isinstance(data, dict):
            raise ImportProblem(self.source, "(top level)", "a mergekit config is a mapping with merge_method "
                                "and models (or slices)")
        for k in data:
            if k not in TOP_LEVEL:
                why = ("this is a mergekit-moe config; only mergekit-yaml merge configs are imported"
                       if k in ("experts", "gate_mode", "experts_per_token") else
                       f"not a key of a mergekit merge config{did_you_mean(k, TOP_LEVEL)}")
                raise self.problem(str(k), why)
        return data

    def mapping(self, value: Any, key: str) -> dict | None:
        if value is not None and not isinstance(value, dict):
            raise self.problem(key, "expected a mapping of parameter name -> setting")
        return value

    def _scalar(self, v: Any, key: str, kind: str) -> Any:
        checked = None if isinstance(v, (list, dict)) or v is None else _check_value(v, kind)
        if checked is None:
            raise self.problem(key, f"expected a {_noun(kind)}, got {_short(v)}")
        return checked

    def _value(self, v: Any, key: str, kind: str) -> Any:
        if isinstance(v, list):
            if not v:
                raise self.problem(key, "an empty gradient: give a value or a list of values")
            return tuple(self._scalar(e, f"{key}[{i}]", kind) for i, e in enumerate(v))
        return self._scalar(v, key, kind)

    def _cond(self, d: dict, key: str, kind: str) -> Cond:
        if "value" not in d:
            raise self.problem(key, "a condition needs 'value' (and optionally 'filter')")
        for extra in d:
            if extra not in ("value", "filter"):
                raise self.problem(f"{key}.{extra}", "a condition has only 'filter' and 'value'"
                                   f"{did_you_mean(extra, ['filter', 'value'])}")
        f = d.get("filter")
        if f is not None and not isinstance(f, str):
            raise self.problem(f"{key}.filter", f"expected a tensor-name substring, got {_short(f)}")
        return Cond(f, self._value(d["value"], f"{key}.value", kind), key)

    def setting(self, raw: Any, key: str, kind: str) -> list[Cond]:
        """One scope's setting of a parameter as conditions, type-checked as mergekit does."""
        if isinstance(raw, dict):
            return [self._cond(raw, key, kind)]
        if isinstance(raw, list) and raw and all(isinstance(e, dict) for e in raw):
            return [self._cond(e, f"{key}[{i}]", kind) for i, e in enumerate(raw)]
        if isinstance(raw, list) and any(isinstance(e, dict) for e in raw):
            raise self.problem(key, "mixes conditions ({filter, value}) and plain values in one list")
        return [Cond(None, self._value(raw, key, kind), key)]

    def chain(self, p: Param, scopes: list[tuple[str, dict | None]]) -> list[Cond]:
        """Every condition for ``p`` over ``scopes`` (key, parameters), highest precedence first."""
        out: list[Cond] = []
        for key, params in scopes:
            if params and p.name in params:
                out += self.setting(params[p.name], f"{key}.{p.name}" if key else p.name, p.kind)
        return out

    # models --------------------------------------------------------------------------
    def entry(self, raw: Any, key: str, slice_source: bool = False) -> Model:
        allowed = ("model", "parameters", "layer_range") if slice_source else ("model", "parameters")
        if isinstance(raw, str) and not slice_source:
            raw = {"model": raw}
        if not isinstance(raw, dict) or "model" not in raw:
            raise self.problem(key, "expected {model: PATH_OR_HUB_ID, parameters: {...}}")
        for k in raw:
            if k not in allowed:
                raise self.problem(f"{key}.{k}", f"not a key of a mergekit model entry{did_you_mean(k, allowed)}")
        m = Model(self.ref(raw["model"], f"{key}.model"), f"{key}.model",
                  self.mapping(raw.get("parameters"), f"{key}.parameters"), f"{key}.parameters")
        if slice_source:
            lr = raw.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in lr) and 0 <= lr[0] < lr[1]):
                raise self.problem(f"{key}.layer_range", f"expected [first, end] layer indices, got {_short(lr)}")
            m.layer_range = (lr[0], lr[1])
        return self.load(m)

    def ref(self, ref: Any, key: str) -> str:
        if not isinstance(ref, str) or not ref.strip():
            raise self.problem(key, "expected a model path or hub id (model references written as mappings, "
                               "e.g. with override_architecture, are not translated)")
        if "+" in ref:
            raise self.problem(key, f"{ref!r} applies a LoRA adapter (MODEL+LORA), which is not translated: "
                               "merge the adapter into the model first")
        if ref.count("@") > 1:
            raise self.problem(key, f"{ref!r}: more than one '@'")
        return ref

    def load(self, m: Model) -> Model:
        """Where ``m`` comes from: a local directory (found from the working directory, as
        mergekit finds it) or a hub repository; one load step per distinct model."""
        known = self.loads.get(m.ref)
        if known is not None:
            for k in ("step", "source", "names", "prefix", "layers", "float_dtype"):
                setattr(m, k, getattr(known, k))
            return m
        path_text, _, rev = m.ref.partition("@")
        local = Path(path_text).expanduser()
        local = local if local.is_absolute() else self.cwd / local
        m.step = _step_name(path_text, self.taken)
        if local.is_dir():
            if rev:
                raise self.problem(m.key, f"{m.ref!r}: a local directory has no revision")
            m.source = self._local_source(path_text, local)
            _read_local(m, local, self.problem)
        elif local.exists():
            raise self.problem(m.key, f"{local} is not a model directory")
        elif not _HUB.match(path_text):
            raise self.problem(m.key, f"{m.ref!r} is neither a local model directory (looked for {local}) nor "
                               "a hub id ORG/NAME[@REVISION]")
        else:
            m.source = f"hf:{path_text}" + (f"@{rev}" if rev else "")
            if "/" in path_text and (self.cwd / path_text.split("/")[0]).is_dir():
                self.warn(m.key, f"{local} is not a directory, so {path_text!r} is read as a hub id (as mergekit "
                          "reads it); check the path if you meant a local model")
            m.prefix, m.layers = self.layer_prefix or DEFAULT_LAYER_PREFIX, self.layers
        self.loads[m.ref] = m
        return m

    def _local_source(self, written: str, local: Path) -> str:
        p = Path(written).expanduser()
        if p.is_absolute() or self.out_path is None:
            return written
        out_dir = self.out_path.resolve().parent
        return written if out_dir == self.cwd.resolve() else os.path.relpath(local.resolve(), out_dir)

    def models(self, data: dict) -> tuple[list[Model], dict | None, str]:
        """The input models (with their own parameters), the slice's parameters, and the key
        of the list; one slice over every layer of every model is read as a models list."""
        if data.get("modules") is not None:
            raise self.problem("modules", "per-module merges (multimodal models) are not translated")
        if (data.get("models") is None) == (data.get("slices") is None):
            raise self.problem("models", "give exactly one of 'models' or 'slices'")
        if data.get("models") is not None:
            entries = data["models"]
            if not isinstance(entries, list) or not entries:
                raise self.problem("models", "expected a list of {model: ..., parameters: ...}")
            return [self.entry(e, f"models[{i}]") for i, e in enumerate(entries)], None, "models"
        slices = self.slices(data)
        if len(slices) != 1:
            raise self.problem("slices", f"{len(slices)} output slices stack layers, which only mergekit's "
                               "passthrough does; other methods are translated for one slice over all layers")
        models, params = slices[0]
        for m in models:
            lo, hi = m.layer_range or (0, 0)
            if m.layers is None:
                raise self.problem(m.key.replace(".model", ".layer_range"), "cannot tell whether the slice "
                                   "covers every layer of a hub model: give --layers N")
            if (lo, hi) != (0, m.layers):
                raise self.problem(m.key.replace(".model", ".layer_range"), f"[{lo}, {hi}] is not every layer "
                                   f"([0, {m.layers}]); only passthrough stacks parts of models")
        return models, params, "slices[0].sources"

    def slices(self, data: dict) -> list[tuple[list[Model], dict | None]]:
        slices = data["slices"]
        if not isinstance(slices, list) or not slices:
            raise self.problem("slices", "expected a list of {sources: [...]}")
        out = []
        for i, sl in enumerate(slices):
            key = f"slices[{i}]"
            if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
                raise self.problem(key, "expected {sources: [{model: ..., layer_range: [first, end]}, ...]}")
            for k in sl:
                if k not in ("sources", "parameters", "base_model", "residual_weight"):
                    raise self.problem(f"{key}.{k}", "not a key of a mergekit slice")
                if k in ("base_model", "residual_weight") and sl[k] is not None:
                    raise self.problem(f"{key}.{k}", "a per-slice base model or residual weight is not translated")
            models = [self.entry(s, f"{key}.sources[{j}]", slice_source=True) for j, s in enumerate(sl["sources"])]
            out.append((models, self.mapping(sl.get("parameters"), f"{key}.parameters")))
        return out

    # the method ----------------------------------------------------------------------
    def method(self, data: dict) -> tuple[MethodMap, type]:
        mk = data.get("merge_method")
        if not isinstance(mk, str):
            raise self.problem("merge_method", "missing: which mergekit merge method (linear, slerp, ties, ...)")
        mm = METHODS.get(mk)
        have = _weightflow_methods()
        if mm is None or mm.weightflow not in have:
            why = (f"mergekit's {mk} has no weightflow merge method here" if mm else
                   f"unknown mergekit merge method{did_you_mean(mk, METHODS)}")
            raise self.problem("merge_method", f"{why}; translated: {', '.join(sorted(supported_methods()))}")
        return mm, have[mm.weightflow]

    def dtype(self, data: dict, key: str) -> str | None:
        v = data.get(key)
        if v is None:
            return None
        name = str(v).removeprefix("torch.")
        if name not in MERGEKIT_DTYPES:
            raise self.problem(key, f"{_short(v)}: weightflow stores float32, float16 or bfloat16")
        return name

    def tokenizer(self, data: dict, params: type, models: list[Model]) -> dict | None:
        """mergekit's tokenizer_source (or tokenizer.source) as the merge's ``tokenizer:``."""
        if data.get("chat_template") is not None:
            raise self.problem("chat_template", "a chat template is not translated (the merged model takes "
                               "its tokenizer files from the models)")
        key, source = "tokenizer_source", data.get("tokenizer_source")
        tok = data.get("tokenizer")
        if tok is not None:
            if source is not None:
                raise self.problem("tokenizer", "give tokenizer_source or tokenizer, not both (mergekit refuses)")
            if not isinstance(tok, dict):
                raise self.problem("tokenizer", "expected {source: union | base | MODEL}")
            for k in tok:
                if k != "source" and tok[k] not in (None, {}, []):
                    raise self.problem(f"tokenizer.{k}", "only tokenizer.source is translated (added tokens and "
                                       "padding the vocabulary are not)")
            key, source = "tokenizer.source", tok.get("source")
        if source is None:
            return None
        if "tokenizer" not in getattr(params, "model_fields", {}):
            raise self.problem(key, "this weightflow merge method does not build a merged tokenizer")
        if source in ("union", "base"):
            return {"source": source}
        m = self.load(Model(self.ref(source, key), key))
        if m.ref not in {x.ref for x in models}:
            models.append(m)  # a load step for the tokenizer's model only
        return {"source": m.step}

    # parameters ----------------------------------------------------------------------
    def per_tensor(self, p: Param, chain: list[Cond], layout: Layout | None, names: list[str] | None,
                   mk: str, hint: str) -> Any:
        """A parameter's value for every tensor: a number, or ``[{pattern, value}, ...]``."""
        if not chain:
            if p.default is REQUIRED:
                raise self.problem(hint, f"mergekit's {mk} needs {p.name} (it has no default)")
            return float(p.default) if p.kind == "float" else p.default
        rules = to_rules(chain, p.kind, layout)
        if rules is None:
            grad = next(c for c in chain if isinstance(c.value, tuple))
            raise self.problem(grad.key, "a gradient is spread over the layers, whose number is unknown for a "
                               "hub model: give --layers N (and --layer-prefix if its layers are not named "
                               f"'{DEFAULT_LAYER_PREFIX}N.')")
        if rules[-1][0] != "*":
            if p.default is not REQUIRED:
                rules.append(("*", p.default))
            else:
                missing = next((n for n in names or [] if first_match(rules, n) is None), None)
                if names is None or missing is not None:
                    which = f" (e.g. {missing})" if missing else ""
                    raise self.problem(chain[-1].key, f"the filters leave tensors without a {p.name}{which}, and "
                                       f"mergekit's {mk} has no default for it: add a value without a filter")
        rules = simplify(rules, names)
        if names is not None:
            self._check(p, chain, rules, layout, names)
        if p.kind == "float":
            rules = [(g, float(v)) for g, v in rules]
        if len(rules) == 1 and rules[0][0] == "*":
            return rules[0][1]
        return [{"pattern": g, "value": v} for g, v in rules]

    def _check(self, p: Param, chain: list[Cond], rules: Rules, layout: Layout | None, names: list[str]) -> None:
        """Every tensor gets mergekit's value from the rules (the translation checks itself)."""
        for n in names:
            want = evaluate(chain, n, layout.t(layout.layer_of(n)) if layout else 0.0, p.kind)
            want = p.default if want is None else want
            i = first_match(rules, n)
            got = rules[i][1] if i is not None else None
            if want is not REQUIRED and got != want:
                raise WeightflowError(f"internal error translating {p.name}: tensor {n} would get {got}, "
                                      f"mergekit gives {want}; please report this config")

    def constant(self, p: Param, value: Any, chain: list[Cond], wf: str, key: str) -> Any:
        if isinstance(value, list):
            raise self.problem(next((c.key for c in chain), key), f"weightflow's {wf} takes one {p.field} for "
                               "every tensor, not filters or gradients")
        return value

    def fields(self, mm: MethodMap, models: list[Model], others: list[Model], scopes: list, layout: Layout | None,
               names: list[str] | None) -> tuple[dict, list]:
        """The merge step's fields from the method's parameters, and the per-model weights."""
        fields: dict[str, Any] = {}
        weights: list[Any] = []
        divide = False
        for p in mm.params:
            if p.scope == "shared":
                chain = self.chain(p, scopes)
                value = self.per_tensor(p, chain, layout, names, mm.mergekit, f"parameters.{p.name}")
                if p.to == "rules":
                    fields[p.field or p.name] = value
                elif p.to != "none":
                    value = self.constant(p, value, chain, mm.weightflow, f"parameters.{p.name}")
                    if p.to == "divide":
                        divide = bool(value)
                    elif p.to == "fixed":
                        if value != p.default:
                            raise self.problem(next(c.key for c in chain), f"{p.name}: {_short(value)}: {p.why}")
                    elif p.to in ("rescale", "number"):
                        fields[p.field or p.name] = ("l1" if value else "none") if p.to == "rescale" else value
                    else:
                        raise TypeError(f"{mm.mergekit}.{p.name}: unknown translation {p.to!r}")
                continue
            targets = others if p.scope == "non_base" else models
            values = [self.per_tensor(p, self.chain(p, [(m.param_key, m.parameters), *scopes]), layout,
                                      m.names if m.names is not None else names, mm.mergekit,
                                      f"{m.param_key}.{p.name}" if m.param_key else f"parameters.{p.name}")
                      for m in targets]
            if p.to == "weights":
                weights = values
            elif p.to != "none":
                fields[p.field or p.name] = self._one_for_all(p, mm, targets, values, scopes)
        if divide:
            weights = self._divided(weights, others)
        return fields, weights

    def _one_for_all(self, p: Param, mm: MethodMap, targets: list[Model], values: list, scopes: list) -> Any:
        """A per-model mergekit parameter as the one value weightflow's method takes for all
        models, or as one value per model where the method's field takes such a list."""
        def where(i: int) -> str:
            m = targets[i]
            if m.parameters and p.name in m.parameters:
                return f"{m.param_key}.{p.name}"
            return next((f"{k}.{p.name}" for k, sc in scopes if sc and p.name in sc), f"{m.key}")
        for i, v in enumerate(values):
            if p.to == "number" and isinstance(v, list):
                raise self.problem(where(i), f"weightflow's {mm.weightflow} takes one {p.field} for every tensor, "
                                   "not filters or gradients")
        texts = [json.dumps(v) for v in values]
        if len(set(texts)) > 1 and self._takes_list(p.field or p.name, values):
            return values
        if len(set(texts)) > 1:
            i = next(i for i, t in enumerate(texts) if t != texts[0])
            raise self.problem(where(i), f"weightflow's {mm.weightflow} takes one {p.field} for all models, but "
                               f"{targets[0].ref} and {targets[i].ref} get different ones: give every model the "
                               f"same {p.name}")
        return values[0]

    def _takes_list(self, name: str, values: list) -> bool:
        """Whether the weightflow method's field ``name`` takes one value per model."""
        from pydantic import TypeAdapter, ValidationError

        info = getattr(self.params_cls, "model_fields", {}).get(name)
        if info is None:
            return False
        try:
            TypeAdapter(info.annotation).validate_python(values)
        except ValidationError:
            return False
        return True

    def _divided(self, weights: list[Any], others: list[Model]) -> list[Any]:
        """mergekit's normalize on a weighted sum: Σ wᵢ·δᵢ / Σ wᵢ (undivided where |Σ wᵢ| < 1e-8)."""
        for m, w in zip(others, weights, strict=True):
            if isinstance(w, list):
                raise self.problem("parameters.normalize", "normalize: true divides by the sum of the weights, "
                                   f"translated for one weight per model, but {m.ref} has filtered or gradient "
                                   "weights: give weights that sum to 1 and normalize: false")
        total = sum(weights)
        return weights if abs(total) < 1e-8 else [w / total for w in weights]

    def warn_unused(self, mm: MethodMap, models: list[Model], others: list[Model], scopes: list) -> None:
        """Parameters mergekit would not read for this method: said, and left out."""
        names = {p.name: p for p in mm.params}
        for key, params in scopes:
            for k in params or {}:
                if k not in names:
                    self.warn(f"{key}.{k}", f"not a parameter of mergekit's {mm.mergekit}; mergekit ignores it, "
                              "and so does the import")
        for m in models:
            for k in m.parameters or {}:
                p = names.get(k)
                if p is None:
                    why = f"not a parameter of mergekit's {mm.mergekit}"
                elif p.scope == "shared":
                    why = "shared by all models: mergekit reads it from the top-level (or slice) parameters only"
                elif p.scope == "non_base" and m not in others:
                    why = "not read for the base model"
                else:
                    continue
                self.warn(f"{m.param_key}.{k}", f"{why}; mergekit ignores it, and so does the import")

    # the whole translation -----------------------------------------------------------
    def translate(self) -> Imported:
        data = self.read()
        mm, params_cls = self.method(data)
        self.params_cls = params_cls
        dtype, out_dtype = self.dtype(data, "dtype"), self.dtype(data, "out_dtype")
        top = self.mapping(data.get("parameters"), "parameters")
        if mm.inputs == "slices":
            merge, models = self.passthrough(data, mm, top)
        else:
            merge, models = self.merge(data, mm, top)
        tokenizer = self.tokenizer(data, params_cls, models)
        if tokenizer is not None:
            merge["tokenizer"] = tokenizer
        if out_dtype is not None and out_dtype != dtype:
            merge["dtype"] = out_dtype
        return self.emit(mm, merge, models, dtype)

    def base_and_others(self, data: dict, mm: MethodMap, models: list[Model],
                        list_key: str) -> tuple[Model | None, list[Model]]:
        """The base model (added as an input where the list lacks it, as mergekit adds it)
        and the other inputs, checked against the method's counts."""
        seen: set[str] = set()
        for m in models:
            if m.ref in seen:
                raise self.problem(m.key, f"{m.ref} is listed twice (mergekit refuses duplicate inputs)")
            seen.add(m.ref)
        base = None
        if data.get("base_model") is not None:
            ref = self.ref(data["base_model"], "base_model")
            base = next((m for m in models if m.ref == ref), None)
            if base is None:
                if data.get("slices") is not None:
                    raise self.problem("base_model", "the base model must be one of the slice's sources")
                base = self.load(Model(ref, "base_model"))
                models.append(base)  # mergekit adds it as an input, with the top-level parameters only
        if mm.base == "required" and base is None:
            raise self.problem("base_model", f"mergekit's {mm.mergekit} needs a base_model")
        others = models if mm.base == "ignored" else [m for m in models if m is not base]
        lo, hi = mm.others
        if len(others) < lo or (hi is not None and len(others) > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            what = ("model" if hi == 1 else "models") + ("" if mm.base == "ignored" else " besides the base")
            raise self.problem(list_key, f"mergekit's {mm.mergekit} takes {want} {what}, got {len(others)}")
        return base, others

    def merge(self, data: dict, mm: MethodMap, top: dict | None) -> tuple[dict, list[Model]]:
        models, slice_params, list_key = self.models(data)
        base, others = self.base_and_others(data, mm, models, list_key)
        scopes = [("slices[0].parameters", slice_params), ("parameters", top)]
        self.warn_unused(mm, models, others, [s for s in scopes if s[1] is not None])
        layout = self.layout(models)
        names = _all_names(models)
        fields, weights = self.fields(mm, models, others, scopes, layout, names)
        merge: dict[str, Any] = {"op": "merge", "method": mm.weightflow}
        if mm.inputs == "deltas":
            merge["base"] = base.step if base else None
            merge["deltas"] = [self.delta_step(m, base) for m in others]
        elif mm.inputs == "pair":
            merge["models"] = [base.step if base else None] + [m.step for m in others]
        elif mm.inputs in ("base+models", "base?+models"):
            if base is not None:
                merge["base"] = base.step
            merge["models"] = [m.step for m in others]
        else:
            merge["models"] = [m.step for m in models]
        if weights:
            merge["weights"] = weights
        merge.update(fields)
        merge.update(FIXED.get(mm.weightflow, {}))
        self.full_density(merge)
        return merge, models

    def full_density(self, merge: dict) -> None:
        """mergekit sparsifies nothing where density is 1 (breadcrumbs' gamma and DELLA's
        epsilon go unused there); weightflow says the same with gamma / epsilon 0."""
        spread = next((k for k in ("gamma", "epsilon") if k in merge), None)
        density = merge.get("density")
        if spread is None or not merge[spread] or density is None:
            return
        values = _numbers(density)
        if all(v == 1.0 for v in values):
            merge[spread] = 0.0
        elif any(v >= 1.0 for v in values):
            raise self.problem("parameters.density", f"density 1 for some tensors keeps all their elements in "
                               f"mergekit ({spread} unused there), but weightflow's {merge['method']} takes one "
                               f"{spread} for all tensors: give density below 1 everywhere, or {spread}: 0")

    def delta_step(self, m: Model, base: Model | None) -> str:
        name = _step_name(f"{m.step}_delta", self.taken)
        self.delta_steps[name] = {"op": "extract-delta", "model": m.step, "base": base.step if base else None}
        return name

    def layout(self, models: list[Model]) -> Layout | None:
        """The layers a gradient runs over: all of them (every model must have as many)."""
        found = {(m.prefix, m.layers) for m in models if m.layers is not None}
        if len(found) > 1:
            raise self.problem(models[0].key, "the models have different layers: " + ", ".join(
                f"{m.ref}: {m.layers} under {m.prefix}" for m in models if m.layers is not None))
        if not found:
            return None
        prefix, layers = found.pop()
        if self.layers is not None and self.layers != layers:
            raise ImportProblem(self.source, "--layers", f"{self.layers}, but the local models have {layers} layers")
        return Layout(prefix or DEFAULT_LAYER_PREFIX, 0, layers or 0)

    def passthrough(self, data: dict, mm: MethodMap, top: dict | None) -> tuple[dict, list[Model]]:
        """mergekit's passthrough: stacked slices of one model each, or one model copied."""
        scale = mm.params[0]
        merge: dict[str, Any] = {"op": "merge", "method": mm.weightflow}
        if data.get("base_model") is not None:
            self.warn("base_model", "mergekit's passthrough does not read a base model; left out")
        if data.get("models") is not None:
            models, _, _ = self.models(data)
            if len(models) != 1:
                raise self.problem("models", f"mergekit's passthrough takes exactly 1 model, got {len(models)} "
                                   "(stack layers of several models with slices:)")
            m = models[0]
            self.warn_unused(mm, models, models, [("parameters", top)] if top is not None else [])
            value = self.per_tensor(scale, self.chain(scale, [(m.param_key, m.parameters), ("parameters", top)]),
                                    self.layout(models), m.names, mm.mergekit, f"{m.param_key}.scale")
            merge["models"] = [m.step]
            if value != 1.0:
                merge["scale"] = value
            return merge, models
        if data.get("modules") is not None:
            raise self.problem("modules", "per-module merges (multimodal models) are not translated")
        out, models = [], []
        for i, (sources, params) in enumerate(self.slices(data)):
            if len(sources) != 1:
                raise self.problem(f"slices[{i}].sources", f"mergekit's passthrough takes one source per slice, "
                                   f"got {len(sources)}")
            m = sources[0]
            lo, hi = m.layer_range or (0, 0)
            if m.prefix is None:
                raise self.problem(m.key, f"{m.ref} has no numbered layers to slice")
            scopes = [(f"slices[{i}].parameters", params), ("parameters", top)]
            self.warn_unused(mm, sources, sources, [s for s in scopes if s[1] is not None])
            layout = Layout(m.prefix, lo, hi - lo)
            names = None if m.names is None else [n for n in m.names if layer_index(m.prefix, n) is None
                                                  or layout.layer_of(n) is not None]
            value = self.per_tensor(scale, self.chain(scale, [(m.param_key, m.parameters), *scopes]), layout,
                                    names, mm.mergekit, f"{m.param_key}.scale")
            sl: dict[str, Any] = {"model": m.step, "layers": [lo, hi]}
            if value != 1.0:
                sl["scale"] = value
            out.append(sl)
            if m.ref not in {x.ref for x in models}:
                models.append(m)
        merge["slices"] = out
        return merge, models

    # writing -------------------------------------------------------------------------
    def emit(self, mm: MethodMap, merge: dict, models: list[Model], dtype: str | None) -> Imported:
        steps: dict[str, dict] = {}
        for m in models:
            if m.step not in steps:
                steps[m.step] = {"op": "load", "source": m.source}
                if self.trust_remote_code:
                    steps[m.step]["trust_remote_code"] = True
        steps.update(self.delta_steps)
        steps[MERGED_STEP] = merge
        if dtype is None:
            found = {m.float_dtype for m in models}
            dtype = found.pop() if len(found) == 1 and None not in found else None
            if dtype is None:
                self.warn("dtype", "not set, and the models' dtype is not known here: weightflow stores float32 "
                          "(mergekit keeps the models' own); set dtype to be sure")
        pipeline: dict[str, Any] = {"weightflow": 1, "name": _pipeline_name(self.source)}
        if mm.random:
            pipeline["seed"] = 0
        if dtype is not None:
            pipeline["dtype"] = dtype
        pipeline["steps"] = steps
        if self.out_dir:
            pipeline["outputs"] = {MERGED_STEP: self.out_dir}
        run = self.out_path.name if self.out_path else "PIPELINE.yaml"
        header = [f"{HEADER} {Path(self.source).name}",
                  f"# by `weightflow import mergekit`: mergekit {mm.mergekit} -> weightflow merge method "
                  f"{merge['method']}.",
                  f"# Run it with: weightflow run {run}" + ("" if self.out_dir else
                                                             f"; then: weightflow export {run} {MERGED_STEP} DIR")]
        if mm.random:
            header += ["# Its random masks are drawn from weightflow's seed, not mergekit's torch RNG: the merge",
                       "# equals mergekit's in distribution, not bit for bit."]
        text = "\n".join(header) + "\n" + dump_yaml(pipeline)
        self.validate(text, pipeline)
        return Imported(text, mm.mergekit, merge["method"], list(steps), not mm.random, self.warnings)

    def validate(self, text: str, pipeline: dict) -> None:
        """The text reads back as the intended pipeline, and weightflow accepts it."""
        import yaml

        from weightflow.dsl.lang.pipeline import parse_text

        if yaml.safe_load(text) != pipeline:
            raise WeightflowError("internal error: the imported pipeline does not read back as written; please "
                                  "report this config")
        where = self.out_path if self.out_path is not None else self.cwd / "pipeline.yaml"
        try:
            parse_text(text, where, display="the imported pipeline")
        except PipelineError as exc:
            first = exc.diagnostics[0].message if exc.diagnostics else str(exc)
            raise self.problem("merge_method", f"weightflow rejects the translated merge: {first}") from None


def _all_names(models: list[Model]) -> list[str] | None:
    """Every tensor name of the merged model, when every model is local."""
    if any(m.names is None for m in models):
        return None
    return sorted({n for m in models for n in m.names or []})


def _noun(kind: str) -> str:
    return {"bool": "boolean", "int": "whole number", "float": "number"}[kind]


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _pipeline_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(source).stem).strip("-") or "mergekit-import"


# -- a small YAML writer: block steps, flow lists and rules, exact floats ---------------

_PLAIN = re.compile(r"^[A-Za-z_./][A-Za-z0-9_./-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        text = repr(v)
        mant, e, exp = text.partition("e")
        if e and "." not in mant:
            text = f"{mant}.0e{exp}"  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
        return text
    if _PLAIN.match(v) and v.lower() not in _RESERVED:
        return v
    return json.dumps(v)


def _simple(v: Any) -> bool:
    if isinstance(v, dict):
        return all(not isinstance(x, (dict, list)) for x in v.values())
    if isinstance(v, list):
        return all(not isinstance(x, (dict, list)) for x in v)
    return True


def _flow(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    return _scalar(v)


def _items(v: Any, indent: str) -> list[str]:
    lines: list[str] = []
    if isinstance(v, dict):
        for k, x in v.items():
            lines += [f"{indent}{k}: {_flow(x)}"] if _simple(x) else [f"{indent}{k}:", *_items(x, indent + "  ")]
        return lines
    for x in v:
        if _simple(x):
            lines.append(f"{indent}- {_flow(x)}")
        else:
            sub = _items(x, indent + "  ")
            lines += [f"{indent}- {sub[0][len(indent) + 2:]}", *sub[1:]]
    return lines


def dump_yaml(pipeline: dict) -> str:
    """``pipeline`` as YAML: one line per load/delta step, the merge step as a block."""
    return "\n".join(_items(pipeline, "")) + "\n"


# -- entry points ------------------------------------------------------------------------

def import_mergekit(config: str | os.PathLike, *, out_path: str | os.PathLike | None = None,
                    layers: int | None = None, layer_prefix: str | None = None,
                    trust_remote_code: bool = False, out_dir: str | None = None,
                    cwd: str | os.PathLike | None = None) -> Imported:
    """Translate the mergekit config file ``config``; raise ``ImportProblem`` naming the key
    that cannot be translated.  Relative model paths are found from ``cwd`` (default: the
    working directory), as mergekit finds them; in a pipeline written to ``out_path`` in
    another directory they are rewritten relative to it."""
    try:
        text = Path(config).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightflowError(f"cannot read {config}: {exc}") from None
    return _Translator(text, str(config), cwd=Path(cwd) if cwd is not None else Path.cwd(),
                       out_path=Path(out_path) if out_path is not None else None, layers=layers,
                       layer_prefix=layer_prefix, trust_remote_code=trust_remote_code, out_dir=out_dir).translate()


def written_by_import(path: Path) -> bool:
    """Whether the file at ``path`` was written by this command (safe to overwrite)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False
