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
"""

from __future__ import annotations

import torch


def build_assistant(target, layers: int):
    """A copy of ``target`` keeping its embeddings, its first ``layers`` decoder layers, its
    final norm and its head (ULD's assistant: the target's lower layers, so it shares the
    tokenizer and starts from the target's own representations)."""
    import copy

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib import models

    _, blocks = models.blocks(target)
    if not 1 <= layers <= len(blocks):
        raise OpError(f"uld: assistant_layers must be between 1 and the target's {len(blocks)} layers, got {layers}")
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


def uniform_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted next-token distributions against the uniform
    distribution, averaged over the scored (label != -100) positions: mean over t of
    −(1/V)·Σ_v log p_t(v).  Minimal exactly when every scored prediction is uniform."""
    shift_logits = logits[:, :-1].float()
    scored = labels[:, 1:] != -100
    lp = torch.log_softmax(shift_logits, dim=-1)
    per_pos = -lp.mean(dim=-1)
    return (per_pos * scored).sum() / scored.sum().clamp_min(1)
