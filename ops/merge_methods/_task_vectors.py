"""Shared pieces of the task-vector methods that ``merge_deltas`` cannot express.

``merge_deltas`` combines each delta's own selection by a weighted sum or by TIES sign
election over the user's weights.  SCE weighs each task vector by its squared mass
after a selection made across all of them, RAM divides each element by how many task
vectors changed it, and RAM+ rescales each task vector by how much of it overlaps the
others: each needs every delta's chunk of a tensor at once, and statistics of the whole
tensor first.  ``merge_task_vectors`` streams such a method: per float tensor it calls
``fit`` once (which may pass over the tensor's chunks as often as it needs), then
``combine`` on each row chunk of the deltas that hold the tensor, with the chunk's
ordinal (what ``TopK.mask_at`` takes), and writes ``base + λ·combine(...)``.

Also here: mergekit's boolean ``rescale`` spelling, an L1 rescale for a selection, and
exact order statistics of a signed stream (arcee_fusion's quantiles).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, StrictBool, model_validator

from weightflow.dsl.lang.spec import DeltaRef, FiniteFloat, ModelRef
from weightflow.ops.lib.merging import DeltaInput, MergeCommon, _warn_other_bases, stream_merge

# -- params ----------------------------------------------------------------------------


class TaskVectorParams(MergeCommon):
    """A base model and task vectors (deltas) merged by a rule over all of them at once."""

    base: ModelRef = Field(description="step producing the model the deltas are added to")
    deltas: list[DeltaRef] = Field(min_length=1, description="steps producing deltas (task vectors)")
    lambda_: FiniteFloat = Field(1.0, alias="lambda", description="scale of the merged task vector")
    vocab: Literal["error", "truncate", "pad"] = Field(
        "error", description="deltas whose first dimension (vocab) exceeds the base's: 'truncate' cuts "
        "them; smaller ones: 'pad' fills with zero delta")

    @model_validator(mode="after")
    def _vocab_or_tokenizer(self):
        if self.tokenizer is not None and self.vocab != "error":
            raise ValueError(f"give either vocab: {self.vocab} (cut or pad rows by position) or tokenizer: "
                             "(match rows by token string), not both")
        return self


def rescale_choice(value: Any) -> Any:
    """mergekit's ``rescale: true`` is an L1 rescale, ``false`` none."""
    if isinstance(value, bool):
        return "l1" if value else "none"
    return value


#: ``rescale`` as weightflow's names or mergekit's booleans (validated to the names)
RescaleOrBool = Literal["dare", "l1", "none"] | StrictBool


# -- streaming -------------------------------------------------------------------------


@dataclass
class DeltaTensor:
    """One float tensor of the base, and the deltas that hold it (in ``deltas`` order)."""

    name: str
    shape: tuple[int, ...]
    deltas: list[DeltaInput]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def chunks(self) -> Iterator[list]:
        """Row chunks of the tensor, one float32 chunk per delta, side by side, in order."""
        from weightflow.ops.lib.tensors import row_ranges

        for lo, hi in row_ranges(self.shape):
            yield [d.chunk(self.name, lo, hi, self.shape) for d in self.deltas]


def merge_task_vectors(inputs, p, ctx, fit: Callable[[DeltaTensor], Any],
                       combine: Callable[[Any, list, int], Any]) -> dict:
    """``base + λ·combine(state, [τᵢ chunk], j)`` for row chunk ``j``, ``state =
    fit(tensor)`` computed once per float tensor; a tensor no delta holds is the base's."""
    import torch

    from weightflow.ops.lib.tensors import Checkpoint, row_ranges
    from weightflow.ops.lib.vocab import view as vocab_view

    base_art = inputs["base"]
    base = vocab_view(Checkpoint(base_art.path, label=f"base '{base_art.step}'"), base_art)  # `tokenizer:`
    deltas = [DeltaInput(a, base, p.vocab) for a in inputs["deltas"]]
    _warn_other_bases(deltas, base_art, ctx)
    current: dict[str, Any] = {}

    def before(name):
        current.clear()
        holding = [d for d in deltas if name in d.ckpt]
        if holding:
            shape = tuple(base.info[name].shape)
            current["deltas"] = holding
            current["ordinal"] = {lo: j for j, (lo, _) in enumerate(row_ranges(shape))}
            current["state"] = fit(DeltaTensor(name, shape, holding))

    def compute(name, lo, hi):
        b = base.get(name, lo, hi).to(torch.float32)
        if "deltas" not in current:
            return b
        shape = base.info[name].shape
        merged = combine(current["state"], [d.chunk(name, lo, hi, shape) for d in current["deltas"]],
                         current["ordinal"][lo])
        return b + merged * p.lambda_ if p.lambda_ != 1 else b + merged

    n = stream_merge(ctx, base, base_art.path, compute, p.dtype or ctx.dtype, before=before)
    return {"tensors": n}


