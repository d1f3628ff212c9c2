"""``dare-prune``: drop delta elements and rescale the survivors (DARE, DAREx).

- ``selection: random`` keeps each element independently with probability 1 − p
  (DARE, Yu et al. 2023); ``magnitude`` keeps the largest-|δ| (1 − p) fraction of
  each tensor (the importance-based pruning "DARE the Extreme" finds better when
  deltas are large).
- ``rescale``: ``dare`` divides kept values by 1 − p; ``l1`` scales them so each
  tensor keeps its L1 norm (mergekit's dare_* behaviour); ``none``; ``darex-q``
  divides by ``q`` instead (DAREx-q, arXiv 2410.09344).  ``q: auto`` picks q per
  layer with the paper's analytical rule: for each output row i with
  cᵢⱼ = δᵢⱼ·x̄ⱼ (x̄ the mean input activation of that Linear over ``calibration``
  data, fed through ``model``), q minimises
  |η(1 − (1−p)/q)·Σⱼcᵢⱼ + η²φ(p)·Σⱼcᵢⱼ²/(4q²) + log(2/(1−γ))| over q ∈ [1−p, 1),
  φ(p) = (1−2p)/log((1−p)/p); the layer's q is the mean over rows.  Tensors that
  do not feed a Linear (embeddings, norms, biases, heads) keep q = 1 − p.  The q
  used per tensor is recorded in the artifact's metadata.

Masks are deterministic per (seed, delta, tensor name): see ``_sparsify``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.lang.spec import (
    DeltaRef,
    FiniteFloat,
    Kind,
    ModelRef,
    OpSpec,
    SeedParam,
)
from weightflow.ops.lib.params import Calibration


class DareParams(SeedParam):
    delta: DeltaRef = Field(description="step producing the delta to prune")
    drop_rate: FiniteFloat = Field(description="fraction p of elements to drop, 0 <= p < 1")
    seed: int | None = Field(None, ge=0, description="mask seed (default: the pipeline's)")
    selection: Literal["random", "magnitude"] = "random"
    rescale: Literal["dare", "l1", "none", "darex-q"] = "dare"
    q: FiniteFloat | Literal["auto"] | None = Field(
        None, description="darex-q divisor in (0, 1], or 'auto' for the analytical per-layer rule")
    model: ModelRef | None = Field(None, description="the fine-tuned model, for q: auto calibration")
    calibration: Calibration | None = Field(None, description="calibration data, for q: auto")
    eta: FiniteFloat = Field(0.45, gt=0, description="q: auto balance parameter η")
    gamma: FiniteFloat = Field(0.95, gt=0, lt=1, description="q: auto probability γ")
    include: list[str] | None = Field(None, description="tensor globs to prune (default: all)")
    exclude: list[str] = Field(default_factory=list, description="tensor globs left unpruned")

    @field_validator("drop_rate")
    @classmethod
    def _rate(cls, p):
        if p >= 1.0:
            raise ValueError("drop_rate must be < 1: dropping every element leaves nothing to "
                             "rescale (DARE divides the kept values by 1 - p)")
        if p < 0:
            raise ValueError("drop_rate must be >= 0")
        return p

    @model_validator(mode="after")
    def _q_needs(self):
        if self.rescale == "darex-q":
            if self.q is None:
                raise ValueError("rescale: darex-q needs 'q' (a number in (0, 1], or 'auto')")
            if self.q != "auto" and not 0 < self.q <= 1:
                raise ValueError(f"q must be in (0, 1], got {self.q}")
            if self.q == "auto" and (self.model is None or self.calibration is None):
                raise ValueError("q: auto needs 'model' (the fine-tuned model) and 'calibration' data")
        elif self.q is not None:
            raise ValueError("'q' applies only with rescale: darex-q")
        return self


def phi(p: float) -> float:
    if p <= 0:
        return 0.0
    if abs(p - 0.5) < 1e-12:
        return 0.5  # the limit of (1 - 2p) / log((1 - p) / p) at p = 1/2
    return (1 - 2 * p) / math.log((1 - p) / p)


def analytical_q(c, p: float, eta: float, gamma: float, stop_fraction: float = 0.8) -> float:
    """DAREx-q's data-free rule for one layer; ``c`` is [rows, cols] of δ·x̄."""
    import torch

    c = c.to(torch.float64)
    s1 = c.sum(1)
    s2 = (c * c).sum(1)
    const = math.log(2 / (1 - gamma))
    best = torch.full_like(s1, float("inf"))
    q_best = torch.full_like(s1, 1 - p)
    stopped = torch.zeros_like(s1, dtype=torch.bool)
    f = phi(p)
    for q_milli in range(int((1 - p) * 1000), 999):
        q = q_milli / 1000
        res = (eta * (1 - (1 - p) / q) * s1 + eta ** 2 * f * s2 / (4 * q * q) + const).abs()
        better = res <= best
        stopped |= res >= best
        best = torch.where(better, res, best)
        q_best = torch.where(better, torch.full_like(q_best, q), q_best)
        if stopped.float().mean() >= stop_fraction:
            break
    return float(q_best.mean())


