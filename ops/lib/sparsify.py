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
  bit patterns of |x|; ties at the threshold are kept in index order, so exactly
  ``k`` elements survive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import blake3
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


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Monotone int64 keys of |x| (float32 bit patterns of non-negative floats)."""
    return x.detach().abs().to(torch.float32).reshape(-1).view(torch.int32).to(torch.int64)


@dataclass
class TopK:
    """Keeps exactly ``k`` elements of largest magnitude across a stream of chunks."""

    threshold: int  # bit pattern of the k-th largest |x|
    above: int      # elements strictly above the threshold
    k: int
    _ties_kept: int = 0

    @classmethod
    def fit(cls, chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> TopK:
        """Find the threshold in two passes over ``chunks()`` (a re-iterable source)."""
        if k <= 0:
            return cls(threshold=1 << 62, above=0, k=0)
        high = torch.zeros(1 << 16, dtype=torch.int64)
        total = 0
        for c in chunks():
            b = _bits(c)
            total += b.numel()
            high += torch.bincount(b >> 16, minlength=1 << 16)
        if k >= total:
            return cls(threshold=-1, above=total, k=total)
        # walk bins from the top until k elements are covered
        from_top = torch.flip(torch.cumsum(torch.flip(high, [0]), 0), [0])  # count with bin >= i
        hb = int(torch.nonzero(from_top >= k).max())
        above_bin = int(from_top[hb + 1]) if hb + 1 < (1 << 16) else 0
        low = torch.zeros(1 << 16, dtype=torch.int64)
        for c in chunks():
            b = _bits(c)
            sel = b[(b >> 16) == hb]
            if sel.numel():
                low += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
        need = k - above_bin
        from_top_low = torch.flip(torch.cumsum(torch.flip(low, [0]), 0), [0])
        lb = int(torch.nonzero(from_top_low >= need).max())
        above_low = int(from_top_low[lb + 1]) if lb + 1 < (1 << 16) else 0
        return cls(threshold=(hb << 16) | lb, above=above_bin + above_low, k=k)

    def mask(self, chunk: torch.Tensor) -> torch.Tensor:
        """Keep-mask for the next chunk (chunks must come in the order used by ``fit``)."""
        b = _bits(chunk)
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


def count_for(density: float, numel: int, rounding: str = "floor") -> int:
    """Elements kept at ``density``: int(density · n) as mergekit does for merges
    (``floor``), or the nearest count (``round``) where the user gave a drop rate and
    1 − p carries float error (1 − 0.9 = 0.0999…)."""
    if rounding == "round":
        return int(round(density * numel))
    return max(1, int(density * numel)) if numel else 0  # mergekit keeps at least one
