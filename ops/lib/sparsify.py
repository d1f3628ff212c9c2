"""Element selection for deltas, computed chunk by chunk with bounded memory.

- ``random_keep``: DARE's Bernoulli(1 − p) mask.  The random stream of a tensor is
  cut into fixed blocks, each with its own generator seeded by blake3(seed, key,
  tensor name, block index).  A mask therefore never depends on the order tensors
  are visited, on which other tensors are excluded, on how rows are chunked, or on
  parallelism.  ``key`` identifies the delta (its content digest), so two deltas
  pruned with one seed get independent masks, and an inline ``dare-ties`` merge
  draws exactly the masks that explicit ``dare-prune`` steps would.  DELLA draws
  from the same streams, with per-element keep probabilities ranked by magnitude.
- ``TopK``: exact top-k by magnitude over a stream of chunks (one tensor, or a
  whole model for ``trim_scope: model``) by a two-pass radix select on the float32
  bit patterns of |x| (16 bits a pass: a bincount each, no sort); ties at the
  threshold are kept in index order, so exactly ``k`` elements survive.  The passes
  may run over chunks in parallel (``map_chunks``), and the mask of any chunk can be
  taken by its ordinal (``mask_at``), so a merge can compute chunks on several threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import blake3
import numpy as np
import torch

RNG_BLOCK = 1 << 20


def block_seed(seed: int, key: str, name: str, block: int) -> int:
    h = blake3.blake3(f"{seed}\x00{key}\x00{name}\x00{block}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def random_uniform(seed: int, key: str, name: str, start: int, stop: int) -> torch.Tensor:
    """U(0, 1) draws for the flat element range [start, stop) of a tensor."""
    out = torch.empty(stop - start, dtype=torch.float32)
    pos = start
    while pos < stop:
        block = pos // RNG_BLOCK
        g = torch.Generator().manual_seed(block_seed(seed, key, name, block))
        u = torch.rand(RNG_BLOCK, generator=g)
        lo = pos - block * RNG_BLOCK
        hi = min(RNG_BLOCK, stop - block * RNG_BLOCK)
        out[pos - start:pos - start + hi - lo] = u[lo:hi]
        pos += hi - lo
    return out


def random_keep(seed: int, key: str, name: str, start: int, stop: int, keep_prob: float) -> torch.Tensor:
    """Bernoulli(keep_prob) mask for the flat element range [start, stop) of a tensor."""
    return random_uniform(seed, key, name, start, stop) < keep_prob


def della_keep_prob(chunk: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE keep probabilities: ranked by magnitude within each row, from
    density − ε (smallest) to density + ε (largest); a 1-D tensor is one row."""
    rows = chunk.reshape(1, -1) if chunk.dim() < 2 else chunk.reshape(chunk.shape[0], -1)
    n = rows.shape[1]
    rank = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1, stable=True).to(torch.float32)
    rank_norm = rank / (n - 1) if n > 1 else torch.zeros_like(rank)
    return ((density - epsilon) + 2 * epsilon * rank_norm).reshape(chunk.shape)


