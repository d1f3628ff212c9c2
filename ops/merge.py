"""``merge``: combine models or deltas into one Model, streaming tensor by tensor.

Whole-model methods:

- ``linear``: Σ wᵢ·Mᵢ over ``models`` (``normalize: true``, the default, divides by
  Σ wᵢ: a weighted average, as mergekit's linear).
- ``slerp``: spherical interpolation of two ``models`` at ``t`` per tensor (linear
  interpolation where the two tensors are nearly parallel), as mergekit's slerp.

Delta methods are one generalised task arithmetic, ``base + λ·combine(select(δᵢ))``:

| method | select each δᵢ | combine |
|---|---|---|
| ``task-arithmetic`` | keep all | Σ wᵢ·δᵢ |
| ``ties`` | top-``density`` by magnitude (per tensor, or ``trim_scope: model``) | TIES |
| ``dare-ties`` | DARE: keep with probability ``density``, rescale | TIES |
| ``dare-linear`` | DARE | Σ wᵢ·δᵢ |
| ``breadcrumbs`` | drop the largest ``gamma`` and the smallest, keep ``density`` | Σ (or TIES with ``sign_consensus``) |
| ``della`` | keep with probability density ± epsilon ranked by magnitude per row | TIES (or Σ) |

TIES: elect each element's sign as sign(Σ wᵢ·δ̂ᵢ) (a zero sum elects +); mᵢ marks
the nonzero wᵢ·δ̂ᵢ of the elected sign; the result is the disjoint weighted mean
Σ wᵢ·δ̂ᵢ·mᵢ / Σ wᵢ·mᵢ (0 where no input agrees), or the disjoint sum with
``normalize: false``.  A negative weight negates a delta (unlearning by negation);
a delta taken against another base of the same architecture may be applied
(patching) and warns, naming both bases.

``weights``, ``density`` and ``t`` take a number or per-tensor rules
(``[{pattern: GLOB, value: X}, ..., {pattern: "*", value: X}]``).  Every tensor is
computed in float32 from row chunks of the inputs and written as soon as it is
ready, so peak memory is a few chunks, not whole models.  DARE masks are drawn per
(seed, delta digest, tensor name): the inline ``dare-*`` methods give the same
tensors as explicit ``dare-prune`` steps followed by ``ties``/``task-arithmetic``
with ``density: 1``.
"""

from __future__ import annotations

import math
from typing import Annotated, Callable, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from weightflow.dsl.oplib import DeltaRef, Dtype, FiniteFloat, Kind, ModelRef, OpParams, OpSpec
from weightflow.ops._params import PerTensor, check_range


class _MergeCommon(OpParams):
    dtype: Dtype | None = Field(None, description="dtype of the merged weights (default: pipeline dtype)")

    @field_validator("weights", check_fields=False)
    @classmethod
    def _one_weight_per_input(cls, weights, info: ValidationInfo):
        inputs = info.data.get("models", info.data.get("deltas"))
        if weights is not None and inputs is not None and len(weights) != len(inputs):
            what = "models" if "models" in info.data else "deltas"
            raise ValueError(f"expected {len(inputs)} weights, one per entry of '{what}', got {len(weights)}")
        return weights


class LinearParams(_MergeCommon):
    """Weighted sum (or average) of whole models."""

    method: Literal["linear"]
    models: list[ModelRef] = Field(min_length=1, description="steps producing the models to merge")
    weights: list[PerTensor] | None = Field(None, description="one per model (default: 1 each)")
    normalize: bool = Field(True, description="divide by the sum of the weights")


class SlerpParams(_MergeCommon):
    """Spherical interpolation from models[0] (t = 0) to models[1] (t = 1)."""

    method: Literal["slerp"]
    models: list[ModelRef] = Field(min_length=2, max_length=2, description="the two models")
    t: PerTensor = Field(description="interpolation factor in [0, 1], or per-tensor rules")

    @field_validator("t")
    @classmethod
    def _t_range(cls, t):
        return check_range(t, 0.0, 1.0, "t")


