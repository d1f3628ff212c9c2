"""The machinery every merge method shares, so a method file declares only its maths.

- ``stream_merge``: writes every tensor of a template checkpoint in row chunks,
  floats computed by the method, everything else copied; peak memory is a few chunks.
- ``open_models``: the checkpoints of whole-model methods, checked to have one layout.
- ``merge_deltas``: generalised task arithmetic, ``base + λ·combine(select(δᵢ))``, the
  way mergekit's TIES, DARE and breadcrumbs are one procedure configured differently.
  A delta method is a pair (``select``, ``consensus``):

  - ``select(params, tensor)`` returns a function chunk → selected (rescaled) chunk for
    one delta and one tensor; the ``SELECTIONS`` below are the ones the methods use.
  - ``consensus(params)`` says whether the selected terms are combined by TIES sign
    election (elect sign(Σ wᵢ·δ̂ᵢ), sum the agreeing terms, divide by their weights when
    ``normalize``) or summed.

Params classes shared by the methods live here too; they import no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from weightflow.dsl.lang.spec import DeltaRef, Dtype, DtypeParam, FiniteFloat, ModelRef, SeedParam
from weightflow.ops.lib.params import PerTensor, check_range

# -- params shared by the methods ---------------------------------------------------------

class MergeCommon(DtypeParam):
    """What every merge method takes."""

    dtype: Dtype | None = Field(None, description="dtype of the merged weights (default: pipeline dtype)")

    @field_validator("weights", check_fields=False)
    @classmethod
    def _one_weight_per_input(cls, weights, info: ValidationInfo):
        inputs = info.data.get("models", info.data.get("deltas"))
        if weights is not None and inputs is not None and len(weights) != len(inputs):
            what = "models" if "models" in info.data else "deltas"
            raise ValueError(f"expected {len(inputs)} weights, one per entry of '{what}', got {len(weights)}")
        return weights


class DeltaMergeParams(MergeCommon):
    """A base model and deltas added to it (generalised task arithmetic)."""

    base: ModelRef = Field(description="step producing the model the deltas are added to")
    deltas: list[DeltaRef] = Field(min_length=1, description="steps producing deltas")
    weights: list[PerTensor] | None = Field(None, description="one per delta (default: 1 each); "
                                            "negative negates")
    lambda_: FiniteFloat = Field(1.0, alias="lambda", description="scale of the combined deltas")
    vocab: Literal["error", "truncate", "pad"] = Field(
        "error", description="deltas whose first dimension (vocab) exceeds the base's: 'truncate' cuts "
        "them; smaller ones: 'pad' fills with zero delta")


def check_density(v):
    return check_range(v, 0.0, 1.0, "density", lo_open=True)


def densities(value: PerTensor) -> list[float]:
    """Every number a PerTensor value can take (for cross-field checks)."""
    return [value] if isinstance(value, (int, float)) else [r.value for r in value]


class DareParams(DeltaMergeParams, SeedParam):
    """The DARE selection's parameters (dare-ties, dare-linear)."""

    density: PerTensor = Field(description="DARE keep probability 1 - p, in (0, 1]")
    seed: int | None = Field(None, ge=0, description="mask seed (default: the pipeline's)")
    rescale: Literal["dare", "l1", "none"] = Field("dare", description="kept values / density (dare), "
                                                   "to the original L1 norm (l1), or unscaled")
    _d = field_validator("density")(check_density)


# -- streaming -----------------------------------------------------------------------------

