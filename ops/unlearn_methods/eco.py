"""``eco``, Embedding-COrrupted prompts (Liu et al. 2024, chrisliu298/llm-unlearn-eco): the
input model is left as it is; a prompt ``classifier`` (a sequence-classification Model step
with 2 labels) is trained to flag forget prompts (label 1) against retain prompts (label 0)
-- class-weighted cross-entropy, weights N/N_c as ECO's, on each row's prompt and on its
whole text (prompt and answer: what a scoring forward pass shows it), with the training keys
-- and the output is a ``guarded`` Composite: where P(forget) ≥ ``threshold`` the model runs
on its prompt embeddings plus Gaussian noise of std σ = ``strength`` × the embedding
matrix's std (ECO's ``rand_noise_first_n`` on every dimension; seeded by the step's seed and
the prompt), else on the prompt unchanged.  ``strength: search`` picks σ by a scalar
zeroth-order search as ECO's (forward passes only; a central-difference slope estimate and
an early stop once the objective is met): the objective is f(σ) = 1 − L_f(σ)/L_h, L_f(σ) the
forget answers' token-mean NLL with every forget prompt corrupted at σ, L_h the input
model's NLL on ``holdout`` data it never saw ("it knows the forget answers no better than
unseen ones").  In s = ln σ, from σ = 0.1 (ECO's start): evaluate f at s ± 0.5; once one
of them has f ≤ 0 (the smaller if both), stop; else g = (f(s+0.5) − f(s−0.5))/1 and
s ← s + 0.5 − f(s+0.5)/g (a Newton step to f = 0 where ECO takes s ← s − lr·g with a
hand-tuned lr), by at most + ln 10 (and by + ln 10 where g ≥ 0); at most 10 steps.  Then 4
bisections in s between the last strength with f > 0 and the first with f ≤ 0 (ECO keeps its
first success): the strength is the smallest found with f ≤ 0 (else the last σ, with a warning).
Every evaluation is recorded in the manifest."""

import math
from typing import Annotated, Literal, Union

from pydantic import Field

from weightflow.dsl.lang.spec import DataPath, ModelRef
from weightflow.ops.unlearn_methods import Job, Param, UnlearnMethod, save_component

RULE = "guarded"
FORGET, RETAIN = 1, 0  # the classifier's labels
# the strength search (ECO's eco/optimizer/zoo.py, made scale-free): in ln σ, σ in the embeddings' std
SEARCH_START, SEARCH_EPS, SEARCH_MAX_STEP, SEARCH_STEPS, SEARCH_REFINE = 0.1, 0.5, math.log(10.0), 10, 4
PROBABILITY = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
STRENGTH = Union[Annotated[float, Field(ge=0, allow_inf_nan=False)], Literal["search"]]  # noqa: UP007


def check(opts: dict) -> None:
    """``strength: search`` needs ``holdout`` (its target level); a fixed strength does not."""
    if opts["strength"] == "search" and opts.get("holdout") is None:
        raise ValueError("method eco with strength: search needs 'holdout' data (the input model's NLL on it "
                         "is the level the corrupted forget NLL is raised to), or give strength: a number")
    if opts["strength"] != "search" and opts.get("holdout") is not None:
        raise ValueError("'holdout' applies only to strength: search (method eco)")


def _views(encoder, examples) -> list[str]:
    """The texts the guarded rule's classifier reads of these examples: each one's prompt (its
    leading positions without a label; generation shows the classifier only the prompt) and
    its whole text (a scoring forward pass shows it all), decoded by the model's tokenizer."""
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.training import IGNORE

    tok = encoder.tok
    if tok is None:
        raise OpError("eco: the input model has no tokenizer (its guarded composite decodes prompts for the "
                      "classifier)")
    out: list[str] = []
    for e in examples:
        n = next((i for i, y in enumerate(e.target) if y != IGNORE), len(e.ids))
        texts = [tok.decode(e.ids, skip_special_tokens=True)]
        if 1 < n < len(e.ids):
            texts.insert(0, tok.decode(e.ids[:n], skip_special_tokens=True))
        out.extend(t for t in texts if t.strip())
    return out


