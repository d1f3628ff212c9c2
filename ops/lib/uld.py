"""ULD's assistant (Ji et al. 2024, "Reversing the Forget-Retain Objectives: An Efficient LLM
Unlearning Framework from Logit Difference", UCSB-NLP-Chang/ULD): a small model made from the
target, trained on the *reversed* objectives -- remember the forget set, forget the retain set
-- whose log-probabilities are then subtracted from the target's (a ``contrast`` Composite).

Why reversed: maximising a loss (gradient ascent and its relatives) is unbounded and wrecks
the model; minimising the assistant's NLL on the forget set is an ordinary, bounded fine-tune.
The assistant "forgets" the retain set by matching the uniform distribution on it, so on retain
inputs its log-probabilities are flat and subtracting them leaves the target's distribution
unchanged (a constant shift of every logit), while on forget inputs it is confident exactly
where the target has memorised the answer.

ULD's loss (``remember+uniform``): L = NLL_A(forget) + retain_weight·KL(U ‖ p_A) on retain,
KL(U ‖ p) = Σ_v (1/V)·(log(1/V) − log p(v)) per position, averaged over the positions
(ULD's ``UniformLossFunc``: ``kl_div(log p, U, reduction="batchmean")`` over every position
of the batch; here over every attended position, padding left out).
"""

from __future__ import annotations

import math

import torch


def build_assistant(target, layers: int):
    """A copy of ``target`` keeping its embeddings, its first ``layers`` decoder layers, its
    final norm and its head (ULD's assistant: the target's lower layers, so it shares the
    tokenizer and starts from the target's own representations; ULD's ``init_small_llm``)."""
    import copy

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib import models

    _, blocks = models.blocks(target)
    if not 1 <= layers <= len(blocks):
        raise OpError(f"uld: assistant_layers must be between 1 and the target's {len(blocks)} decoder layers, "
                      f"got {layers}")
    assistant = copy.deepcopy(target)
    _, kept = models.blocks(assistant)
    del kept[layers:]
    cfg = assistant.config
    cfg.num_hidden_layers = layers
    for name in ("layer_types",):  # per-layer config lists follow the kept layers
        value = getattr(cfg, name, None)
        if isinstance(value, list):
            setattr(cfg, name, value[:layers])
    return assistant


def uniform_kl(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ p) of each position's predicted distribution p against the uniform U over the V
    tokens, averaged over the positions where ``mask`` is set: mean over t of
    −log V − (1/V)·Σ_v log p_t(v).  Zero exactly when every masked prediction is uniform."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    per_pos = -lp.mean(dim=-1) - math.log(lp.shape[-1])
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1)