def _auto_q(inputs, params: DareParams, ctx, delta, names) -> dict[str, float]:
    import torch
    import transformers

    from weightflow.ops.lib.calibration import linear_input_means, windows
    from weightflow.ops.lib.models import quiet_transformers

    model_art = inputs["model"]
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(model_art.path, dtype=torch.float32,
                                                                  use_safetensors=True, trust_remote_code=False)
    model.eval()
    max_len = getattr(model.config, "max_position_embeddings", None)
    cal = params.calibration
    samples = windows(cal, ctx.data_path(cal.data), model_art.path, max_len)
    means = linear_input_means(model, samples)
    del model
    p = params.drop_rate
    out = {}
    for n in names:
        x = means.get(n)
        shape = delta.info[n].shape
        if x is None or len(shape) != 2 or shape[1] != x.numel():
            continue
        c = delta.get(n) * x.reshape(1, -1)
        bias = n[: -len("weight")] + "bias" if n.endswith("weight") else None
        if bias and bias in delta:
            c = torch.cat([c, delta.get(bias).reshape(-1, 1)], dim=1)
        out[n] = analytical_q(c, p, params.eta, params.gamma)
    return out


def run(inputs, params: DareParams, ctx) -> dict:  # noqa: C901
    import torch

    from weightflow.ops.lib.sparsify import TopK, count_for, random_keep
    from weightflow.ops.lib.tensors import Checkpoint, row_ranges, select

    art = inputs["delta"]
    delta = Checkpoint(art.path, prefix="delta", label=f"delta '{art.step}'")
    p = params.drop_rate
    keep = 1.0 - p
    chosen = set(select(delta.names(), params.include, params.exclude))
    auto_q = _auto_q(inputs, params, ctx, delta, chosen) if params.q == "auto" else {}
    writer = ctx.delta_writer([delta.info[n] for n in delta.names()])
    stats: dict[str, dict] = {}
    with ctx.progress(len(delta.names()), "dare") as bar, torch.inference_mode():
        for name in delta.names():
            info = delta.info[name]
            ranges = list(row_ranges(info.shape))
            if name not in chosen:
                for lo, hi in ranges:
                    writer.append(name, delta.get(name, lo, hi))
                bar.update(1)
                continue
            numel = max(1, math.prod(info.shape))

            def chunks(name=name, ranges=ranges):
                return (delta.get(name, lo, hi).to(torch.float32) for lo, hi in ranges)

            if params.selection == "magnitude":
                fitted = TopK.fit(chunks, count_for(keep, numel, rounding="round"))

                def masks(fitted=fitted):
                    sel = TopK(fitted.threshold, fitted.above, fitted.k)
                    return (sel.mask(c) for c in chunks())
            else:
                def masks(name=name):
                    pos = 0
                    for c in chunks():
                        m = random_keep(ctx.seed, art.digest, name, pos, pos + c.numel(), keep)
                        pos += c.numel()
                        yield m.reshape(c.shape)

            if params.rescale == "dare":
                factor = 1.0 / keep
            elif params.rescale == "none":
                factor = 1.0
            elif params.rescale == "darex-q":
                factor = 1.0 / (auto_q.get(name, keep) if params.q == "auto" else params.q)
            else:  # l1: one extra pass for the norms
                total = kept = 0.0
                for c, m in zip(chunks(), masks(), strict=True):
                    total += float(c.abs().sum(dtype=torch.float64))
                    kept += float((c.abs() * m).sum(dtype=torch.float64))
                factor = total / kept if kept > 0 else 0.0
            n_kept = 0
            for c, m in zip(chunks(), masks(), strict=True):
                n_kept += int(m.sum())
                writer.append(name, torch.where(m, c * factor, torch.zeros((), dtype=c.dtype)))
            stats[name] = {"kept": n_kept, "numel": numel, "scale": factor}
            if params.rescale == "darex-q":
                stats[name]["q"] = 1.0 / factor
            bar.update(1)
    writer.close()
    kept = sum(s["kept"] for s in stats.values())
    total = sum(s["numel"] for s in stats.values())
    ctx.info["keep_fraction"] = kept / total if total else 1.0
    return {
        "base": art.meta.get("base"),
        "model": art.meta.get("model"),
        "pruned_from": art.digest,
        "drop_rate": p,
        "selection": params.selection,
        "rescale": params.rescale,
        "tensors": stats,
    }


OP = OpSpec[DareParams](name="dare-prune", version=1, output=Kind.DELTA, params=DareParams, run=run, doc=__doc__)
