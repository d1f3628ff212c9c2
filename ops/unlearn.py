"""``unlearn``: make a model forget its ``forget`` data while keeping ``retain`` (Model → Model).

Every gradient method minimises ``forget_weight``·L_forget + ``retain_weight``·L_retain,
as open-unlearning does.  L_retain (``retain_loss``) is ``nll`` on the retain data, or
``kl`` = KL(π_ref ‖ π_θ) per target token on the retain data against the frozen input
model π_ref.  Each step takes the next forget batch (the forget set shuffled every epoch
with ``shuffle_seed``) and draws a retain batch (the retain set shuffled with a seed
derived from the step's ``seed``).  log π(y) is the summed log-probability of an
example's target tokens (its label, for a classifier); |y| their number.

- ``grad-ascent``: L_forget = −NLL(forget) (token mean); no retain term.
- ``grad-diff``: −NLL(forget) + the retain term (weights 1 and 1).
- ``npo`` (Zhang et al. 2024): L_forget = −(2/β)·mean log σ(−β·(log π_θ(y) − log π_ref(y))),
  π_ref the frozen input model; ``beta`` 0.1.
- ``simnpo`` (Fan et al. 2024): reference-free and length-normalised,
  L_forget = −(2/β)·mean log σ(−(β/|y|)·log π_θ(y) − γ); ``beta`` 4.5, ``gamma`` 0
  (open-unlearning's defaults; its TOFU recipe also sets forget_weight 0.125).
- ``ssd``, Selective Synaptic Dampening (Foster et al. 2024): no gradient steps.
  Diagonal Fisher importances I = mean over batches of the squared gradient of the
  batch's loss (eval mode; ``batch_size: 1`` gives the per-example empirical Fisher),
  I_f on the forget data and I_D on the retain data; every parameter with
  I_f > ``alpha``·I_D is multiplied by min(``lambda``·I_D/I_f, 1); ``alpha`` 10,
  ``lambda`` 1.

Training keys, data mapping and LoRA are those of ``finetune`` (``learning_rate``
defaults to 1e-5 here).  The manifest records the forget and retain loss (mean token
NLL, eval mode) before and after, and the training curve.  ``retain`` is optional for
``grad-ascent``; when given it is only measured.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.oplib import DataPath, FiniteFloat, Kind, ModelRef, OpSpec
from weightflow.ops._train_params import AliasedParams, TrainParams, check_data, check_data_path

METHODS = ("grad-ascent", "grad-diff", "npo", "simnpo", "ssd")
# method-specific parameters, with their defaults; filled in before hashing
METHOD_DEFAULTS = {
    "grad-ascent": {"forget_weight": 1.0},
    "grad-diff": {"forget_weight": 1.0, "retain_weight": 1.0},
    "npo": {"forget_weight": 1.0, "retain_weight": 1.0, "beta": 0.1},
    "simnpo": {"forget_weight": 1.0, "retain_weight": 1.0, "beta": 4.5, "gamma": 0.0},
    "ssd": {"alpha": 10.0, "lambda": 1.0},
}
_ALL_SPECIFIC = ("forget_weight", "retain_weight", "beta", "gamma", "alpha", "lambda")


class _Method(AliasedParams):
    """The model, the data and the method (listed first; the training keys follow)."""

    model: ModelRef = Field(description="step producing the model to unlearn from")
    method: Literal["grad-ascent", "grad-diff", "npo", "simnpo", "ssd"] = Field(
        description="grad-ascent | grad-diff | npo | simnpo | ssd")
    forget: DataPath = Field(description="data to forget")
    retain: DataPath | None = Field(None, description="data to keep (needed by grad-diff, npo, simnpo, ssd)")
    forget_weight: FiniteFloat | None = Field(None, ge=0, description="weight of L_forget (default 1)")
    retain_weight: FiniteFloat | None = Field(None, ge=0, description="weight of L_retain (default 1; "
                                              "grad-ascent has none)")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="nll on retain data, or kl to the input model")
    beta: FiniteFloat | None = Field(None, gt=0, description="npo/simnpo inverse temperature "
                                     "(default 0.1 for npo, 4.5 for simnpo)")
    gamma: FiniteFloat | None = Field(None, description="simnpo reward margin γ (default 0)")
    alpha: FiniteFloat | None = Field(None, gt=0, description="ssd selection: dampen where I_f > alpha·I_D "
                                      "(default 10)")
    lambda_: FiniteFloat | None = Field(None, gt=0, alias="lambda", description="ssd dampening: factor "
                                        "min(lambda·I_D/I_f, 1) (default 1)")

    @field_validator("forget", "retain")
    @classmethod
    def _data_file(cls, v):
        return check_data_path(v)

    @model_validator(mode="before")
    @classmethod
    def _method_params(cls, data):
        """Reject parameters another method uses; fill this method's defaults (they enter the key)."""
        if not isinstance(data, dict) or data.get("method") not in METHODS:
            return data
        method = data["method"]
        own = METHOD_DEFAULTS[method]
        for key in _ALL_SPECIFIC:
            if key in data and data[key] is not None and key not in own:
                users = [m for m, d in METHOD_DEFAULTS.items() if key in d]
                hint = " (grad-ascent has no retain term: use method: grad-diff)" \
                    if key == "retain_weight" and method == "grad-ascent" else ""
                raise ValueError(f"'{key}' does not apply to method {method}; it is used by "
                                 f"{', '.join(users)}{hint}")
        if method == "ssd":
            for key in ("retain_loss", "lora", "gradient_checkpointing"):
                if key in data:
                    raise ValueError(f"'{key}' does not apply to method ssd (it takes no gradient steps)")
        if method == "grad-ascent" and "retain_loss" in data:
            raise ValueError("'retain_loss' does not apply to method grad-ascent (no retain term; "
                             "use method: grad-diff)")
        data = dict(data)
        for key, value in own.items():
            if data.get(key) is None:
                data[key] = value
        return data

    @model_validator(mode="after")
    def _retain_needed(self):
        if self.method == "ssd" and self.retain is None:
            raise ValueError("method ssd needs 'retain' data (its importances I_D)")
        if self.method not in ("grad-ascent", "ssd") and self.retain is None and self.retain_weight:
            raise ValueError(f"method {self.method} needs 'retain' data (or retain_weight: 0)")
        return self


