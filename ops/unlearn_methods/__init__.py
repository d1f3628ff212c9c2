"""The unlearning methods of the ``unlearn`` op: one module per method, found by discovery.

A method is one file in this package, named after it with ``_`` for ``-``
(``grad_diff.py`` is ``grad-diff``), that defines ``METHOD = UnlearnMethod(...)``.  No
other file lists methods: ``unlearn`` builds from ``methods()`` its ``method:`` choices,
the method-specific YAML keys (bounds, "does not apply" errors, defaults filled in
before hashing), its doc text and the hooks its training loop calls.  Modules whose name
starts with ``_`` are not methods.  A method module must not import torch at module level.

Every gradient method minimises ``forget_weight``·L_forget + ``retain_weight``·L_retain
(the op's loop); its ``forget_loss`` gives L_forget of a forget batch, and it has the
retain term when ``retain_weight`` is one of its ``params``.  A method without gradient
steps (ssd) gives ``apply`` instead.

Method-specific keys: a method lists in ``params`` every key it uses, each a ``Param``
(default, what it means for this method, bounds).  Methods using the same key (npo,
simnpo and wga all have ``beta``) share one YAML key, so they must agree on its type
and bounds (checked at import); its description lists each method's meaning and default.

What a method asks the loop for beyond the forget batch's NLL and logits, each a field
of ``UnlearnMethod`` that fills fields of ``ForgetBatch``: ``needs_reference`` (the
frozen input model's NLL and logits), ``alternate`` (a second answer per forget row,
e.g. DPO's preferred one; encoded after the row's prompt), ``needs_hidden`` (the output
of decoder layer ``opts["layer"]``, and on retain batches the frozen input model's too);
``retain_loss`` replaces the op's nll/kl retain term, ``trainable`` picks the parameters
that are updated, ``refuses`` names training keys it does not take, ``tasks`` those it
is defined for.

A method whose result is not one set of weights (ULD's logit difference, ECO's prompt
guard) gives ``write``: the step then outputs a Composite (ops/lib/composite.py) that
``write(job)`` puts into ``job.ctx.out``, and nothing else is saved.  ``trains`` makes,
from the input model, the model the loop trains instead of it (ULD's assistant); the
input model stays as it was (``job.target``).  A ``Param`` with ``required=True`` must be
given for its method (ECO's ``classifier``).
"""

from __future__ import annotations

import importlib
import keyword
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Optional

from pydantic import Field

from weightflow.dsl.lang.spec import FiniteFloat


@dataclass(frozen=True)
class Param:
    """A method-specific key of the unlearn step: its default for the method, meaning, bounds."""

    default: Any
    description: str
    gt: float | None = None
    ge: float | None = None
    annotation: Any = FiniteFloat
    required: bool = False  # the method needs a value (its default is only a placeholder)

    @property
    def shape(self) -> tuple:
        """What methods sharing the key must agree on."""
        return (self.annotation, self.gt, self.ge)


# The two weights of the loss every gradient method shares (a method lists those it has).
FORGET_WEIGHT = Param(1.0, "weight of L_forget", ge=0)
RETAIN_WEIGHT = Param(1.0, "weight of L_retain", ge=0)