class _DeltaMerge(_MergeCommon):
    base: ModelRef = Field(description="step producing the model the deltas are added to")
    deltas: list[DeltaRef] = Field(min_length=1, description="steps producing deltas")
    weights: list[PerTensor] | None = Field(None, description="one per delta (default: 1 each); "
                                            "negative negates")
    lambda_: FiniteFloat = Field(1.0, alias="lambda", description="scale of the combined deltas")
    vocab: Literal["error", "truncate", "pad"] = Field(
        "error", description="deltas whose first dimension (vocab) exceeds the base's: 'truncate' cuts "
        "them; smaller ones: 'pad' fills with zero delta")


class TaskArithmeticParams(_DeltaMerge):
    """base + lambda * sum of weighted deltas (task vectors)."""

    method: Literal["task-arithmetic"]


def _density(v):
    return check_range(v, 0.0, 1.0, "density", lo_open=True)


class TiesParams(_DeltaMerge):
    """TIES-merging: trim each delta by magnitude, elect signs, disjoint mean."""

    method: Literal["ties"]
    density: PerTensor = Field(description="fraction of each delta kept by magnitude, in (0, 1]")
    normalize: bool = Field(True, description="disjoint weighted mean (true) or disjoint sum (false)")
    trim_scope: Literal["tensor", "model"] = Field("tensor", description="rank magnitudes per tensor "
                                                   "or over the whole delta")
    _d = field_validator("density")(_density)

    @model_validator(mode="after")
    def _scope(self):
        if self.trim_scope == "model" and not isinstance(self.density, (int, float)):
            raise ValueError("trim_scope: model needs one number for 'density', not per-tensor rules")
        return self


class _DareMerge(_DeltaMerge):
    density: PerTensor = Field(description="DARE keep probability 1 - p, in (0, 1]")
    seed: int | None = Field(None, ge=0, description="mask seed (default: the pipeline's)")
    rescale: Literal["dare", "l1", "none"] = Field("dare", description="kept values / density (dare), "
                                                   "to the original L1 norm (l1), or unscaled")
    _d = field_validator("density")(_density)


class DareTiesParams(_DareMerge):
    """DARE on each delta, then TIES sign consensus."""

    method: Literal["dare-ties"]
    normalize: bool = Field(True, description="disjoint weighted mean (true) or disjoint sum (false)")


class DareLinearParams(_DareMerge):
    """DARE on each delta, then a plain weighted sum."""

    method: Literal["dare-linear"]


class BreadcrumbsParams(_DeltaMerge):
    """Model Breadcrumbs: drop the largest `gamma` and the smallest, keeping `density`."""

    method: Literal["breadcrumbs"]
    density: PerTensor = Field(description="fraction kept, in (0, 1]")
    gamma: FiniteFloat = Field(0.01, ge=0, lt=1, description="fraction of largest magnitudes dropped")
    sign_consensus: bool = Field(False, description="combine with TIES sign election")
    normalize: bool = Field(True, description="with sign_consensus: disjoint mean or sum")
    _d = field_validator("density")(_density)

    @model_validator(mode="after")
    def _fits(self):
        dens = [self.density] if isinstance(self.density, (int, float)) else [r.value for r in self.density]
        if any(d + self.gamma > 1 for d in dens):
            raise ValueError("density + gamma must be <= 1")
        return self