def _flag_rate(clf, tok, texts: list[str], threshold: float, max_length: int, batch_size: int, device: str):
    import torch

    flagged = 0
    clf.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i: i + batch_size], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            probs = torch.softmax(clf(**{k: v.to(device) for k, v in enc.items()}).logits.float(), -1)
            flagged += int((probs[:, FORGET] >= threshold).sum())
    return flagged / max(len(texts), 1)


def train_classifier(job: Job):
    """The classifier Model step, trained on forget (1) vs retain (0) views; returns it, its
    tokenizer and what to record."""
    import torch
    import torch.nn.functional as F

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib import models
    from weightflow.ops.lib import training as T

    ctx, p = job.ctx, job.params
    src = job.inputs["classifier"].path
    clf = T.load_model(src, "sequence-classification", ctx)
    if int(clf.config.num_labels) != 2:
        raise OpError(f"eco: the classifier has {clf.config.num_labels} labels; it needs 2 (retain 0, forget 1): "
                      "load it with task: sequence-classification and num_labels: 2")
    tok = models.load_tokenizer(src, required="eco's classifier")
    forget, retain = _views(job.encoder, job.forget), _views(job.encoder, job.retain)
    texts = [(t, FORGET) for t in forget] + [(t, RETAIN) for t in retain]
    examples = [T.Example(tok(t, truncation=True, max_length=p.max_length)["input_ids"], y) for t, y in texts]
    n = len(examples)
    weight = torch.tensor([n / len(retain), n / len(forget)], device=job.device)  # ECO's class weights
    pad = models.pad_id(clf, tok)
    if clf.config.pad_token_id is None:
        clf.config.pad_token_id = pad
    clf.to(job.device)
    order = T.batch_order(n, p.batch_size, p.shuffle_seed if p.shuffle_seed is not None
                          else T.derived_seed(ctx.seed, "eco-classifier"))
    task = "sequence-classification"

    def micro_loss():
        batch = T.collate([examples[i] for i in next(order)], pad, task, job.device)
        logits = T._logits(clf, batch, task)
        loss = F.cross_entropy(logits, batch.labels, weight=weight)
        return loss, {"loss": loss.detach()}

    curve = T.train(clf, p, ctx, T.total_steps(p, n), micro_loss)
    threshold = job.opts["threshold"]
    info = {"classifier_examples": {"forget": len(forget), "retain": len(retain)},
            "classifier_curve": curve,
            "flagged": {"forget": _flag_rate(clf, tok, forget, threshold, p.max_length, p.batch_size, job.device),
                        "retain": _flag_rate(clf, tok, retain, threshold, p.max_length, p.batch_size, job.device)}}
    return clf, info


def corrupted_nll(model, examples, batch_size: int, pad: int, device: str, strength: float, seed: int) -> float:
    """Token-mean NLL of the examples' targets with every example's input corrupted as the
    guarded rule corrupts a flagged one (its whole input is the prompt of a scoring pass)."""
    import torch
    import torch.nn.functional as F

    from weightflow.ops.lib import training as T
    from weightflow.ops.lib.composite import prompt_noise

    emb = model.get_input_embeddings()
    scale = strength * float(emb.weight.detach().float().std())
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = T.collate(examples[i: i + batch_size], pad, "causal-lm", device)
            noise = prompt_noise(b.input_ids, b.attention_mask, b.input_ids.shape[1], seed, emb.weight.shape[1])
            embeds = emb(b.input_ids) + scale * noise.to(emb.weight.dtype)
            logits = model(inputs_embeds=embeds, attention_mask=b.attention_mask, use_cache=False).logits.float()
            lg, lb = logits[:, :-1], b.labels[:, 1:]
            nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=T.IGNORE,
                                  reduction="sum")
            total += float(nll)
            tokens += int((lb != T.IGNORE).sum())
    return total / max(tokens, 1)


