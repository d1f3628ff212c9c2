"""Membership inference on ``forget`` (members) vs ``holdout`` (non-members) records, by the
attacks the unlearning literature reports, each an AUC: P(score of a member > score of a
non-member) + ½·P(tie), counted exactly over every pair.  Each attack scores an example so that
higher says "member", from the model's per-token log-probabilities of the example's scored
tokens (encoded as ``loss`` does):

- ``loss``: −mean token NLL (Yeom et al. 2018);
- ``zlib``: −(NLL sum) / zlib-compressed byte length of the scored text, i.e. the loss
  relative to how compressible the text is (Carlini et al. 2021);
- ``min-k``: the mean of the lowest ``k`` fraction of token log-probabilities (Min-K% Prob,
  Shi et al. 2024);
- ``min-k++``: the same over (log p(x_t) − μ_t)/σ_t, each token's log-probability normalised
  by the mean and standard deviation of log p under the model's own next-token distribution
  (Min-K%++, Zhang et al. 2024).

The lowest ``max(1, ⌊k·n⌋)`` of n tokens are averaged.  No direction is better: after training
on the forget set the AUC is near 1; unlearning aims at the AUC of a model that never saw it
(about 0.5 when forget and holdout come from one distribution; ``privleak`` compares with
such a reference).  Causal LMs.
"""

from __future__ import annotations

import zlib
from typing import Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import DataPath
from weightflow.ops.metrics import Metric
from weightflow.ops.metrics.loss import ScoredText, preflight_files

Attack = Literal["loss", "zlib", "min-k", "min-k++"]
ATTACKS: tuple[str, ...] = ("loss", "zlib", "min-k", "min-k++")


class MiaMetric(ScoredText):
    """Membership-inference AUCs (loss, zlib, Min-K%, Min-K%++) of forget vs holdout."""

    forget: DataPath = Field(description="records the model saw (members)")
    holdout: DataPath = Field(description="records of the same distribution it did not see")
    attacks: list[Attack] = Field(default_factory=lambda: list(ATTACKS), min_length=1,
                                  description="attacks reported, each an AUC column")
    k: float = Field(0.4, gt=0, le=1, description="Min-K% fraction of lowest-scoring tokens averaged")

    @model_validator(mode="after")
    def _fields(self):
        self.check_fields()
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError("'attacks' lists an attack twice")
        return self


def column(attack: str) -> str:
    return "auc_" + attack.replace("-", "_").replace("++", "_pp")


def lowest_mean(values: list[float], k: float) -> float:
    n = max(1, int(len(values) * k))
    return sum(sorted(values)[:n]) / n


def attack_scores(tokens, text_bytes: int, k: float) -> dict[str, float]:
    """Every attack's membership score of one example (higher: member)."""
    nll = -sum(tokens.logp)
    z = [(lp - mu) / s if s > 0 else 0.0 for lp, mu, s in zip(tokens.logp, tokens.mu, tokens.sigma, strict=True)]
    return {"loss": -nll / len(tokens.logp), "zlib": -nll / max(1, text_bytes),
            "min-k": lowest_mean(tokens.logp, k), "min-k++": lowest_mean(z, k)}


def example_tokens(subject, m: ScoredText, path, metric: str) -> list:
    """``TokenScores`` of each example's scored tokens (examples with none are skipped)."""
    from weightflow.ops.lib import models
    from weightflow.ops.metrics._scoring import loss_examples, require_causal, token_windows

    require_causal(subject, metric)
    wins = []
    for ids, scored in loss_examples(subject, m, path):
        marks = scored[1:]
        if any(marks):
            wins.append((ids[:-1], ids[1:], len(marks) - marks.index(True)))
    if not wins:
        from weightflow.dsl.lang.diagnostics import OpError

        raise OpError(f"{path}: no token to score within max_length {m.max_length}")
    return token_windows(subject.model, wins, m.batch_size, models.pad_id(subject.model, subject.tokenizer),
                         subject.device)


def scores_of(subject, m, path, metric: str) -> list[dict[str, float]]:
    tok = subject.tokenizer
    out = []
    for t in example_tokens(subject, m, path, metric):
        text = tok.decode(t.ids, skip_special_tokens=True) if tok is not None else " ".join(map(str, t.ids))
        out.append(attack_scores(t, len(zlib.compress(text.encode("utf-8"))), m.k))
    return out


def mia_aucs(subject, m, ctx, metric: str) -> tuple[dict[str, float], int, int]:
    from weightflow.ops.metrics._ranking import auc

    forget = scores_of(subject, m, ctx.data_path(m.forget), metric)
    holdout = scores_of(subject, m, ctx.data_path(m.holdout), metric)
    aucs = {a: auc([s[a] for s in forget], [s[a] for s in holdout]) for a in m.attacks}
    return aucs, len(forget), len(holdout)


def mia(subject, m: MiaMetric, ctx) -> tuple[dict, dict]:
    aucs, nf, nh = mia_aucs(subject, m, ctx, "mia")
    values: dict = {column(a): aucs.get(a) for a in ATTACKS}
    values.update(n_forget=nf, n_holdout=nh)
    return values, {}


METRIC = Metric(
    name="mia", params=MiaMetric, compute=mia, doc=__doc__,
    preflight=lambda m, env: preflight_files(m, env, (m.forget, m.holdout)),
    columns=tuple((column(a), None, True) for a in ATTACKS) + (("n_forget", None, False), ("n_holdout", None, False)),
)