# -- selections' helpers ---------------------------------------------------------------

L1_FLOOR = 1e-7  # mergekit leaves a selection unscaled when either L1 norm is below this


def l1_rescale(select_at: Callable[[Any, int], Any], chunks: Callable[[], Iterator]) -> float:
    """The factor giving the selected elements the L1 norm of the whole tensor,
    ‖δ‖₁ / ‖select(δ)‖₁ (1 where either is below ``L1_FLOOR``, as mergekit), summed in
    order in the calling thread; ``select_at(chunk, j)`` selects chunk ``j``."""
    import torch

    total = kept = 0.0
    for j, c in enumerate(chunks()):
        total += float(c.abs().sum(dtype=torch.float64))
        kept += float(select_at(c, j).abs().sum(dtype=torch.float64))
    return total / kept if total >= L1_FLOOR and kept >= L1_FLOOR else 1.0


# -- order statistics of a signed stream -----------------------------------------------

_HALF = 1 << 16
_SIGN = 1 << 31
_ALL = (1 << 32) - 1


def _sortable(x) -> Any:
    """Monotone int64 keys in [0, 2³²) of float32 values (IEEE bits, negatives flipped)."""
    import torch

    u = x.detach().to(torch.float32).reshape(-1).view(torch.int32).to(torch.int64) & _ALL
    return torch.where(u >= _SIGN, _ALL - u, u + _SIGN)


def _float_of(key: int) -> float:
    u = key - _SIGN if key >= _SIGN else _ALL - key
    return float(struct.unpack("<f", struct.pack("<I", u))[0])


def order_statistics(chunks: Callable[[], Iterator], ranks: list[int]) -> list[float]:
    """The values at 0-based positions ``ranks`` of the ascending sort of every element
    of ``chunks()`` (a re-iterable source of float32 chunks), exactly, in two passes of
    16-bit histograms over the sortable keys: memory is two histograms, not the tensor."""
    import torch

    high = torch.zeros(_HALF, dtype=torch.int64)
    for c in chunks():
        high += torch.bincount(_sortable(c) >> 16, minlength=_HALF)
    high_cum = torch.cumsum(high, 0)
    total = int(high_cum[-1])
    if any(not 0 <= r < total for r in ranks):
        raise ValueError(f"ranks {ranks} outside a stream of {total} elements")
    bins = {r: int(torch.searchsorted(high_cum, torch.tensor(r), right=True)) for r in ranks}
    lows = {h: torch.zeros(_HALF, dtype=torch.int64) for h in set(bins.values())}
    for c in chunks():
        k = _sortable(c)
        hk = k >> 16
        for h, hist in lows.items():
            sel = k[hk == h]
            if sel.numel():
                hist += torch.bincount(sel & (_HALF - 1), minlength=_HALF)
    out = []
    for r in ranks:
        h = bins[r]
        below = int(high_cum[h - 1]) if h else 0
        low = int(torch.searchsorted(torch.cumsum(lows[h], 0), torch.tensor(r - below), right=True))
        out.append(_float_of((h << 16) | low))
    return out


# -- RAM's counts ----------------------------------------------------------------------


def changed(taus: list, epsilon: float) -> tuple[list, Any]:
    """RAM's masks: which elements each task vector changes (|τᵢ| > ε), and how many
    task vectors change each element."""
    import torch

    nonzero = [t.abs() > epsilon for t in taus]
    count = torch.zeros(taus[0].shape, dtype=torch.int64)
    for m in nonzero:
        count += m
    return nonzero, count
