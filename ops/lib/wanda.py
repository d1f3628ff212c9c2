"""Wanda and magnitude pruning of the linear layers inside a model's transformer blocks.

Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
Models") scores each weight by |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the L2 norm of input
feature j over every calibration token, and removes the lowest-scoring weights *within
each output row* (or within each group of M consecutive inputs of a row, for N:M).

Calibration is layer by layer, as in the reference implementation: the calibration
batches are run through the model up to the first block and the inputs of that block
are kept (hidden states plus the masks/position embeddings the model passes to every
block).  Then, block by block: run the block with hooks that accumulate Σ x² per input
feature of each of its linears (float64, padding tokens left out), prune all of them,
run the *pruned* block again, and hand its outputs on as the next block's inputs.
Memory is the model plus one set of cached block inputs.

Ties are broken by position (stable sort), so masks are deterministic.  Counts:
``floor(s·n)`` weights are pruned per comparison group of n weights (a row of the
layer, or the whole layer for ``group: layer``); ``N:M`` keeps the N largest of every M
consecutive weights of a row (so 2:4 and 4:8 are 50% sparse).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
from dataclasses import dataclass, field

import torch

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.lib.models import blocks, linear_modules, weight_rows

ROW_CHUNK = 4096  # tokens per float64 sum-of-squares chunk


def prune_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a group loses at ``sparsity`` (floor, robust to 0.3*10)."""
    return min(n, int(math.floor(n * sparsity + 1e-9)))


def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest entries of each row of ``score``; among equal
    scores the earlier positions go first (what a stable ascending sort would pick).
    Linear time: a k-th value selection, not a sort."""
    mask = torch.zeros(score.shape, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= score.shape[1]:
        return ~mask
    kth = score.kthvalue(k, dim=1, keepdim=True).values
    less = score <= kth
    extra = less.sum(1) - k  # > 0 where the k-th value is tied beyond position k
    rows = extra.nonzero().flatten()
    if len(rows):  # rare: keep only the earliest of the tied entries in those rows
        sub, sub_kth = score[rows], kth[rows]
        ties = sub == sub_kth
        room = k - (sub < sub_kth).sum(1, keepdim=True)
        less[rows] = (sub < sub_kth) | (ties & (ties.cumsum(1) <= room))
    return less


def mask_from_scores(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                     group: str) -> torch.Tensor:
    """Boolean [out, in] mask, True where a weight is pruned: the lowest scores per group."""
    out_f, in_f = score.shape
    if nm is not None:
        n, m = nm
        if in_f % m:
            raise OpError(f"pattern {n}:{m} needs the input size to be a multiple of {m}, got {in_f}")
        return lowest(score.reshape(-1, m), m - n).reshape(out_f, in_f)
    if group == "row":
        return lowest(score, prune_count(in_f, sparsity))
    return lowest(score.reshape(1, -1), prune_count(score.numel(), sparsity)).reshape(out_f, in_f)


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over the rows of a [tokens, features] tensor, in float64, chunk by chunk."""
    total = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for lo in range(0, x.shape[0], ROW_CHUNK):
        total += x[lo:lo + ROW_CHUNK].to(torch.float64).pow_(2).sum(0)
    return total