class DellaParams(_DeltaMerge):
    """DELLA: magnitude-ranked drop probabilities (MAGPRUNE), rescale, sign consensus."""

    method: Literal["della"]
    density: PerTensor = Field(description="mean keep probability, in (0, 1]")
    epsilon: FiniteFloat = Field(0.15, ge=0, description="spread of keep probabilities: density ± epsilon")
    seed: int | None = Field(None, ge=0, description="mask seed (default: the pipeline's)")
    rescale: Literal["dare", "l1", "none"] = Field("dare", description="kept values / their own keep "
                                                   "probability (dare, as the DELLA paper), to the original "
                                                   "L1 norm (l1, mergekit), or unscaled")
    sign_consensus: bool = Field(True, description="TIES sign election (false: della-linear)")
    normalize: bool = Field(True, description="with sign_consensus: disjoint mean or sum")
    _d = field_validator("density")(_density)

    @model_validator(mode="after")
    def _bounds(self):
        dens = [self.density] if isinstance(self.density, (int, float)) else [r.value for r in self.density]
        if any(d - self.epsilon <= 0 or d + self.epsilon > 1 for d in dens):
            raise ValueError("della needs 0 < density - epsilon and density + epsilon <= 1")
        return self


MergeParams = Annotated[
    Union[LinearParams, SlerpParams, TaskArithmeticParams, TiesParams, DareTiesParams, DareLinearParams,
          BreadcrumbsParams, DellaParams],
    Field(discriminator="method"),
]


# -- writing ------------------------------------------------------------------------

def _stream(ctx, template, template_dir, compute: Callable, dtype: str, before: Callable | None = None) -> int:
    """Write every tensor of ``template`` in row chunks: floats via ``compute(name, lo, hi)``,
    others copied.  ``before(name)`` runs once per float tensor before its chunks."""
    import torch

    from weightflow.ops._tensors import (
        FLOAT_ST, TORCH_DTYPES, TensorInfo, copy_side_files, row_ranges, st_dtype_of, tensor_buffer)

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
                if is_float:
                    t = compute(info.name, lo, hi).to(TORCH_DTYPES[dtype])
                else:
                    t = template.get(info.name, lo, hi)
                writer.append(info.name, tensor_buffer(t))
            bar.update(1)
    writer.close()
    copy_side_files(template_dir, ctx.out, dtype=dtype)
    return len(plan)


# -- whole-model methods --------------------------------------------------------------

def _open_models(arts):
    from weightflow.ops._tensors import Checkpoint, check_same_tensors

    ckpts = [Checkpoint(a.path, label=f"model '{a.step}'") for a in arts]
    for c in ckpts[1:]:
        check_same_tensors(ckpts[0], c)
    return ckpts


def _linear(inputs, p: LinearParams, ctx) -> dict:
    import torch

    from weightflow.dsl.diagnostics import OpError
    from weightflow.ops._params import resolve

    arts = inputs["models"]
    ckpts = _open_models(arts)
    weights = list(p.weights) if p.weights is not None else [1.0] * len(ckpts)

    def compute(name, lo, hi):
        ws = [resolve(w, name) for w in weights]
        total = sum(ws)
        if p.normalize and abs(total) < 1e-12:
            raise OpError(f"normalize: true needs weights whose sum is not zero (tensor '{name}')")
        acc = None
        for w, c in zip(ws, ckpts):
            term = c.get(name, lo, hi).to(torch.float32) * w
            acc = term if acc is None else acc.add_(term)
        return acc / total if p.normalize else acc

    n = _stream(ctx, ckpts[0], arts[0].path, compute, p.dtype or ctx.dtype)
    return {"tensors": n}


SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