def search_strength(job: Job) -> dict:
    """ECO's scalar zeroth-order search of the noise strength (see the module docstring)."""
    from weightflow.ops.lib import training as T

    p, seed = job.params, job.ctx.seed
    path = job.ctx.data_path(job.opts["holdout"])
    holdout = job.encoder.encode(path, T.read_data(p, path, job.task))
    level = T.evaluate(job.model, holdout, job.batch_size, job.pad_id, job.task, job.device)["loss"]

    evaluated: list[dict] = []

    def f(s: float) -> float:
        nll = corrupted_nll(job.model, job.forget, job.batch_size, job.pad_id, job.device, math.exp(s), seed)
        evaluated.append({"strength": math.exp(s), "forget_nll": nll, "f": 1.0 - nll / level})
        return 1.0 - nll / level

    s, trace, below, met = math.log(SEARCH_START), [], None, None
    with job.ctx.progress(SEARCH_STEPS + SEARCH_REFINE, "eco strength search", unit="step") as bar:
        for step in range(SEARCH_STEPS):
            ahead, behind = f(s + SEARCH_EPS), f(s - SEARCH_EPS)
            grad = (ahead - behind) / (2 * SEARCH_EPS)
            trace.append({"step": step, "strength": math.exp(s), "f_ahead": ahead, "f_behind": behind, "slope": grad})
            bar.update(1)
            if behind > 0:
                below = s - SEARCH_EPS
            if ahead <= 0.0:
                met = s - SEARCH_EPS if behind <= 0.0 else s + SEARCH_EPS
                break
            below = s + SEARCH_EPS
            step_to = -ahead / grad if grad < 0 else SEARCH_MAX_STEP
            s = s + SEARCH_EPS + min(step_to, SEARCH_MAX_STEP)
        if met is not None and below is not None:  # bisect (in ln σ) between the last miss and the first hit
            for _ in range(SEARCH_REFINE):
                mid = (below + met) / 2
                if f(mid) <= 0.0:
                    met = mid
                else:
                    below = mid
                bar.update(1)
    out = {"holdout_nll": level, "trace": trace, "evaluated": evaluated}
    if met is not None:
        return {"strength": math.exp(met), "reached": True, **out}
    job.ctx.warn(f"eco: the strength search did not raise the forget NLL to the holdout level ({level:.4g}) in "
                 f"{SEARCH_STEPS} steps; using strength {math.exp(s):.4g}")
    return {"strength": math.exp(s), "reached": False, **out}


def apply(job: Job) -> dict:
    """Train the classifier, choose the strength; ``write`` stores them (the model is unchanged)."""
    clf, info = train_classifier(job)
    if job.opts["strength"] == "search":
        info["search"] = search_strength(job)
        strength = info["search"]["strength"]
    else:
        strength = float(job.opts["strength"])
    info["strength"] = strength
    job.state.update(classifier=clf, strength=strength)
    return info


def write(job: Job) -> dict:
    """The guarded composite: the input model's stored files as ``target``, the trained
    classifier (with its tokenizer) as ``classifier``."""
    from pathlib import Path

    from weightflow.ops.lib import composite

    out = job.ctx.out
    comps = {"target": composite.add_component(out, "target", Path(job.art.path)),
             "classifier": save_component(job, "classifier", job.state["classifier"],
                                          Path(job.inputs["classifier"].path))}
    composite.write_spec(out, RULE, {"threshold": job.opts["threshold"], "strength": job.state["strength"],
                                     "seed": job.ctx.seed, "forget_label": FORGET}, comps, "target")
    return {}


METHOD = UnlearnMethod(
    name="eco", doc=__doc__,
    params={"classifier": Param(None, "the prompt classifier to train (a Model step: sequence classification, "
                                "2 labels)", annotation=ModelRef, required=True),
            "threshold": Param(0.99, "flag a prompt when the classifier's P(forget) >= this",
                               annotation=PROBABILITY),
            "strength": Param("search", "noise std in units of the embeddings' std, or search (ECO's "
                              "zeroth-order search)", annotation=STRENGTH),
            "holdout": Param(None, "data the input model never saw: its NLL is the level strength: search "
                             "raises the forget NLL to", annotation=DataPath)},
    needs_retain=True, retain_use="the classifier's negative examples", tasks=("causal-lm",),
    apply=apply, write=write, check=check)