class UnlearnParams(TrainParams, _Method):
    """unlearn's parameters: model, data and method, then the shared training keys."""

    learning_rate: FiniteFloat = Field(1e-5, gt=0, description="peak learning rate")


def preflight(params: UnlearnParams, env) -> None:
    check_data(params, env, [params.forget, params.retain])


# -- forget losses ---------------------------------------------------------------------

def forget_loss(method: str, nll_sum, n_tok, ref_nll_sum, beta: float | None, gamma: float | None):
    """L_forget of one batch from per-example summed NLLs (−log π(y)) and target counts."""
    import torch.nn.functional as F

    from weightflow.ops._train import mean_nll

    if method in ("grad-ascent", "grad-diff"):
        return -mean_nll(nll_sum, n_tok)
    if method == "npo":  # −β·(log π_θ − log π_ref) = β·(nll_θ − nll_ref)
        return -(2.0 / beta) * F.logsigmoid(beta * (nll_sum - ref_nll_sum)).mean()
    if method == "simnpo":  # −(β/|y|)·log π_θ(y) − γ = β·nll/|y| − γ
        return -(2.0 / beta) * F.logsigmoid(beta * nll_sum / n_tok.clamp(min=1) - gamma).mean()
    raise ValueError(method)


# -- SSD ----------------------------------------------------------------------------

def importances(model, examples, batch_size: int, pad_id: int, task: str, device: str, bar) -> dict:
    """Mean over batches of the squared gradient of each batch's mean loss, per parameter."""
    import torch

    from weightflow.ops import _train as T

    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    imp = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = 0
    for i in range(0, len(examples), batch_size):
        model.zero_grad(set_to_none=True)
        batch = T.collate(examples[i: i + batch_size], pad_id, task, device)
        nll_sum, n_tok, _ = T.sequence_nll(model, batch, task)
        T.mean_nll(nll_sum, n_tok).backward()
        for n, p in params.items():
            if p.grad is not None:
                imp[n] += p.grad.pow(2)
        batches += 1
        bar.update(1)
    model.zero_grad(set_to_none=True)
    return {n: v / batches for n, v in imp.items()}


def dampen(model, imp_f: dict, imp_d: dict, alpha: float, lam: float) -> dict:
    """θ ← θ·min(λ·I_D/I_f, 1) where I_f > α·I_D; returns how many elements were selected."""
    import torch

    counts = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in imp_f:
                continue
            i_f, i_d = imp_f[n], imp_d[n]
            selected = i_f > alpha * i_d
            factor = torch.where(selected, (lam * i_d / torch.where(selected, i_f, 1.0)).clamp(max=1.0), 1.0)
            p.mul_(factor)
            if int(selected.sum()):
                counts[n] = int(selected.sum())
    return counts