def stream_merge(ctx, template, template_dir, compute: Callable, dtype: str,
                 before: Callable | None = None) -> int:
    """Write every tensor of ``template`` in row chunks: floats via ``compute(name, lo, hi)``,
    others copied.  ``before(name)`` runs once per float tensor before its chunks."""
    import torch

    from weightflow.ops.lib.tensors import (
        FLOAT_ST,
        TORCH_DTYPES,
        TensorInfo,
        copy_side_files,
        row_ranges,
        st_dtype_of,
        tensor_buffer,
    )

    target = st_dtype_of(dtype)
    plan = [TensorInfo(n, target if i.dtype in FLOAT_ST else i.dtype, i.shape)
            for n, i in template.info.items()]
    writer = ctx.tensor_writer(plan)
    with ctx.progress(len(plan), "merge") as bar, torch.inference_mode():
        for info in plan:
            is_float = template.is_float(info.name)
            if is_float and before is not None:
                before(info.name)
            for lo, hi in row_ranges(info.shape):
                t = compute(info.name, lo, hi).to(TORCH_DTYPES[dtype]) if is_float else template.get(info.name, lo, hi)
                writer.append(info.name, tensor_buffer(t))
            bar.update(1)
    writer.close()
    copy_side_files(template_dir, ctx.out, dtype=dtype)
    return len(plan)


def open_models(arts) -> list:
    """Checkpoints of ``arts``, all checked to hold the same tensors with the same shapes."""
    from weightflow.ops.lib.tensors import Checkpoint, check_same_tensors

    ckpts = [Checkpoint(a.path, label=f"model '{a.step}'") for a in arts]
    for c in ckpts[1:]:
        check_same_tensors(ckpts[0], c)
    return ckpts


def tensor_pass(ckpts: list, name: str) -> Iterator[list]:
    """Row chunks of tensor ``name`` of every checkpoint, side by side, as float64."""
    import torch

    from weightflow.ops.lib.tensors import row_ranges

    for lo, hi in row_ranges(ckpts[0].info[name].shape):
        yield [c.get(name, lo, hi).to(torch.float64) for c in ckpts]


# -- deltas --------------------------------------------------------------------------------

class DeltaInput:
    """One delta of a merge: its checkpoint, cut or padded to the base's rows."""

    def __init__(self, art, base, vocab: str):
        from weightflow.dsl.lang.diagnostics import OpError
        from weightflow.ops.lib.tensors import Checkpoint

        self.art = art
        self.ckpt = Checkpoint(art.path, prefix="delta", label=f"delta '{art.step}'")
        self.rows: dict[str, int] = {}
        for n, info in self.ckpt.info.items():
            if n not in base:
                raise OpError(f"architectures differ: tensor '{n}' of delta '{art.step}' is not in the base")
            want = base.info[n].shape
            if info.shape == want:
                continue
            same_tail = len(info.shape) == len(want) and info.shape[1:] == want[1:]
            if same_tail and info.shape[0] > want[0] and vocab == "truncate":
                self.rows[n] = want[0]
            elif same_tail and info.shape[0] < want[0] and vocab == "pad":
                self.rows[n] = info.shape[0]
            else:
                hint = ""
                if same_tail:
                    hint = (f"; the first dimension (vocab) differs: set vocab: "
                            f"{'truncate' if info.shape[0] > want[0] else 'pad'} to merge anyway")
                raise OpError(f"architectures differ: tensor '{n}' has shape {list(info.shape)} in delta "
                              f"'{art.step}' but {list(want)} in the base{hint}")

    def chunk(self, name: str, lo: int, hi: int, shape):
        """Rows lo:hi of the delta as float32, cut or zero-padded to the base's rows."""
        import torch

        avail = self.rows.get(name)
        if avail is None:
            return self.ckpt.get(name, lo, hi).to(torch.float32)
        out = torch.zeros((hi - lo,) + tuple(shape[1:]), dtype=torch.float32)
        top = min(hi, avail)
        if top > lo:
            out[: top - lo] = self.ckpt.get(name, lo, top).to(torch.float32)
        return out


@dataclass
class TensorOfDelta:
    """What a selection sees: one delta's view of one tensor."""

    name: str
    numel: int
    index: int                      # the delta's position in ``deltas``
    delta: DeltaInput
    chunks: Callable[[], Iterator]  # re-iterable: the tensor's row chunks, float32
    seed: int
    prepared: Any = None            # what the selection's ``prepare`` computed for this delta


Selection = Callable[[Any, TensorOfDelta], Callable]


def keep_all(p, t: TensorOfDelta) -> Callable:
    """Task arithmetic: every element of the delta."""
    return lambda c: c


