"""``adamerging``: AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for
Multi-Task Learning", arXiv 2310.02575), layer-wise or task-wise.

Task arithmetic with learned coefficients: θ_l = θ₀,l + Σₖ λₖ,l·τₖ,l, one λ per task k and
per tensor l (``granularity: layer``, the paper's layer-wise AdaMerging: one coefficient for
every parameter tensor) or one per task (``task``).  The λ start at ``init`` (0.3, as the
paper) and are learned by Adam (``lr``, ``steps``) to minimise the Shannon entropy of the
merged model's predictions on unlabelled data -- the paper's surrogate for the test loss --
summed over the ``data`` sets (one per task: the paper adapts on each task's unlabelled
test inputs, each through its own head; ``labels`` restricts a shared classifier head to
that task's classes the same way).  λ are clipped to [0, 1] in the forward pass, as in the
paper's code.  A causal LM's entropy is that of its next-token distributions at every real
position.  Batches are drawn from the seed and dropout is off, so the same inputs and seed
give the same coefficients.  The learned coefficients, and the entropy on all the data
before and after, are in the manifest (``weightflow show STEP --json``: info).

Inputs: ``base`` and ``deltas`` (extract-delta steps), or ``base`` and ``models`` (the task
vectors are taken here).  Memory: the base model plus every task vector, in float32.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.lang.spec import DataPath, DeltaRef, FiniteFloat, ModelRef, OpParams, SeedParam
from weightflow.ops.lib.merging import MergeCommon, open_models, stream_merge
from weightflow.ops.merge_methods import MergeMethod


class EntropyData(OpParams):
    """One unlabelled data set whose prediction entropy the coefficients minimise."""

    data: DataPath = Field(description="examples (.jsonl/.json/.csv/.parquet/.txt, text or input_ids)")
    labels: list[str | int] | None = Field(None, min_length=2, description="classifiers: the predicted "
                                           "distribution is over these labels only (one task of a shared head)")
    text_field: str = Field("text", description="field holding the text")
    samples: int | None = Field(64, ge=1, description="use the first N examples (null: all)")


class AdaMergingParams(MergeCommon, SeedParam):
    """θ = θ₀ + Σₖ λₖ,ₗ·τₖ,ₗ with λ per task and tensor (or per task) learned by minimising the
    prediction entropy on unlabelled `data` (AdaMerging)."""

    method: Literal["adamerging"]
    base: ModelRef = Field(description="step producing the pre-trained model")
    deltas: list[DeltaRef] | None = Field(None, min_length=1, description="task vectors (extract-delta "
                                          "steps); or give 'models'")
    models: list[ModelRef] | None = Field(None, min_length=1, description="fine-tuned models (their task "
                                          "vectors against 'base' are taken here); or give 'deltas'")
    data: list[EntropyData] = Field(min_length=1, description="unlabelled data: a file, or a list of "
                                    "{data, labels, text_field, samples}, one per task")
    granularity: Literal["layer", "task"] = Field("layer", description="one coefficient per task and "
                                                  "tensor (layer-wise) or per task (task-wise)")
    init: FiniteFloat = Field(0.3, ge=0, le=1, description="initial coefficient (the paper's 0.3)")
    steps: int = Field(500, ge=1, description="Adam steps (the paper: 500)")
    lr: FiniteFloat = Field(1e-3, gt=0, description="Adam learning rate (the paper: 1e-3)")
    batch_size: int = Field(16, ge=1, description="examples per data set per step (the paper: 16)")
    max_length: int = Field(128, ge=2, description="truncate each example to this many tokens")
    seed: int | None = Field(None, ge=0, description="seed for the batch order (default: the pipeline's)")

    @field_validator("data", mode="before")
    @classmethod
    def _file_or_list(cls, v):
        if isinstance(v, (str, dict)):
            v = [v]
        if isinstance(v, list):
            v = [{"data": x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if (self.deltas is None) == (self.models is None):
            raise ValueError("give the task vectors as 'deltas' (extract-delta steps) or as 'models' "
                             "(fine-tunes of 'base'), exactly one of them")
        return self


def _batch_order(n: int, size: int, gen):
    """Index batches of ``size`` over a fresh permutation each pass (the last one of a pass may be short)."""
    import torch

    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for lo in range(0, n, size):
            yield perm[lo:lo + size]


def run(inputs, p: AdaMergingParams, ctx) -> dict:  # noqa: C901
    import torch
    from torch.func import functional_call

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib import models as M
    from weightflow.ops.lib.merging import DeltaInput, _warn_other_bases
    from weightflow.ops.lib.stats import batches, prediction_entropy, read_examples
    from weightflow.ops.lib.training import deterministic

    base_art = inputs["base"]
    if p.models is not None:
        base, *fts = open_models([base_art, *inputs["models"]])
        sources = inputs["models"]

        def has(k, name):
            return True

        def tau(k, name, lo=None, hi=None):
            return fts[k].get(name, lo, hi).to(torch.float32) - base.get(name, lo, hi).to(torch.float32)
    else:
        (base,) = open_models([base_art])
        deltas = [DeltaInput(a, base, "error") for a in inputs["deltas"]]
        _warn_other_bases(deltas, base_art, ctx)
        sources = inputs["deltas"]

        def has(k, name):
            return name in deltas[k].ckpt

        def tau(k, name, lo=None, hi=None):
            shape = base.info[name].shape
            return deltas[k].chunk(name, 0 if lo is None else lo, shape[0] if hi is None else hi, shape) \
                if shape else deltas[k].ckpt.get(name).to(torch.float32)
    n_tasks = len(sources)
    names = [n for n in base.names() if base.is_float(n) and any(has(k, n) for k in range(n_tasks))]
    if not names:
        raise OpError("the task vectors touch no floating-point tensor of the base")

    with deterministic(ctx.seed, "cpu"):
        model = M.load_model(base_art.path, "cpu")
        for q in model.parameters():
            q.requires_grad_(False)
        state = model.state_dict()
        learn = [n for n in names if n in state and tuple(state[n].shape) == tuple(base.info[n].shape)]
        if not learn:
            raise OpError("none of the merged tensors is a parameter of the model under its stored name")
        theta0 = {n: base.get(n).to(torch.float32) for n in learn}
        taus = [{n: tau(k, n) for n in learn if has(k, n)} for k in range(n_tasks)]
        tok = M.load_tokenizer(base_art.path)
        pad = M.pad_id(model, tok)
        classifier = M.is_classifier(model)
        label2id = {str(k): v for k, v in (getattr(model.config, "label2id", None) or {}).items()}
        sets = []
        for d in p.data:
            examples = read_examples(ctx.data_path(d.data), model, tok, text_field=d.text_field,
                                     label_field="label", samples=d.samples, max_length=p.max_length,
                                     with_labels=False)
            allowed = None
            if d.labels is not None:
                if not classifier:
                    raise OpError(f"data {d.data}: 'labels' restricts a classifier's head, but the base is a "
                                  f"{type(model).__name__}")
                allowed = []
                for v in d.labels:
                    if isinstance(v, str) and v not in label2id:
                        raise OpError(f"data {d.data}: label {v!r} is not one of the model's labels "
                                      f"({', '.join(map(repr, sorted(label2id)))})")
                    i = int(label2id[v]) if isinstance(v, str) else v
                    if not 0 <= i < model.config.num_labels:
                        raise OpError(f"data {d.data}: label {v!r} is outside the model's "
                                      f"{model.config.num_labels} labels")
                    allowed.append(i)
            sets.append((examples, allowed))

        cols = len(learn) if p.granularity == "layer" else 1
        lam = torch.full((n_tasks, cols), float(p.init), dtype=torch.float32, requires_grad=True)

        def merged(coef):
            c = coef.clamp(0.0, 1.0)
            out = {}
            for j, n in enumerate(learn):
                t = theta0[n]
                for k in range(n_tasks):
                    if n in taus[k]:
                        t = t + c[k, j if cols > 1 else 0] * taus[k][n]
                out[n] = t
            return out

        def entropy(params, examples, allowed):
            ids, attn = batches(examples, len(examples), pad)[0]
            logits = functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": attn},
                                     strict=False).logits
            if classifier:
                return prediction_entropy(logits[:, allowed] if allowed is not None else logits)
            return prediction_entropy(logits, attn.bool())

        def full_entropy(coef) -> list[float]:
            with torch.no_grad():
                params = merged(coef)
                out = []
                for examples, allowed in sets:
                    total = 0.0
                    for lo in range(0, len(examples), p.batch_size):
                        chunk = examples[lo:lo + p.batch_size]
                        total += float(entropy(params, chunk, allowed)) * len(chunk)
                    out.append(round(total / len(examples), 6))
                return out

        before = full_entropy(lam)
        gen = torch.Generator().manual_seed(ctx.seed)
        orders = [_batch_order(len(ex), p.batch_size, gen) for ex, _ in sets]
        opt = torch.optim.Adam([lam], lr=p.lr)
        curve = []
        every = max(1, p.steps // 20)
        with ctx.progress(p.steps, "adamerging", unit="step") as bar:
            for step in range(1, p.steps + 1):
                params = merged(lam)
                loss = sum(entropy(params, [ex[i] for i in next(order)], allowed)
                           for (ex, allowed), order in zip(sets, orders, strict=True))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step == 1 or step % every == 0 or step == p.steps:
                    curve.append({"step": step, "entropy_loss": round(float(loss.detach()), 6)})
                bar.update(1)
        final = lam.detach().clamp(0.0, 1.0)
        after = full_entropy(final)

    column = {n: j for j, n in enumerate(learn)}

    def coefficient(k: int, name: str) -> float:
        if name not in column:
            return float(p.init)  # not a parameter of the model under this name: kept at init
        return float(final[k, column[name] if cols > 1 else 0])

    def compute(name, lo, hi):
        out = base.get(name, lo, hi).to(torch.float32)
        if name in names:
            for k in range(n_tasks):
                if has(k, name):
                    out = out + coefficient(k, name) * tau(k, name, lo, hi)
        return out

    written = stream_merge(ctx, base, base_art.path, compute, p.dtype or ctx.dtype)
    if p.granularity == "layer":
        ctx.info["coefficients"] = {n: [round(float(final[k, j]), 6) for k in range(n_tasks)]
                                    for j, n in enumerate(learn)}
    else:
        ctx.info["coefficients"] = {"*": [round(float(final[k, 0]), 6) for k in range(n_tasks)]}
    ctx.info["summary"] = {"mean_coefficient": {s.step: round(float(final[k].mean()), 6)
                                                for k, s in enumerate(sources)},
                           "entropy_before": before, "entropy_after": after}
    ctx.info["tasks"] = [s.step for s in sources]
    ctx.info["entropy_before"] = before
    ctx.info["entropy_after"] = after
    ctx.info["training_curve"] = curve
    return {"tensors": written}


METHOD = MergeMethod("adamerging", AdaMergingParams, run=run, order=22)