@dataclass(frozen=True)
class UnlearnMethod:
    """One unlearning method, as its module declares it."""

    name: str
    doc: str  # its formula (the module docstring), assembled into the op's doc
    params: Mapping[str, Param] = field(default_factory=dict)  # every method-specific key it uses
    # True: needs 'retain' (unless retain_weight is 0, for a method with the retain term);
    # "optional": retain data is only measured; False: retain data does not apply.
    needs_retain: bool | Literal["optional"] = True
    retain_use: str = ""  # what retain data is for, shown when it is missing (no retain term)
    needs_reference: bool = False  # ForgetBatch.ref_nll_sum / ref_logits: the frozen input model's
    forget_loss: Callable[..., Any] | None = None  # (ForgetBatch, opts) -> L_forget (a 0-d tensor)
    apply: Callable[..., dict] | None = None  # (Job) -> info: changes job.model without gradient steps
    tasks: tuple[str, ...] = ("causal-lm", "sequence-classification")  # the tasks it is defined for
    # (forget row index, row, opts, seed) -> the row's alternate answer (text, or token ids for a
    # pre-tokenized row): encoded after the row's prompt, it fills ForgetBatch.alt_* (causal LM)
    alternate: Callable[..., Any] | None = None
    forget_fields: Callable[[dict], list[str]] | None = None  # opts -> fields every forget row needs
    # ForgetBatch.hidden: output of decoder layer opts["layer"]; RetainBatch.hidden and ref_hidden
    # (the frozen input model's) for its retain_loss
    needs_hidden: bool = False
    retain_loss: Callable[..., Any] | None = None  # (RetainBatch, opts) -> L_retain, instead of nll/kl
    trainable: Callable[..., set] | None = None  # (model, opts) -> names of the parameters updated
    refuses: tuple[str, ...] = ()  # training keys that do not apply to it (e.g. "lora")
    trains: Callable[..., Any] | None = None  # (input model, opts) -> the model the loop trains instead
    write: Callable[..., dict] | None = None  # (Job) -> info: writes the step's Composite into job.ctx.out
    check: Callable[[dict], None] | None = None  # (its keys -> values) -> ValueError on a bad combination

    @property
    def defaults(self) -> dict[str, Any]:
        """Its method-specific keys and their defaults (filled in before hashing)."""
        return {k: p.default for k, p in self.params.items()}

    @property
    def retain_term(self) -> bool:
        return "retain_weight" in self.params

    @property
    def gradient(self) -> bool:
        return self.apply is None

    @property
    def composite(self) -> bool:
        """Whether the step outputs a Composite (``write``) rather than the model's weights."""
        return self.write is not None


@dataclass
class ForgetBatch:
    """One forget micro-batch as the op's loop computed it, for a method's ``forget_loss``.

    log π(y) is the summed log-probability of an example's target tokens (its label, for
    a classifier); |y| their number.
    """

    nll_sum: Any  # [B] −log π_θ(y) per example
    n_tok: Any  # [B] |y|
    logits: Any  # the model's logits (float32)
    labels: Any  # the batch's labels ([B, T] token labels, -100 without loss; [B] classes)
    task: str
    ref_nll_sum: Any = None  # [B] −log π_ref(y), for a method with needs_reference
    ref_logits: Any = None  # π_ref's logits (float32, no gradient), for a method with needs_reference
    seed: int = 0  # the step's seed (a method's own random draws derive from it)
    hidden: Any = None  # [B, T, d] output of decoder layer opts["layer"], for needs_hidden
    alt_nll_sum: Any = None  # [B] −log π_θ(y_alt) of each row's alternate answer, for alternate
    alt_n_tok: Any = None  # [B] |y_alt|
    alt_ref_nll_sum: Any = None  # [B] −log π_ref(y_alt) (alternate and needs_reference)

    def mean_nll(self):
        """Token-averaged NLL of the batch."""
        from weightflow.ops.lib.training import mean_nll

        return mean_nll(self.nll_sum, self.n_tok)

    def token_nll(self):
        """(−log π_θ(y_t) per target position, mask of the positions that have a target).

        Causal LM: token t is predicted from the logits at t−1 ([B, T−1]); classification:
        one target per example ([B, 1]).
        """
        import torch.nn.functional as F

        from weightflow.ops.lib.training import IGNORE

        if self.task == "causal-lm":
            lg, lb = self.logits[:, :-1], self.labels[:, 1:]
            nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE,
                                  reduction="none").view(lb.shape)
            return nll, lb != IGNORE
        nll = F.cross_entropy(self.logits, self.labels, reduction="none")
        return nll[:, None], nll.new_ones(nll.shape[0], 1, dtype=bool)