def magnitude_trim(p, t: TensorOfDelta) -> Callable:
    """TIES' trim: the top-``density`` elements by magnitude (per tensor, or model-wide
    with ``trim_scope: model``, fitted in ``prepare_magnitude_trim``)."""
    import torch

    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.sparsify import TopK, count_for

    sel = t.prepared or TopK.fit(t.chunks, count_for(resolve(p.density, t.name), t.numel))
    return lambda c: torch.where(sel.mask(c), c, torch.zeros((), dtype=c.dtype))


def prepare_magnitude_trim(p, base, deltas: list[DeltaInput], chunks_of) -> dict:
    """``trim_scope: model``: one top-k threshold over all of a delta's float tensors."""
    from weightflow.ops.lib.sparsify import TopK, count_for

    if getattr(p, "trim_scope", "tensor") != "model":
        return {}
    order = [n for n in base.names() if base.is_float(n)]
    fitted = {}
    for i, d in enumerate(deltas):
        names = [n for n in order if n in d.ckpt]

        def all_chunks(d=d, names=names):
            for n in names:
                yield from chunks_of(d, n)()
        numel = sum(math.prod(base.info[n].shape) for n in names)
        fitted[i] = TopK.fit(all_chunks, count_for(float(p.density), numel))
    return fitted


def breadcrumbs(p, t: TensorOfDelta) -> Callable:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction and keep the next ``density``."""
    import torch

    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.sparsify import TopK

    dens = resolve(p.density, t.name)
    n_top = int(p.gamma * t.numel)  # counted as mergekit's breadcrumbs does
    upper = TopK.fit(t.chunks, n_top + int(dens * t.numel))
    lower = TopK.fit(t.chunks, n_top)

    def crumbs(c):
        keep = upper.mask(c) & ~lower.mask(c)
        return torch.where(keep, c, torch.zeros((), dtype=c.dtype))
    return crumbs


def _l1_factor(chunks, masks) -> float:
    """The factor that gives the kept elements the L1 norm of the whole tensor."""
    import torch

    total = kept = 0.0
    for c, m in zip(chunks, masks, strict=True):
        total += float(c.abs().sum(dtype=torch.float64))
        kept += float((c.abs() * m).sum(dtype=torch.float64))
    return total / kept if kept > 0 else 0.0


def dare(p, t: TensorOfDelta) -> Callable:
    """DARE: keep each element with probability ``density`` (masks drawn per seed, delta
    digest and tensor, as ``dare-prune`` draws them), rescale by ``rescale``."""
    import torch

    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.sparsify import random_keep

    drop = 1.0 - resolve(p.density, t.name)
    keep = 1.0 - drop  # the same float as dare-prune's 1 - drop_rate

    def dare_masks():
        pos = 0
        for c in t.chunks():
            yield random_keep(t.seed, t.delta.art.digest, t.name, pos, pos + c.numel(), keep).reshape(c.shape)
            pos += c.numel()
    if p.rescale == "dare":
        factor = 1.0 / keep
    elif p.rescale == "none":
        factor = 1.0
    else:
        factor = _l1_factor(t.chunks(), dare_masks())
    masks = dare_masks()
    return lambda c: torch.where(next(masks), c * factor, torch.zeros((), dtype=c.dtype))


def della(p, t: TensorOfDelta) -> Callable:
    """DELLA's MAGPRUNE: keep probabilities density ± epsilon ranked by magnitude per row."""
    import torch

    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.sparsify import della_keep_prob, random_uniform

    dens = resolve(p.density, t.name)

    def della_parts():
        pos = 0
        for c in t.chunks():
            prob = della_keep_prob(c, dens, p.epsilon)
            u = random_uniform(t.seed, t.delta.art.digest, t.name, pos, pos + c.numel()).reshape(c.shape)
            pos += c.numel()
            yield u < prob, prob
    factor = None
    if p.rescale == "l1":
        factor = _l1_factor(t.chunks(), (m for m, _ in della_parts()))
    parts = della_parts()

    def select(c):
        m, prob = next(parts)
        scaled = c / prob if p.rescale == "dare" else (c * factor if factor is not None else c)
        return torch.where(m, scaled, torch.zeros((), dtype=c.dtype))
    return select


