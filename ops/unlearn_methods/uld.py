"""``uld``, unlearning from logit difference (Ji et al. 2024, UCSB-NLP-Chang/ULD): train an
*assistant* A -- the input model's first ``assistant_layers`` decoder layers with its
embeddings, final norm and head -- on the reversed objectives, L = ``forget_weight``·NLL_A(forget)
+ ``retain_weight``·KL(U ‖ p_A) on retain (U the uniform distribution over the vocabulary,
per attended position: ULD's ``remember+uniform``), and output a ``contrast`` Composite of the
unchanged input model T and A: on the set K of tokens with p_T(v) ≥ ``top_logit_filter``·max p_T
or among the int(``top_logit_filter``·V) most likely (ULD's relative-top filter),
p(v) = p_T(K)·softmax_K(log p_T − ``alpha``·log p_A)(v); off K, p(v) = p_T(v).  A is confident
on forget answers, so they are pushed down; on retain inputs it is flat, so T's distribution
is kept exactly (ULD adds raw logits, z_T − alpha·z_A on K and z_T off it, which is not
invariant to a shift of A's logits; sharing K's mass is).  ``lora`` trains
LoRA adapters on A (ULD's recipe: r 16, alpha 32, learning rate 1e-3), merged before it is
stored.  ULD's TOFU recipe also adds paraphrased forget answers to the forget data and
perturbed forget answers to the retain data: give such files as forget / retain."""

from typing import Annotated

from pydantic import Field

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    ForgetBatch,
    Job,
    Param,
    RetainBatch,
    UnlearnMethod,
    save_component,
)

RULE = "contrast"
UNIT = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


def forget_loss(batch: ForgetBatch, opts: dict):
    """The assistant *remembers* the forget set: its token-mean NLL, minimised."""
    return batch.mean_nll()


def retain_loss(batch: RetainBatch, opts: dict):
    """The assistant *forgets* the retain set: KL(U ‖ p_A) per attended position, averaged."""
    from weightflow.ops.lib.uld import uniform_kl

    return uniform_kl(batch.logits, batch.attention_mask)


def trains(target, opts: dict):
    from weightflow.ops.lib.uld import build_assistant

    return build_assistant(target, opts["assistant_layers"])


def write(job: Job) -> dict:
    """The contrast composite: the input model's stored files as ``target``, the trained
    assistant (LoRA merged) as ``assistant``."""
    from pathlib import Path

    from weightflow.ops.lib import composite

    out = job.ctx.out
    comps = {"target": composite.add_component(out, "target", Path(job.art.path)),
             "assistant": save_component(job, "assistant", job.model, Path(job.art.path))}
    f = job.opts["top_logit_filter"]
    composite.write_spec(out, RULE, {"alpha": job.opts["alpha"], "top_logit_filter": f, "min_kept_fraction": f,
                                     "preserve_mass": True}, comps, "target")
    return {"assistant_layers": job.opts["assistant_layers"],
            "assistant_parameters": sum(p.numel() for p in job.model.parameters())}


METHOD = UnlearnMethod(
    name="uld", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT,
            "retain_weight": Param(5.0, "weight of L_retain", ge=0),
            "assistant_layers": Param(8, "decoder layers of the assistant (the input model's first k)", ge=1,
                                      annotation=int),
            "alpha": Param(0.8, "weight of the assistant's log-probabilities subtracted from the target's", gt=0),
            "top_logit_filter": Param(0.01, "contrast only tokens with target probability >= this x the top "
                                      "token's, or among the this x V most likely", annotation=UNIT)},
    tasks=("causal-lm",), forget_loss=forget_loss, retain_loss=retain_loss, trains=trains, write=write)