def target_mask(labels, task: str):
    """Positions of a batch whose hidden state is scored: those with a label (causal LM,
    unshifted: the hidden state at a target token), every example for a classifier."""
    import torch

    from weightflow.ops.lib.training import IGNORE

    return labels != IGNORE if task == "causal-lm" else torch.ones(labels.shape[0], 1, dtype=torch.bool,
                                                                   device=labels.device)


@dataclass
class RetainBatch:
    """One retain micro-batch for a method's own ``retain_loss``."""

    nll_sum: Any  # [B] −log π_θ(y)
    n_tok: Any  # [B] |y|
    logits: Any
    labels: Any
    task: str
    hidden: Any = None  # [B, T, d] output of decoder layer opts["layer"] (needs_hidden)
    ref_hidden: Any = None  # the same of the frozen input model (needs_hidden)
    attention_mask: Any = None  # [B, T] 1 on the tokens, 0 on padding


def decoder_layers(model) -> Any:
    """The model's stack of decoder (transformer) blocks: the ModuleList holding
    ``config.num_hidden_layers`` blocks (``model.layers`` in Llama, ``transformer.h`` in GPT-2)."""
    import torch

    from weightflow.dsl.lang.diagnostics import OpError

    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and (n is None or len(m) == n)]
    if not lists:
        raise OpError(f"cannot find the decoder layers of {type(model).__name__} (no list of "
                      f"{n} blocks among its modules)")
    return lists[0]


def decoder_layer(model, index: int) -> tuple[str, Any]:
    """(its name, the module) of decoder layer ``index``; out of range is an OpError."""
    from weightflow.dsl.lang.diagnostics import OpError

    name, layers = decoder_layers(model)
    if not 0 <= index < len(layers):
        raise OpError(f"layer: {index} is out of range: the model has {len(layers)} decoder layers "
                      f"(0..{len(layers) - 1})")
    return f"{name}.{index}", layers[index]


class Capture:
    """``with Capture(module) as c:`` records the module's output of the forward pass inside
    (its first element when it returns a tuple) as ``c.output``."""

    def __init__(self, module):
        self.module: Any = module
        self.output: Any = None
        self._handle: Any = None

    def _hook(self, module, inputs, output):
        if self.output is None:  # the first call: a recomputation under checkpointing comes later
            self.output = output[0] if isinstance(output, tuple) else output

    def __enter__(self) -> Capture:
        self.output = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@dataclass
class Job:
    """What a method's ``apply`` works on (the model is loaded, on its device, data encoded)."""

    model: Any
    forget: list  # encoded examples (weightflow.ops.lib.training.Example)
    retain: list | None
    batch_size: int
    pad_id: int
    task: str
    device: str
    opts: dict  # its method-specific keys -> values
    ctx: Any  # the op's context (progress bars, warnings)
    # for ``write`` (and an ``apply`` that needs them):
    target: Any = None  # the input model as loaded (unchanged when the method ``trains`` another)
    art: Any = None  # the input model's artifact (``.path``: its stored directory)
    inputs: Any = None  # the step's inputs (other models it names, e.g. ECO's classifier)
    params: Any = None  # the step's validated params (data mapping, training keys)
    encoder: Any = None  # the data encoder (the input model's tokenizer)
    state: dict = field(default_factory=dict)  # what ``apply`` hands to ``write``


def field_name(key: str) -> str:
    """The Python attribute of a YAML key (``lambda`` -> ``lambda_``)."""
    return f"{key}_" if keyword.iskeyword(key) else key


@cache
def methods() -> dict[str, UnlearnMethod]:
    """Every method module of this package, by method name, in module-name order."""
    found: dict[str, UnlearnMethod] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if not isinstance(method, UnlearnMethod):
            raise TypeError(f"{module.__name__} defines no METHOD = UnlearnMethod(...)")
        if method.name != info.name.replace("_", "-"):
            raise ValueError(f"{module.__name__}: METHOD.name {method.name!r} does not match the file name "
                             f"(expected {info.name.replace('_', '-')!r})")
        found[method.name] = method
    keys(found)  # the shared keys agree
    return found