BINS = 1 << 16  # radix of each of the two passes over the 32-bit patterns


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Monotone int32 keys of |x|: the float32 bit patterns of non-negative floats order as
    the floats do (a NaN, whose sign ``abs`` clears, sorts above +inf)."""
    a = x.detach().abs()
    if a.dtype != torch.float32:
        a = a.to(torch.float32)
    return a.reshape(-1).view(torch.int32)


def _high_histogram(chunk: torch.Tensor) -> torch.Tensor:
    """Counts of the top 16 bits of the keys (pass 1)."""
    return torch.bincount(_bits(chunk) >> 16, minlength=BINS)


def _low_histogram(chunk: torch.Tensor, high: int) -> torch.Tensor:
    """Counts of the low 16 bits of the keys whose top 16 bits are ``high`` (pass 2).  Keys
    below or above that bin are clamped into two extra end bins instead of being selected
    out (no boolean indexing: three elementwise passes and a bincount)."""
    d = _bits(chunk) - ((high << 16) - 1)
    return torch.bincount(d.clamp_(0, BINS + 1), minlength=BINS + 2)[1:BINS + 1]


def _serial_map(chunks: Callable[[], Iterable[torch.Tensor]]) -> Callable:
    return lambda fn: (fn(c) for c in chunks())


@dataclass
class TopK:
    """Keeps exactly ``k`` elements of largest magnitude across a stream of chunks.

    ``mask(chunk)`` takes the chunks in stream order, one after another; ``mask_at`` and
    ``take_at`` take any chunk by its ordinal in the stream, in any order and from any thread
    (what the parallel merge uses).  Which elements tie at the threshold is decided by index
    order either way: ``tie_before[j]``, the number of threshold ties in chunks before ``j``,
    is counted by ``fit`` only when not every tie can be kept (otherwise each is).
    """

    threshold: int  # bit pattern of the k-th largest |x|
    above: int      # elements strictly above the threshold
    k: int
    _ties_kept: int = 0
    ties: int = -1  # elements equal to the threshold (-1: not counted)
    tie_before: list[int] | None = None

    @classmethod
    def fit(cls, chunks: Callable[[], Iterable[torch.Tensor]], k: int,
            map_chunks: Callable[[Callable], Iterable] | None = None) -> TopK:
        """Find the threshold in two passes over ``chunks()`` (a re-iterable source), and a
        third (one count per chunk) when ties at the threshold exceed the room left.

        ``map_chunks(fn)``, when given, yields ``fn(chunk)`` for every chunk of the stream in
        order, and may compute them in parallel (histograms are integer counts: their sum is
        the same in any order)."""
        if k <= 0:
            return cls(threshold=1 << 62, above=0, k=0, ties=0)
        each = map_chunks or _serial_map(chunks)
        # the bookkeeping on the 65536 bins is numpy's, single-threaded: torch would start its
        # thread team for each of these small ops, which stalls while workers hold the cores
        high = np.zeros(BINS, dtype=np.int64)
        for h in each(_high_histogram):
            high += h.numpy()
        total = int(high.sum())
        if k >= total:
            return cls(threshold=-1, above=total, k=total, ties=0)
        # walk bins from the top until k elements are covered
        from_top = np.cumsum(high[::-1])[::-1]  # count with bin >= i
        hb = int(np.flatnonzero(from_top >= k).max())
        above_bin = int(from_top[hb + 1]) if hb + 1 < BINS else 0
        low = np.zeros(BINS, dtype=np.int64)
        for h in each(lambda c: _low_histogram(c, hb)):
            low += h.numpy()
        need = k - above_bin
        from_top_low = np.cumsum(low[::-1])[::-1]
        lb = int(np.flatnonzero(from_top_low >= need).max())
        above_low = int(from_top_low[lb + 1]) if lb + 1 < BINS else 0
        threshold = (hb << 16) | lb
        fitted = cls(threshold=threshold, above=above_bin + above_low, k=k, ties=int(low[lb]))
        if fitted.ties > fitted.room:  # only the first `room` ties in index order survive
            counts = list(each(lambda c: int((_bits(c) == threshold).sum())))
            fitted.tie_before = [0] * len(counts)
            for j in range(1, len(counts)):
                fitted.tie_before[j] = fitted.tie_before[j - 1] + counts[j - 1]
        return fitted

    @property
    def room(self) -> int:
        """How many of the elements equal to the threshold are kept."""
        return self.k - self.above

    def mask(self, chunk: torch.Tensor) -> torch.Tensor:
        """Keep-mask for the next chunk (chunks must come in the order used by ``fit``)."""
        b = _bits(chunk)
        if self.k == 0:
            return torch.zeros(chunk.shape, dtype=torch.bool)
        if self.threshold < 0:
            return torch.ones(chunk.shape, dtype=torch.bool)
        keep = b > self.threshold
        tie = b == self.threshold
        room = self.k - self.above - self._ties_kept
        if room <= 0:
            return keep.reshape(chunk.shape)
        n_tie = int(tie.sum())
        if n_tie <= room:
            keep |= tie
            self._ties_kept += n_tie
        elif n_tie:
            idx = torch.nonzero(tie).flatten()[:room]
            keep[idx] = True
            self._ties_kept += room
        return keep.reshape(chunk.shape)

    def mask_at(self, chunk: torch.Tensor, j: int) -> torch.Tensor:
        """Keep-mask of chunk ``j`` of the stream: the same as ``mask`` gives it in order."""
        if self.ties < 0:
            raise ValueError("TopK.mask_at needs the TopK that fit() returned (it counts the ties)")
        if self.k == 0:
            return torch.zeros(chunk.shape, dtype=torch.bool)
        if self.threshold < 0:
            return torch.ones(chunk.shape, dtype=torch.bool)
        b = _bits(chunk)
        if self.tie_before is None:  # every tie is kept
            return (b >= self.threshold).reshape(chunk.shape)
        keep = b > self.threshold
        quota = self.room - self.tie_before[j]
        if quota > 0:
            tie = b == self.threshold
            idx = torch.nonzero(tie).flatten()[:quota]
            keep[idx] = True
        return keep.reshape(chunk.shape)

    def take_at(self, chunk: torch.Tensor, j: int) -> torch.Tensor:
        """``torch.where(mask_at(chunk, j), chunk, 0)`` for a float32 chunk, as a new tensor,
        computed with integer ops on the bit patterns (``where`` is several times slower):
        a kept element keeps its bits, a dropped one becomes +0."""
        if chunk.dtype != torch.float32:
            return torch.where(self.mask_at(chunk, j), chunk, torch.zeros((), dtype=chunk.dtype))
        if self.ties < 0:
            raise ValueError("TopK.take_at needs the TopK that fit() returned (it counts the ties)")
        if self.k == 0:
            return torch.zeros_like(chunk)
        if self.threshold < 0:
            return chunk.clone()
        c = chunk.contiguous()
        if self.tie_before is None:
            # (threshold - 1 - key) >> 31 is all ones where key >= threshold, else zero
            ones = _bits(c).neg_().add_(self.threshold - 1).bitwise_right_shift_(31)
        else:
            ones = self.mask_at(c, j).reshape(-1).to(torch.int32).neg_()
        return c.view(torch.int32).bitwise_and(ones.reshape(c.shape)).view(torch.float32)


def keep_bits(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, x, 0)`` for float32 ``x`` through its bit patterns: the same bits
    (a kept NaN or -0 stays as it is, a dropped element is +0), several times faster."""
    if x.dtype != torch.float32:
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    x = x.contiguous()
    return x.view(torch.int32).bitwise_and(keep.to(torch.int32).neg_()).view(torch.float32)


def count_for(density: float, numel: int, rounding: str = "floor") -> int:
    """Elements kept at ``density``: int(density · n) as mergekit does for merges
    (``floor``), or the nearest count (``round``) where the user gave a drop rate and
    1 − p carries float error (1 − 0.9 = 0.0999…)."""
    if rounding == "round":
        return int(round(density * numel))
    return max(1, int(density * numel)) if numel else 0  # mergekit keeps at least one