def _slerp(inputs, p: SlerpParams, ctx) -> dict:
    import torch

    from weightflow.ops._params import resolve
    from weightflow.ops._tensors import row_ranges

    arts = inputs["models"]
    a, b = _open_models(arts)
    coef: dict[str, tuple[float, float]] = {}
    parallel: list[str] = []

    def before(name):
        """Pass 1: norms and the dot product of the two whole tensors -> (s0, s1)."""
        dot = na = nb = 0.0
        for lo, hi in row_ranges(a.info[name].shape):
            x = a.get(name, lo, hi).to(torch.float64)
            y = b.get(name, lo, hi).to(torch.float64)
            dot += float((x * y).sum())
            na += float((x * x).sum())
            nb += float((y * y).sum())
        t = resolve(p.t, name)
        na, nb = math.sqrt(na), math.sqrt(nb)
        cos = dot / ((na if na > SLERP_EPS else 1.0) * (nb if nb > SLERP_EPS else 1.0))
        if abs(cos) > SLERP_DOT_THRESHOLD:
            parallel.append(name)
            coef[name] = (1 - t, t)
        else:
            theta = math.acos(max(-1.0, min(1.0, cos)))
            s = math.sin(theta)
            coef[name] = (math.sin(theta - theta * t) / s, math.sin(theta * t) / s)

    def compute(name, lo, hi):
        s0, s1 = coef[name]
        return a.get(name, lo, hi).to(torch.float32) * s0 + b.get(name, lo, hi).to(torch.float32) * s1

    n = _stream(ctx, a, arts[0].path, compute, p.dtype or ctx.dtype, before=before)
    ctx.info["lerp_fallback_tensors"] = len(parallel)
    return {"tensors": n}


# -- delta methods ------------------------------------------------------------------------

class _DeltaInput:
    """One delta of a merge: its checkpoint, and per-tensor selection state."""

    def __init__(self, art, base, vocab: str):
        from weightflow.dsl.diagnostics import OpError
        from weightflow.ops._tensors import Checkpoint

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

    def chunk(self, name: str, lo: int, hi: int, shape) -> "torch.Tensor":  # noqa: F821
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