def keys(registry: Mapping[str, UnlearnMethod]) -> dict[str, list[tuple[str, Param]]]:
    """Each method-specific key -> [(method, its Param)], keys in first-use order."""
    out: dict[str, list[tuple[str, Param]]] = {}
    for name, method in registry.items():
        if method.gradient == (method.forget_loss is None):
            raise ValueError(f"method {name}: give forget_loss (gradient steps) or apply (none), not both")
        for key, param in method.params.items():
            users = out.setdefault(key, [])
            if users and users[0][1].shape != param.shape:
                raise ValueError(f"'{key}' of method {name} has other bounds than in {users[0][0]} "
                                 f"({param.shape} vs {users[0][1].shape}); methods sharing a key must agree")
            users.append((name, param))
    return out


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def describe(users: list[tuple[str, Param]]) -> str:
    """'npo, simnpo: inverse temperature (default 0.1 for npo, 4.5 for simnpo); wga: ...'."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for name, param in users:
        groups.setdefault(param.description, []).append((name, param.default))
    parts = []
    for meaning, group in groups.items():
        names = ", ".join(n for n, _ in group)
        values = {_fmt(d) for _, d in group}
        default = values.pop() if len(values) == 1 else ", ".join(f"{_fmt(d)} for {n}" for n, d in group)
        parts.append(f"{names}: {meaning} (default {default})")
    return "; ".join(parts)


def pydantic_field(key: str, users: list[tuple[str, Param]]) -> tuple[Any, Any]:
    """The op's field for a key: optional (None until the method's default is filled in)."""
    param = users[0][1]
    # Optional[...], not `| None`: for a plain class that would build a types.UnionType instead
    return (Optional[param.annotation],  # noqa: UP045
            Field(None, gt=param.gt, ge=param.ge, alias=key if field_name(key) != key else None,
                  description=describe(users)))


def bullet(method: UnlearnMethod) -> str:
    """The method's doc as one item of the op's list, with its defaults."""
    text = " ".join(line.strip() for line in (method.doc or "").strip().splitlines())
    if method.params:
        text += " Defaults: " + ", ".join(f"``{k}`` {_fmt(v)}" for k, v in method.defaults.items()) + "."
    import textwrap

    return textwrap.fill(text, width=88, initial_indent="- ", subsequent_indent="  ",
                         break_on_hyphens=False, break_long_words=False)


class _Into:
    """What ``training.save_model`` uses of an op's context, writing into ``out`` instead of
    the step's output directory (a component of a composite being written)."""

    def __init__(self, ctx: Any, out: Any) -> None:
        self._ctx, self.out = ctx, out
        out.mkdir(parents=True)

    def tensor_writer(self, plan: list, prefix: str = "model", metadata: dict | None = None) -> Any:
        from weightflow.dsl.format.checkpoint import ShardedWriter

        return ShardedWriter(self.out, plan, prefix=prefix, max_shard_bytes=self._ctx.shard_bytes, metadata=metadata)

    def __getattr__(self, name: str) -> Any:  # progress, warn, log: the step's own
        return getattr(self._ctx, name)


def save_component(job: Job, name: str, model: Any, side_from: Any) -> str:
    """Store ``model`` as component ``name`` of the composite ``write`` is putting in
    ``job.ctx.out``: saved as unlearn saves a model (``training.save_model``: safetensors in
    the step's dtype, with the tokenizer files of the model directory ``side_from``), then
    placed in its subdirectory."""
    import tempfile
    from pathlib import Path

    from weightflow.ops.lib import composite
    from weightflow.ops.lib import training as T

    ctx = job.ctx
    with tempfile.TemporaryDirectory(dir=ctx.out.parent) as tmp:
        into = _Into(ctx, Path(tmp) / name)
        T.save_model(model.to("cpu"), Path(side_from), into, job.params.dtype or ctx.dtype)
        return composite.add_component(ctx.out, name, into.out)
