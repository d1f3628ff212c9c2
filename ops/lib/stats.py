"""Calibration statistics for the data-aware merges, and the maths that uses them (imports torch).

Read it in the order the pipeline uses it:

- ``read_examples``: one example per record of a data file (text for the model's tokenizer,
  or pre-tokenized ``input_ids``), truncated to ``max_length``, with its class id when the
  model is a classifier and the data has labels.
- ``collect_grams`` (``collect-stats kind: gram``): for every ``nn.Linear`` (and GPT-2's
  ``Conv1D``) whose weight is stored, the mean Gram matrix of its inputs over every real
  (non-padding) token, G = XᵀX / n -- the statistic RegMean needs.  The mean, not the sum,
  as FusionBench keeps it, so two models calibrated on different amounts of data weigh the
  same.
- ``collect_fisher`` (``collect-stats kind: fisher``): the diagonal of the Fisher information
  of every stored parameter, F = (1/N) Σₙ E_y[(∂ log p(y | xₙ) / ∂θ)²], from per-example
  gradients.  ``expected`` takes the expectation over the model's own predictive
  distribution exactly (a classifier: Σ_y p(y|x)·g_y², one backward pass per class);
  ``sampled`` draws one y ~ p(y|x) per example (per token for a causal LM) from the seed;
  ``empirical`` uses the data's labels (a causal LM: the text's own next tokens).
- ``regmean_weight``: RegMean's closed form for one linear layer (Jin et al. 2023),
  W* = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢ in the [in, out] orientation, with G̃ = α·G + (1 − α)·diag(G)
  (off-diagonal entries scaled by α, FusionBench's ``reduce_non_diagonal_ratio``).
- ``fisher_average``: Fisher merging (Matena & Raffel 2022), θ* = Σᵢ cᵢ(Fᵢ + ε)θᵢ / Σᵢ cᵢ(Fᵢ + ε)
  elementwise, with FusionBench's optional per-model normalisation of cᵢ by 1/‖Fᵢ‖.
- ``prediction_entropy``: AdaMerging's objective, the mean Shannon entropy of the predicted
  distributions.
- ``open_stats``: a Stats artifact read back, checked to hold the statistic a method needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.lib.data import read_records

STATS_PREFIX = "stats"      # stats*.safetensors in a Stats artifact
FISHER_LABELS = ("expected", "empirical", "sampled")


# -- data -------------------------------------------------------------------------------

@dataclass
class Example:
    ids: list[int]
    label: int | None = None   # a classifier's class id, when the data has labels


def read_examples(path: Path, model, tokenizer, *, text_field: str, label_field: str, samples: int | None,
                  max_length: int, with_labels: bool) -> list[Example]:
    """The first ``samples`` records of ``path`` as token ids (and class ids, ``with_labels``)."""
    from weightflow.ops.lib import models
    from weightflow.ops.metrics._scoring import check_ids, gold

    rows = read_records(path, samples)
    vocab = model.get_input_embeddings().num_embeddings
    limit = models.max_positions(model)
    length = min(max_length, limit) if limit else max_length
    label2id = {str(k): v for k, v in (getattr(model.config, "label2id", None) or {}).items()}
    out = []
    for i, row in enumerate(rows, 1):
        if "input_ids" in row:
            ids = check_ids(path, i, row["input_ids"], vocab)[:length]
        else:
            if text_field not in row:
                raise OpError(f"{path}: example {i} has no field '{text_field}' (nor 'input_ids')")
            if tokenizer is None:
                raise OpError(f"{path}: text data needs the model's tokenizer, and the model has none; "
                              "give pre-tokenized examples (input_ids) instead")
            ids = tokenizer(str(row[text_field]), truncation=True, max_length=length)["input_ids"]
        if not ids:
            raise OpError(f"{path}: example {i} has no tokens")
        label = None
        if with_labels:
            if label_field not in row:
                raise OpError(f"{path}: example {i} has no field '{label_field}' (the label)")
            label = gold(path, i, row[label_field], None, label2id)
            if not 0 <= label < model.config.num_labels:
                raise OpError(f"{path}: example {i}: label {label} is outside the model's "
                              f"{model.config.num_labels} labels")
        out.append(Example(ids, label))
    return out


def batches(examples: list[Example], batch_size: int, pad: int):
    """Right-padded (input_ids, attention_mask) batches, in order."""
    from weightflow.ops.lib.wanda import pad_batches

    return pad_batches([torch.tensor(e.ids, dtype=torch.long) for e in examples], batch_size, pad, "cpu")


# -- Gram matrices (RegMean) ------------------------------------------------------------

@dataclass
class Grams:
    """Mean input Gram matrix per linear weight name, the rows each was taken over, and which
    weights are stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]."""

    mean: dict[str, torch.Tensor]
    count: dict[str, int]
    transposed: list[str]


def collect_grams(model, examples: list[Example], batch_size: int, pad: int, stored: set[str],
                  tick: Callable[[], None] = lambda: None) -> Grams:
    """G = XᵀX / n of every linear's inputs over the examples' real tokens (float64 sums).

    ``stored``: the checkpoint's tensor names; a linear whose weight is not among them (an
    ``lm_head`` tied to the embeddings) has no tensor to merge and is left out.
    """
    from transformers.pytorch_utils import Conv1D

    from weightflow.ops.lib.models import linear_modules

    chosen = {name: mod for name, mod in linear_modules(model).items() if f"{name}.weight" in stored}
    if not chosen:
        raise OpError("the model has no linear layer whose weight is stored in its checkpoint")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict = {}

    def hook(_mod, inp, _out, *, name):
        x = inp[0].detach()
        mask = current["mask"]
        # real tokens only; a pooled [batch, hidden] input (every row is real) is taken whole
        real = mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape)
        x = x[mask] if real else x.reshape(-1, x.shape[-1])
        x = x.to(torch.float64)
        g = x.T @ x
        sums[name] = sums[name] + g if name in sums else g
        counts[name] = counts.get(name, 0) + x.shape[0]

    handles = [mod.register_forward_hook(functools.partial(hook, name=name)) for name, mod in chosen.items()]
    try:
        with torch.inference_mode():
            for ids, attn in batches(examples, batch_size, pad):
                current["mask"] = None if bool(attn.all()) else attn.bool()
                model(input_ids=ids, attention_mask=attn)
                tick()
    finally:
        for h in handles:
            h.remove()
    unused = [n for n in chosen if n not in sums]
    if unused:
        raise OpError(f"linear layer(s) {', '.join(unused[:3])} never ran on the data, so they have no "
                      "Gram matrix")
    return Grams(mean={f"{n}.weight": (sums[n] / counts[n]).to(torch.float32) for n in chosen},
                 count={f"{n}.weight": counts[n] for n in chosen},
                 transposed=[f"{n}.weight" for n, m in chosen.items() if isinstance(m, Conv1D)])


# -- Fisher diagonals -------------------------------------------------------------------

def _log_likelihoods(model, ex: Example, mode: str, gen: torch.Generator) -> list[tuple[float, torch.Tensor]]:
    """(weight, log-likelihood) terms whose weighted squared gradients make this example's
    Fisher contribution."""
    from weightflow.ops.lib import models

    ids = torch.tensor([ex.ids], dtype=torch.long)
    logits = model(input_ids=ids).logits
    if models.is_classifier(model):
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        if mode == "expected":
            probs = logp.detach().exp()
            return [(float(probs[y]), logp[y]) for y in range(logp.shape[0])]
        if mode == "empirical":
            return [(1.0, logp[ex.label])]
        y = int(torch.multinomial(logp.detach().exp(), 1, generator=gen))
        return [(1.0, logp[y])]
    if len(ex.ids) < 2:
        raise OpError("a causal LM's Fisher needs examples of at least two tokens")
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)       # predicts tokens 1..T-1
    target = ids[0, 1:] if mode == "empirical" else \
        torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(1)
    return [(1.0, logp.gather(1, target.unsqueeze(1)).sum())]


def collect_fisher(model, examples: list[Example], mode: str, seed: int, stored: set[str],
                   tick: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """F = (1/N) Σₙ Σ_y w_y (∂ log p(y | xₙ)/∂θ)² for every stored float parameter (see the
    module doc for ``mode``); per-example gradients, so one example per backward pass."""
    from weightflow.ops.lib import models

    if mode == "expected" and not models.is_classifier(model):
        raise OpError("fisher_labels: expected sums over every class, which only a classifier has; for a "
                      f"{type(model).__name__} use fisher_labels: sampled (tokens drawn from the model) or "
                      "empirical (the text's own tokens)")
    params = [(n, p) for n, p in model.named_parameters() if n in stored and p.is_floating_point()]
    if not params:
        raise OpError("none of the model's parameters is stored in its checkpoint under its own name")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    tensors = [p for _, p in params]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    gen = torch.Generator().manual_seed(seed)
    for ex in examples:
        terms = _log_likelihoods(model, ex, mode, gen)
        for k, (weight, ll) in enumerate(terms):
            grads = torch.autograd.grad(ll, tensors, retain_graph=k + 1 < len(terms), allow_unused=True)
            for a, g in zip(acc, grads, strict=True):
                if g is not None and weight:
                    a.add_(g.detach().float().pow(2), alpha=weight)
        tick()
    return {n: (a / len(examples)) for (n, _), a in zip(params, acc, strict=True)}


# -- reading a Stats artifact -----------------------------------------------------------

def open_stats(art, kind: str, method: str, model_art=None, warn: Callable[[str], None] | None = None):
    """The tensors of Stats artifact ``art`` (a Checkpoint), checked to be ``kind`` statistics;
    a warning when they were collected on another model than ``model_art``."""
    from weightflow.ops.lib.tensors import Checkpoint

    meta = art.meta
    got = meta.get("stats")
    if got != kind:
        raise OpError(f"{method} needs {kind} statistics (collect-stats kind: {kind}), but stats step "
                      f"'{art.step}' holds {got or 'no'} statistics")
    if model_art is not None and warn is not None and meta.get("model") not in (None, model_art.digest):
        warn(f"stats '{art.step}' were collected on another model than '{model_art.step}', the model they "
             "are paired with (list 'stats' in the order of 'models')")
    return Checkpoint(art.path, prefix=STATS_PREFIX, label=f"stats '{art.step}'"), meta


# -- the merges' maths -------------------------------------------------------------------

def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G): the off-diagonal entries scaled by α, the diagonal kept."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_weight(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float,
                   transposed: bool = False) -> tuple[torch.Tensor, bool]:
    """RegMean's merged weight, the minimiser of Σᵢ ‖Xᵢ W − Xᵢ Wᵢ‖² in the [in, out]
    orientation: W* = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢ (float64).  ``weights`` are nn.Linear's [out, in]
    (``transposed``: already [in, out]).  Returns (W* in the weights' orientation, exact):
    when Σ G̃ᵢ is singular the least-squares (pseudo-inverse) solution is used, exact False."""
    gs = [scale_off_diagonal(g.to(torch.float64), alpha) for g in grams]
    total = gs[0].clone()
    for g in gs[1:]:
        total.add_(g)
    rhs = None
    for g, w in zip(gs, weights, strict=True):
        w_in_out = w.to(torch.float64) if transposed else w.to(torch.float64).T
        term = g @ w_in_out
        rhs = term if rhs is None else rhs.add_(term)
    exact = True
    try:
        solution = torch.linalg.solve(total, rhs)
    except torch.linalg.LinAlgError:
        solution, exact = torch.linalg.lstsq(total, rhs, driver="gelsd").solution, False
    return (solution if transposed else solution.T), exact


def fisher_norms(fishers: list, names: list[str]) -> list[float]:
    """‖Fᵢ‖₂ of each model's Fisher over ``names`` (FusionBench's normalisation)."""
    norms = []
    for ck in fishers:
        total = 0.0
        for n in names:
            total += float(ck.get(n).to(torch.float64).pow(2).sum())
        norms.append(total ** 0.5)
    return norms


def fisher_average(values: list[torch.Tensor], fishers: list[torch.Tensor], coefficients: list[float],
                   epsilon: float) -> torch.Tensor:
    """Σᵢ cᵢ(Fᵢ + ε)θᵢ / Σᵢ cᵢ(Fᵢ + ε), elementwise."""
    num = torch.zeros(values[0].shape, dtype=torch.float64)
    den = torch.zeros(values[0].shape, dtype=torch.float64)
    for v, f, c in zip(values, fishers, coefficients, strict=True):
        w = (f.to(torch.float64) + epsilon) * c
        num.add_(w * v.to(torch.float64))
        den.add_(w)
    return num / den


def prediction_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows (positions where ``mask``) of −Σ p log p of softmax(logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    if mask is not None:
        h = h[mask]
    return h.mean()