# -- the op ---------------------------------------------------------------------------

def run(inputs, params: UnlearnParams, ctx) -> dict:
    import copy

    import torch

    from weightflow.ops import _train as T

    art = inputs["model"]
    task = T.resolve_task(params.task, art.path)
    device = params.device
    method = params.method
    with T.deterministic(ctx.seed, device):
        model = T.load_model(art.path, task, ctx)
        encoder, data = T.prepare(model, params, task, art.path, ctx,
                                  {"forget": params.forget, "retain": params.retain})
        forget, retain = data["forget"], data.get("retain")
        pad, bs = encoder.pad_id, params.batch_size
        uses_retain = method != "grad-ascent" and bool(params.retain_weight) and retain is not None
        ref = None
        if method == "npo" or (uses_retain and params.retain_loss == "kl"):
            ref = copy.deepcopy(model).eval().requires_grad_(False).to(device)
        if params.lora is not None:
            model = T.attach_lora(model, params.lora, task)
        if params.gradient_checkpointing:
            T.enable_checkpointing(model, params.lora is not None)
        model.to(device)

        def measure() -> dict:
            out = {"forget": T.evaluate(model, forget, bs, pad, task, device)["loss"]}
            if retain is not None:
                out["retain"] = T.evaluate(model, retain, bs, pad, task, device)["loss"]
            return out

        before = measure()
        curve: list[dict] = []
        extra: dict = {}
        if method == "ssd":
            n_batches = -(-len(forget) // bs) + -(-len(retain) // bs)
            with ctx.progress(n_batches, "importances", unit="batch") as bar:
                imp_f = importances(model, forget, bs, pad, task, device, bar)
                imp_d = importances(model, retain, bs, pad, task, device, bar)
            counts = dampen(model, imp_f, imp_d, params.alpha, params.lambda_)
            total = sum(p.numel() for p in model.parameters())
            extra = {"dampened": sum(counts.values()), "parameters": total, "per_tensor": counts}
            steps = 0
        else:
            forget_order = T.batch_order(len(forget), bs, params.shuffle_seed if params.shuffle_seed
                                         is not None else ctx.seed)
            retain_order = T.batch_order(len(retain), bs, T.derived_seed(ctx.seed, "retain")) \
                if retain is not None else None

            def micro_loss():
                batch = T.collate([forget[i] for i in next(forget_order)], pad, task, device)
                nll_sum, n_tok, _ = T.sequence_nll(model, batch, task)
                ref_nll = None
                if method == "npo":
                    with torch.no_grad():
                        ref_nll = T.sequence_nll(ref, batch, task)[0]
                lf = forget_loss(method, nll_sum, n_tok, ref_nll, params.beta, params.gamma)
                loss = params.forget_weight * lf
                logs = {"forget_loss": lf.detach(), "forget_nll": T.mean_nll(nll_sum, n_tok).detach()}
                if uses_retain:
                    rb = T.collate([retain[i] for i in next(retain_order)], pad, task, device)
                    if params.retain_loss == "kl":
                        lr_ = T.kl_to_reference(model, ref, rb, task)
                    else:
                        lr_ = T.mean_nll(*T.sequence_nll(model, rb, task)[:2])
                    loss = loss + params.retain_weight * lr_
                    logs["retain_loss"] = lr_.detach()
                return loss, {"loss": loss.detach(), **logs}

            steps = T.total_steps(params, len(forget))
            curve = T.train(model, params, ctx, steps, micro_loss)
        after = measure()
        if params.lora is not None:
            if params.lora.keep_adapter:
                T.save_adapter(model, ctx.out, ctx.out.parent)
            model = model.merge_and_unload()
        if params.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.to("cpu")
        meta = T.save_model(model, art.path, ctx, params.dtype or ctx.dtype)
    losses = {k: {"before": before[k], "after": after[k]} for k in before}
    ctx.info.update({"summary": {"method": method, "task": task, "steps": steps, "forget_examples": len(forget),
                                 "retain_examples": len(retain) if retain is not None else 0},
                     "losses": losses})
    if extra:
        ctx.info["ssd"] = extra
    if curve:
        ctx.info["training_curve"] = curve
    meta.update({"task": task, "unlearned_from": art.digest, "method": method})
    return meta


OP = OpSpec(name="unlearn", version=1, output=Kind.MODEL, params=UnlearnParams, run=run, doc=__doc__,
            preflight=preflight)