def wanda_scores(weight: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X‖₂ per weight, [out, in], float64."""
    return weight.abs().to(torch.float64) * sq.to(weight.device).sqrt().unsqueeze(0)


@dataclass
class Result:
    """What was pruned: per linear module, pruned / zero / total counts."""

    layers: dict[str, dict] = field(default_factory=dict)
    blocks: str = ""
    sumsq: dict[str, torch.Tensor] = field(default_factory=dict)  # Σx² per input feature (wanda)


def select_linears(model, include: list[str] | None, exclude: list[str]) -> tuple[str, list[dict]]:
    """Per block, {qualified module name: module} of the linears to prune."""
    prefix, mods = blocks(model)
    chosen: list[dict] = []
    every: list[str] = []
    for i, block in enumerate(mods):
        sel = {}
        for rel, mod in linear_modules(block).items():
            name = f"{prefix}.{i}.{rel}"
            every.append(name)
            if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in exclude):
                continue
            sel[name] = mod
        chosen.append(sel)
    for p in list(include or []) + list(exclude):
        if not any(fnmatch.fnmatchcase(n, p) for n in every):
            raise OpError(f"pattern {p!r} matches no linear layer inside the transformer blocks "
                          f"(e.g. {every[0]}, {every[-1]}); lm_head and embeddings are never pruned")
    if not any(chosen):
        raise OpError("include/exclude leave no linear layer to prune")
    return prefix, chosen


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[0] if hasattr(out, "__getitem__") else out.last_hidden_state


class _Stop(Exception):
    pass


def block_inputs(model, block0, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[tuple, dict]]:
    """Run each batch up to the first block; the (args, kwargs) it receives, per batch."""
    got: list[tuple[tuple, dict]] = []

    def catch(_mod, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    handle = block0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids, attn in batches:
            try:
                model(input_ids=ids, attention_mask=attn)
            except _Stop:
                pass
            else:
                raise OpError("the model never reached its first transformer block")
    finally:
        handle.remove()
    return got


class _Statistics:
    """Σx² per input feature of the chosen linears of a block, over the calibration batches.

    Only the linears' inputs are needed, not the block's output (the pruned block is run
    again for that), so each batch stops at the input of the block's last chosen linear
    in call order (learnt on the first run, checked on every one): in a Llama block that
    skips ``down_proj``'s matmul, a quarter of the block's linear work.  Linears fed the
    same tensor (q/k/v, gate/up) share one sum.  Every sum is the one the plain hooks
    compute, added in the same order: the statistics are bit-identical.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.order: list[str] | None = None  # relative names of the chosen linears, in call order

    def collect(self, i: int, block, sel: dict, inputs: list, token_masks: list, device: str) -> dict:
        sq = {name: torch.zeros(weight_rows(mod).shape[1], dtype=torch.float64, device=device)
              for name, mod in sel.items()}
        head = f"{self.prefix}.{i}."
        stop = head + self.order[-1] if self.order and {head + r for r in self.order} == set(sel) else None
        state: dict = {}

        def hook(_mod, args, *, name):
            x = args[0]
            if state["last"][0] is not x:  # q/k/v (gate/up) get the same tensor: sum it once
                tm = state["mask"]
                masked = tm is not None and tuple(x.shape[:-1]) == tuple(tm.shape)
                state["last"] = (x, sum_of_squares(x[tm] if masked else x.reshape(-1, x.shape[-1])))
            state["sums"].append((name, state["last"][1]))
            if name == state["stop"]:
                raise _Stop

        handles = [mod.register_forward_pre_hook(functools.partial(hook, name=name)) for name, mod in sel.items()]
        try:
            for (args, kwargs), tm in zip(inputs, token_masks, strict=True):
                state.update(mask=tm, last=(None, None), sums=[], stop=stop)
                with contextlib.suppress(_Stop):
                    block(*args, **kwargs)
                called = sorted(n for n, _ in state["sums"])
                if stop is not None and called != sorted(sel):  # not each once before the stop:
                    stop = None  # run this block whole from now on
                    state.update(last=(None, None), sums=[], stop=None)
                    block(*args, **kwargs)
                if self.order is None and called == sorted(sel):
                    self.order = [n.removeprefix(head) for n, _ in state["sums"]]
                    stop = head + self.order[-1]
                for name, s in state["sums"]:  # in call order, as the plain hooks add them
                    sq[name] += s
        finally:
            for h in handles:
                h.remove()
        return sq


def pad_batches(samples: list[torch.Tensor], batch_size: int, pad: int, device: str):
    """Right-padded (input_ids, attention_mask) batches of the samples, in order."""
    out = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo:lo + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = s
            attn[i, :len(s)] = 1
        out.append((ids.to(device), attn.to(device)))
    return out


def prune(model, *, method: str, sparsity: float, nm: tuple[int, int] | None, group: str,  # noqa: C901
          include: list[str] | None, exclude: list[str], samples: list[torch.Tensor] | None = None,
          batch_size: int = 8, pad: int = 0, device: str = "cpu", progress=None) -> Result:
    """Prune ``model`` in place; returns per-layer counts."""
    prefix, chosen = select_linears(model, include, exclude)
    _, mods = blocks(model)
    result = Result(blocks=prefix)
    tick = progress.update if progress is not None else (lambda n=1: None)

    def apply(name: str, mod, score: torch.Tensor) -> None:
        w = weight_rows(mod)
        mask = mask_from_scores(score.cpu(), sparsity, nm, group).to(w.device)
        w.masked_fill_(mask, 0)
        result.layers[name] = {"pruned": int(mask.sum()), "zeros": w.numel() - int(w.count_nonzero()),
                               "numel": w.numel()}

    if method == "magnitude":
        for sel in chosen:
            for name, mod in sel.items():
                apply(name, mod, weight_rows(mod).abs().to(torch.float64))
            tick(1)
        return result

    if not samples:
        raise OpError("wanda needs calibration samples")
    if len({getattr(b, "attention_type", None) for b in mods}) > 1:
        raise OpError("blocks with different attention types (sliding-window hybrids) are not supported")
    batches = pad_batches(samples, batch_size, pad, device)
    # per batch: which positions are real tokens (None: all of them, no padding)
    token_masks = [None if bool(attn.all()) else attn.bool() for _, attn in batches]
    stats = _Statistics(prefix)
    with torch.inference_mode():
        inputs = block_inputs(model, mods[0], batches)
        for i, block in enumerate(mods):
            sel = chosen[i]
            sq = stats.collect(i, block, sel, inputs, token_masks, device)
            for name, mod in sel.items():
                apply(name, mod, wanda_scores(weight_rows(mod), sq[name]))
                result.sumsq[name] = sq[name].cpu()
            if i + 1 < len(mods):  # the pruned block's outputs feed the next block
                inputs = [_with_hidden(args, kwargs, _first(block(*args, **kwargs)))
                          for args, kwargs in inputs]
            tick(1)
    return result