def sign_consensus(p) -> bool:
    """TIES' sign election always."""
    return True


def no_consensus(p) -> bool:
    """A plain weighted sum always."""
    return False


def optional_sign_consensus(p) -> bool:
    """TIES' sign election when the step sets ``sign_consensus: true``."""
    return bool(p.sign_consensus)


@dataclass(frozen=True)
class DeltaRecipe:
    """How a delta method selects and combines: see the module docstring."""

    select: Selection
    consensus: Callable[[Any], bool]
    prepare: Callable | None = None
    extra: dict = field(default_factory=dict)


def _warn_other_bases(deltas: list, base_art, ctx) -> None:
    for d in deltas:
        taken = d.art.meta.get("base")
        if taken and taken != base_art.digest:
            ctx.warn(f"delta '{d.art.step}' was taken against base {ctx.name_of(taken)} but is applied "
                     f"to base {ctx.name_of(base_art.digest)} (patching onto a different base)")


def merge_deltas(inputs, p, ctx, recipe: DeltaRecipe) -> dict:
    """``base + λ·combine(select(δᵢ))``, tensor by tensor in row chunks."""
    import torch

    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.tensors import Checkpoint, row_ranges

    base_art = inputs["base"]
    base = Checkpoint(base_art.path, label=f"base '{base_art.step}'")
    deltas = [DeltaInput(a, base, p.vocab) for a in inputs["deltas"]]
    _warn_other_bases(deltas, base_art, ctx)
    weights = list(p.weights) if p.weights is not None else [1.0] * len(deltas)
    consensus = recipe.consensus(p)
    normalize = getattr(p, "normalize", False) if consensus else False
    selectors: dict[int, Callable] = {}

    def chunks_of(d, name):
        shape = base.info[name].shape
        return lambda: (d.chunk(name, lo, hi, shape) for lo, hi in row_ranges(shape))

    prepared = recipe.prepare(p, base, deltas, chunks_of) if recipe.prepare else {}

    def before(name):
        selectors.clear()
        numel = max(1, math.prod(base.info[name].shape))
        for i, d in enumerate(deltas):
            if name in d.ckpt:
                view = TensorOfDelta(name, numel, i, d, chunks_of(d, name), ctx.seed, prepared.get(i))
                selectors[i] = recipe.select(p, view)

    def compute(name, lo, hi):
        b = base.get(name, lo, hi).to(torch.float32)
        terms, ws = [], []
        for i, d in enumerate(deltas):
            if i in selectors:
                w = resolve(weights[i], name)
                terms.append(selectors[i](d.chunk(name, lo, hi, base.info[name].shape)) * w)
                ws.append(w)
        if not terms:
            return b
        if not consensus:
            acc = terms[0]
            for t in terms[1:]:
                acc = acc.add_(t)
            return b + acc * p.lambda_
        return b + ties_combine(terms, ws, normalize) * p.lambda_

    n = stream_merge(ctx, base, base_art.path, compute, p.dtype or ctx.dtype, before=before)
    return {"tensors": n}  # content only: how it was made is in the manifest's recipe


def ties_combine(terms: list, ws: list[float], normalize: bool):
    """TIES, accumulated in place (no stacked copies): elect the sign of the total mass
    (zero elects +), then sum only the agreeing nonzero terms (divided by the agreeing
    weights when ``normalize``)."""
    import torch

    total = terms[0].clone()
    for t in terms[1:]:
        total.add_(t)
    positive = total >= 0
    del total
    zero = torch.zeros((), dtype=torch.float32)
    mixed = torch.zeros_like(terms[0])
    divisor = torch.zeros_like(terms[0]) if normalize else None
    for t, w in zip(terms, ws, strict=True):
        agree = torch.where(positive, t > 0, t < 0)
        mixed.add_(torch.where(agree, t, zero))
        if divisor is not None:
            divisor.add_(agree.to(torch.float32), alpha=w)
    if divisor is not None:
        divisor[divisor == 0] = 1.0
        mixed.div_(divisor)
    return mixed
