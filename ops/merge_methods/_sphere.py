"""Geometry shared by the spherical merges (``nuslerp``, ``multislerp``, ``karcher``).

Each of these methods writes, per tensor (or per row or column of it), a combination
Σ cᵢ·xᵢ of its inputs xᵢ (the models, or their task vectors Mᵢ − base).  The
coefficients depend only on the inner products Gᵢⱼ = xᵢ·xⱼ, so a method reads its
inputs twice in row chunks: once to accumulate G in float64 (``gram``), once to write
Σ cᵢ·xᵢ in float32 (``combine``).  Peak memory is a few row chunks, never a whole
tensor.  torch is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

NORM_FLOOR = 1e-7    # nuslerp divides by max(|x|, this), as mergekit's nuslerp normalises
COLINEAR = 1e-16     # nuslerp interpolates linearly where 1 − cos²θ is at most this (mergekit's eps²)


def inputs_of(ckpts: list, base: Any, name: str, lo, hi) -> list:
    """Rows lo:hi of tensor ``name`` of every checkpoint as float32, minus the base's
    rows when ``base`` is given (task vectors, subtracted in float32 as mergekit does)."""
    import torch

    xs = [c.get(name, lo, hi).to(torch.float32) for c in ckpts]
    if base is None:
        return xs
    b = base.get(name, lo, hi).to(torch.float32)
    return [x - b for x in xs]


def chunks_of(ckpts: list, base: Any, name: str) -> Iterator[list]:
    """``inputs_of`` for every row chunk of tensor ``name``, in order."""
    from weightflow.ops.lib.tensors import row_ranges

    for lo, hi in row_ranges(ckpts[0].info[name].shape):
        yield inputs_of(ckpts, base, name, lo, hi)


def gram(ckpts: list, base: Any, name: str):
    """Gᵢⱼ = xᵢ·xⱼ over the whole tensor ``name`` (a k×k float64 matrix)."""
    import torch

    k = len(ckpts)
    g = torch.zeros((k, k), dtype=torch.float64)
    for xs in chunks_of(ckpts, base, name):
        flat = torch.stack([x.reshape(-1) for x in xs]).to(torch.float64)
        g += flat @ flat.T
    return g


def combine(coefs, xs: list):
    """Σ cᵢ·xᵢ in float32; a coefficient is a number or a tensor broadcasting against xᵢ."""
    import torch

    acc = None
    for c, x in zip(coefs, xs, strict=True):
        term = x * (c.to(torch.float32) if isinstance(c, torch.Tensor) else float(c))
        acc = term if acc is None else acc.add_(term)
    return acc


def slerp_coefficients(dot, sq0, sq1, t: float):
    """(s0, s1) with slerp(x0, x1; t) = s0·x0 + s1·x1, for float64 tensors of dot products
    x0·x1 and squared norms |x0|², |x1|² (one entry per vector):

        cos θ = x0·x1 / (max(|x0|, 1e-7)·max(|x1|, 1e-7)),  clamped to [−1, 1]
        s0 = sin((1 − t)θ) / sin θ,  s1 = sin(tθ) / sin θ

    and (1 − t, t) where the vectors are colinear (1 − cos²θ ≤ 1e-16), as mergekit's nuslerp.
    Note the unnormalised x0, x1 are interpolated: lengths are interpolated too."""
    import torch

    floor = torch.tensor(NORM_FLOOR, dtype=torch.float64)
    cos = (dot / (sq0.sqrt().maximum(floor) * sq1.sqrt().maximum(floor))).clamp(-1.0, 1.0)
    colinear = (1 - cos * cos) <= COLINEAR
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    s0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    s1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return s0, s1


def barycentric_coefficients(g, weights: list[float], eps: float) -> list[float] | None:
    """Coefficients cᵢ of mergekit's multislerp, Σ cᵢ·xᵢ, from the Gram matrix ``g`` of the
    xᵢ and their (already normalised, if asked) weights wᵢ.  With uᵢ = xᵢ / (|xᵢ| + eps):

        m = Σ wᵢ·uᵢ,  m̂ = m / |m|                      (the weighted mean, projected)
        τ = Σ wᵢ·(uᵢ − (uᵢ·m̂)·m̂)                        (tangent vector at m̂)
        r = (m̂·cos|τ|' + τ·sin|τ|' / |τ|')·Σ wᵢ·|xᵢ|    |τ|' = |τ| + eps

    Every vector here lies in the span of the xᵢ, so the products come from ``g``.  (τ is
    zero up to rounding, as the same weights build m and τ, so r ≈ m̂·Σ wᵢ|xᵢ|.)  None
    where |m| < eps: the weighted unit vectors cancel."""
    k = len(weights)
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(k)]
    a = [w / (n + eps) for w, n in zip(weights, norms, strict=True)]          # m = Σ aᵢ·xᵢ
    ga = [sum(float(g[i, j]) * a[j] for j in range(k)) for i in range(k)]    # (G·a)ᵢ = xᵢ·m
    m_norm = math.sqrt(max(sum(a[i] * ga[i] for i in range(k)), 0.0))
    if m_norm < eps:
        return None
    dots = [ga[i] / (norms[i] + eps) / m_norm for i in range(k)]             # uᵢ·m̂
    along = sum(w * d for w, d in zip(weights, dots, strict=True))           # Σ wᵢ(uᵢ·m̂)
    tangent = [ai * (1 - along / m_norm) for ai in a]                        # τ = Σ tangentᵢ·xᵢ
    tangent_sq = sum(tangent[i] * sum(float(g[i, j]) * tangent[j] for j in range(k)) for i in range(k))
    tangent_norm = math.sqrt(max(tangent_sq, 0.0)) + eps
    radius = sum(w * n for w, n in zip(weights, norms, strict=True))
    on_mean = math.cos(tangent_norm) / m_norm
    on_tangent = math.sin(tangent_norm) / tangent_norm
    return [radius * (on_mean * ai + on_tangent * ti) for ai, ti in zip(a, tangent, strict=True)]


def karcher_coefficients(g, max_iter: int, tol: float) -> tuple[list[float], bool]:
    """Coefficients cᵢ (Σ cᵢ·xᵢ) of the equal-weight Karcher mean on the unit sphere,
    scaled by the mean norm, as mergekit's karcher, and whether it converged (|τ| < tol).

    With uᵢ = xᵢ/|xᵢ| for the inputs with |xᵢ| > tol (weights αᵢ = 1/k renormalised over
    them), start at μ = normalise(Σ αᵢ·uᵢ) (or u of the first of them where that sum
    vanishes) and repeat at most ``max_iter`` times, stopping once |τ| < tol:

        θᵢ = arccos(μ·uᵢ),  τ = Σ_{θᵢ ≥ tol} αᵢ·θᵢ/sin θᵢ·(uᵢ − (μ·uᵢ)·μ)
        μ ← normalise(cos|τ|·μ + sin|τ|·τ/|τ|)

    then scale by Σ |xᵢ|/k (every input).  μ and τ stay in the span of the uᵢ, so the
    iteration runs on k coefficients and the Gram matrix, exactly, in float64."""
    k = g.shape[0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(k)]
    scale = sum(norms) / k
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k, True
    alphas = [1.0 / len(valid)] * len(valid)
    # unit Gram matrix over the valid inputs
    gu = [[float(g[i, j]) / (norms[i] * norms[j]) for j in valid] for i in valid]
    n = len(valid)

    def times_gu(c):
        return [sum(gu[i][j] * c[j] for j in range(n)) for i in range(n)]

    def length(c):
        return math.sqrt(max(sum(ci * gi for ci, gi in zip(c, times_gu(c), strict=True)), 0.0))

    mean = list(alphas)
    mean_norm = length(mean)
    mean = [1.0] + [0.0] * (n - 1) if mean_norm < tol else [c / mean_norm for c in mean]
    converged = False
    for _ in range(max_iter):
        dots = [max(-1.0, min(1.0, d)) for d in times_gu(mean)]
        tangent = [0.0] * n
        for i in range(n):
            theta = math.acos(dots[i])
            if theta < tol:
                continue
            f = alphas[i] * theta / math.sin(theta)
            tangent = [tj - f * dots[i] * mj for tj, mj in zip(tangent, mean, strict=True)]
            tangent[i] += f
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            converged = True
            break
        mean = [math.cos(tangent_norm) * mj + math.sin(tangent_norm) * tj / tangent_norm
                for mj, tj in zip(mean, tangent, strict=True)]
        unit_norm = length(mean)
        if unit_norm > tol:
            mean = [mj / unit_norm for mj in mean]
    coefs = [0.0] * k
    for c, i in zip(mean, valid, strict=True):
        coefs[i] = scale * c / norms[i]
    return coefs, converged