def _delta_merge(inputs, p, ctx) -> dict:
    import torch

    from weightflow.ops._params import resolve
    from weightflow.ops._sparsify import TopK, count_for, della_keep_prob, random_keep, random_uniform
    from weightflow.ops._tensors import Checkpoint, row_ranges

    base_art = inputs["base"]
    base = Checkpoint(base_art.path, label=f"base '{base_art.step}'")
    deltas = [_DeltaInput(a, base, p.vocab) for a in inputs["deltas"]]
    for d in deltas:
        taken = d.art.meta.get("base")
        if taken and taken != base_art.digest:
            ctx.warn(f"delta '{d.art.step}' was taken against base {ctx.name_of(taken)} but is applied "
                     f"to base {ctx.name_of(base_art.digest)} (patching onto a different base)")
    weights = list(p.weights) if p.weights is not None else [1.0] * len(deltas)
    method = p.method
    consensus = method in ("ties", "dare-ties") or (method in ("breadcrumbs", "della") and p.sign_consensus)
    normalize = getattr(p, "normalize", False) if consensus else False
    seed = ctx.seed
    # per tensor: for each delta having it, a function chunk -> selected (and rescaled) chunk
    selectors: dict[int, Callable] = {}

    def ranges_of(name):
        return list(row_ranges(base.info[name].shape))

    def chunks_of(d, name):
        shape = base.info[name].shape
        return lambda: (d.chunk(name, lo, hi, shape) for lo, hi in ranges_of(name))

    model_topk: dict[int, TopK] = {}
    if method == "ties" and p.trim_scope == "model":
        order = [n for n in base.names() if base.is_float(n)]
        for i, d in enumerate(deltas):
            names = [n for n in order if n in d.ckpt]

            def all_chunks(d=d, names=names):
                for n in names:
                    yield from chunks_of(d, n)()
            numel = sum(math.prod(base.info[n].shape) for n in names)
            model_topk[i] = TopK.fit(all_chunks, count_for(float(p.density), numel))

    def before(name):
        selectors.clear()
        numel = max(1, math.prod(base.info[name].shape))
        for i, d in enumerate(deltas):
            if name not in d.ckpt:
                continue
            src = chunks_of(d, name)
            if method == "ties":
                sel = model_topk.get(i) or TopK.fit(src, count_for(resolve(p.density, name), numel))
                selectors[i] = lambda c, sel=sel: torch.where(sel.mask(c), c, torch.zeros((), dtype=c.dtype))
            elif method == "breadcrumbs":
                dens = resolve(p.density, name)
                n_top = int(p.gamma * numel)  # counted as mergekit's breadcrumbs does
                upper = TopK.fit(src, n_top + int(dens * numel))
                lower = TopK.fit(src, n_top)

                def crumbs(c, upper=upper, lower=lower):
                    keep = upper.mask(c) & ~lower.mask(c)
                    return torch.where(keep, c, torch.zeros((), dtype=c.dtype))
                selectors[i] = crumbs
            elif method in ("dare-ties", "dare-linear"):
                drop = 1.0 - resolve(p.density, name)
                keep = 1.0 - drop  # the same float as dare-prune's 1 - drop_rate

                def dare_masks(d=d, keep=keep, src=src):
                    pos = 0
                    for c in src():
                        yield random_keep(seed, d.art.digest, name, pos, pos + c.numel(), keep).reshape(c.shape)
                        pos += c.numel()
                if p.rescale == "dare":
                    factor = 1.0 / keep
                elif p.rescale == "none":
                    factor = 1.0
                else:
                    total = kept = 0.0
                    for c, m in zip(src(), dare_masks()):
                        total += float(c.abs().sum(dtype=torch.float64))
                        kept += float((c.abs() * m).sum(dtype=torch.float64))
                    factor = total / kept if kept > 0 else 0.0
                masks = dare_masks()
                selectors[i] = lambda c, masks=masks, factor=factor: torch.where(
                    next(masks), c * factor, torch.zeros((), dtype=c.dtype))
            elif method == "della":
                dens = resolve(p.density, name)

                def della_parts(d=d, dens=dens, src=src):
                    pos = 0
                    for c in src():
                        prob = della_keep_prob(c, dens, p.epsilon)
                        u = random_uniform(seed, d.art.digest, name, pos, pos + c.numel()).reshape(c.shape)
                        pos += c.numel()
                        yield u < prob, prob
                factor = None
                if p.rescale == "l1":
                    total = kept = 0.0
                    for c, (m, _) in zip(src(), della_parts()):
                        total += float(c.abs().sum(dtype=torch.float64))
                        kept += float((c.abs() * m).sum(dtype=torch.float64))
                    factor = total / kept if kept > 0 else 0.0
                parts = della_parts()

                def della(c, parts=parts, factor=factor):
                    m, prob = next(parts)
                    scaled = c / prob if p.rescale == "dare" else (c * factor if factor is not None else c)
                    return torch.where(m, scaled, torch.zeros((), dtype=c.dtype))
                selectors[i] = della
            else:
                selectors[i] = lambda c: c

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
        # TIES, accumulated in place (no stacked copies): elect the sign of the total
        # mass (zero elects +), then sum only the agreeing nonzero terms.
        total = terms[0].clone()
        for t in terms[1:]:
            total.add_(t)
        positive = total >= 0
        del total
        zero = torch.zeros((), dtype=torch.float32)
        mixed = torch.zeros_like(b)
        divisor = torch.zeros_like(b) if normalize else None
        for t, w in zip(terms, ws):
            agree = torch.where(positive, t > 0, t < 0)
            mixed.add_(torch.where(agree, t, zero))
            if divisor is not None:
                divisor.add_(agree.to(torch.float32), alpha=w)
        if divisor is not None:
            divisor[divisor == 0] = 1.0
            mixed.div_(divisor)
        return b + mixed * p.lambda_

    n = _stream(ctx, base, base_art.path, compute, p.dtype or ctx.dtype, before=before)
    return {"tensors": n}  # content only: how it was made is in the manifest's recipe


METHODS = {"linear": _linear, "slerp": _slerp}


def run(inputs, params, ctx) -> dict:
    return METHODS.get(params.method, _delta_merge)(inputs, params, ctx)


OP = OpSpec(name="merge", version=2, output=Kind.MODEL, params=MergeParams, run=run, doc=__doc__,
            discriminator="method")
