"""``compose``: a Composite from stored models and a rule (see ops/lib/composite.py).

- ``contrast``: ``target`` − ``alpha``·``assistant`` in log-probabilities, on the tokens the
  target finds plausible (``top_logit_filter``: ULD's relative-top filter, contrastive
  decoding's plausibility constraint); ULD's unlearned model, or contrastive decoding;
- ``ensemble``: the ``members``' distributions averaged (``aggregate``); S3T's shard models;
- ``guarded``: a sequence ``classifier`` flags inputs (P(``forget_label``) ≥ ``threshold``)
  and the ``target`` runs on their embeddings corrupted by Gaussian noise (``strength`` ×
  the embedding matrix's standard deviation); ECO's prompt guard.

The components are stored inside the composite (hard links where the filesystem allows), so
it is self-contained; ``evaluate`` scores it with every metric that needs only forward passes
or generation, ``export`` writes it as a directory that ``weightflow.load_model`` loads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field

from weightflow.dsl.lang.spec import FiniteFloat, Kind, ModelRef, OpParams, OpSpec


class ContrastParams(OpParams):
    """target − alpha·assistant (log-probabilities), filtered by the target's plausibility."""

    rule: Literal["contrast"]
    target: ModelRef = Field(description="the model whose distribution is kept")
    assistant: ModelRef = Field(description="the model whose log-probabilities are subtracted")
    alpha: FiniteFloat = Field(1.0, description="weight of the subtracted assistant (ULD: 0.8)")
    top_logit_filter: FiniteFloat = Field(0.0, ge=0, lt=1, description="contrast only tokens with target "
                                          "probability >= this x the top token's (0: all tokens)")


class EnsembleParams(OpParams):
    """The members' distributions averaged."""

    rule: Literal["ensemble"]
    members: list[ModelRef] = Field(min_length=2, description="models with one vocabulary (or one label set)")
    aggregate: Literal["mean_probs", "mean_logprobs"] = Field("mean_probs", description="average the "
                                                              "probabilities, or the log-probabilities")


class GuardedParams(OpParams):
    """A classifier gate in front of the target, corrupting flagged inputs' embeddings."""

    rule: Literal["guarded"]
    target: ModelRef = Field(description="the causal LM that answers")
    classifier: ModelRef = Field(description="a sequence classifier of inputs (forget target vs not)")
    threshold: FiniteFloat = Field(0.5, gt=0, le=1, description="flag an input when P(forget_label) >= this")
    forget_label: int = Field(1, ge=0, description="the classifier's class id of forget-target inputs")
    strength: FiniteFloat = Field(1.0, ge=0, description="noise std, in units of the embeddings' std")
    seed: int = Field(0, ge=0, description="seed of the corruption noise")


ComposeParams = Annotated[Union[ContrastParams, EnsembleParams, GuardedParams],  # noqa: UP007
                          Field(discriminator="rule")]


def run(inputs, p: Any, ctx) -> dict:
    from pathlib import Path

    from weightflow.ops.lib import composite

    if p.rule == "ensemble":
        roles = {f"member{i}": a for i, a in enumerate(inputs["members"])}
        primary = "member0"
        params: dict = {"aggregate": p.aggregate}
    elif p.rule == "contrast":
        roles = {"target": inputs["target"], "assistant": inputs["assistant"]}
        primary = "target"
        params = {"alpha": p.alpha, "top_logit_filter": p.top_logit_filter}
    else:
        roles = {"target": inputs["target"], "classifier": inputs["classifier"]}
        primary = "target"
        params = {"threshold": p.threshold, "forget_label": p.forget_label, "strength": p.strength, "seed": p.seed}
    comps = {role: composite.add_component(ctx.out, role, Path(art.path)) for role, art in roles.items()}
    composite.write_spec(ctx.out, p.rule, params, comps, primary)
    module = composite.load(ctx.out, "cpu")  # fails now, not at scoring time, if the parts do not fit
    del module
    return {"rule": p.rule, "components": {role: art.digest for role, art in roles.items()}}


OP = OpSpec[Any](name="compose", version=1, output=Kind.COMPOSITE, params=ComposeParams, run=run, doc=__doc__,
                 discriminator="rule")
