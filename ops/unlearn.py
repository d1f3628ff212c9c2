"""``unlearn``: make a model forget its ``forget`` data while keeping ``retain`` (Model → Model).

Every gradient method minimises ``forget_weight``·L_forget + ``retain_weight``·L_retain,
as open-unlearning does.  L_retain (``retain_loss``) is ``nll`` on the retain data, or
``kl`` = KL(π_ref ‖ π_θ) per target token on the retain data against the frozen input
model π_ref.  Each step takes the next forget batch (the forget set shuffled every epoch
with ``shuffle_seed``) and draws a retain batch (the retain set shuffled with a seed
derived from the step's ``seed``).  log π(y) is the summed log-probability of an
example's target tokens (its label, for a classifier); |y| their number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    Field,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from weightflow.dsl.lang.diagnostics import did_you_mean
from weightflow.dsl.lang.spec import DataPath, FiniteFloat, Kind, ModelRef, OpSpec
from weightflow.ops import unlearn_methods as um
from weightflow.ops.lib.train_params import (
    AliasedParams,
    TrainParams,
    check_data,
    check_data_path,
)

_TRAILER = """
Training keys, data mapping and LoRA are those of ``finetune`` (``learning_rate``
defaults to 1e-5 here).  The manifest records the forget and retain loss (mean token
NLL, eval mode) before and after, and the training curve.
"""

# The method-specific keys of unlearn v1: they are in the key of every unlearn step (null
# where the method has none), so those keys stay as they were.  A key a method adds later
# enters only the keys of the methods that use it, so adding it changes no existing key.
KEYED_IN_EVERY_STEP = ("forget_weight", "retain_weight", "beta", "gamma", "alpha", "lambda")
_NO_GRADIENT_STEPS = ("retain_loss", "lora", "gradient_checkpointing")


def _method_fields(registry: Mapping[str, um.UnlearnMethod]) -> type[AliasedParams]:
    """The model, the data and the method, with every method-specific key of ``registry``."""
    names = tuple(registry)
    keys = um.keys(registry)
    needing = [n for n, m in registry.items() if m.needs_retain is True]
    fields: dict[str, Any] = {
        "model": (ModelRef, Field(description="step producing the model to unlearn from")),
        "method": (Literal[names], Field(description=" | ".join(names))),
        "forget": (DataPath, Field(description="data to forget")),
        "retain": (DataPath | None, Field(None, description=f"data to keep (needed by {', '.join(needing)})")),
    }
    specific = {um.field_name(k): um.pydantic_field(k, users) for k, users in keys.items()}
    for k in ("forget_weight", "retain_weight"):  # the loss weights, then how L_retain is measured
        if k in specific:
            fields[k] = specific.pop(k)
    fields["retain_loss"] = (Literal["nll", "kl"], Field("nll", description="nll on retain data, or kl to "
                                                         "the input model"))
    fields.update(specific)

    def _data_file(cls, v):
        return check_data_path(v)

    def _known_method(cls, v):
        if isinstance(v, str) and v not in registry:
            raise ValueError(f"unknown method '{v}'{did_you_mean(v, names)}; expected one of: {', '.join(names)}")
        return v

    def _method_params(cls, data):
        """Reject keys another method uses; fill this method's defaults (they enter the key)."""
        return _method_params_of(registry, keys, data)

    def _retain_needed(self):
        _check_retain_given(registry[self.method], self)
        return self

    later = [(k, um.field_name(k)) for k in keys if k not in KEYED_IN_EVERY_STEP]

    def _keyed(self, handler):
        out = handler(self)
        if later and isinstance(out, dict):
            own = registry[self.method].params
            for key, name in later:
                if key not in own:
                    out.pop(key, None)
                    out.pop(name, None)
        return out

    validators = {
        "_data_file": field_validator("forget", "retain")(classmethod(_data_file)),
        "_known_method": field_validator("method", mode="before")(classmethod(_known_method)),
        "_method_params": model_validator(mode="before")(classmethod(_method_params)),
        "_retain_needed": model_validator(mode="after")(_retain_needed),
        "_keyed": model_serializer(mode="wrap")(_keyed),
    }
    return create_model("_Method", __base__=AliasedParams, __validators__=validators,
                        __doc__="The model, the data and the method (listed first; the training keys follow).",
                        **fields)


def _method_params_of(registry: Mapping[str, um.UnlearnMethod], keys: Mapping[str, Any], data):
    """``_Method``'s before-validator: reject keys another method uses; fill this method's
    defaults (they enter the key)."""
    if not isinstance(data, dict) or data.get("method") not in registry:
        return data
    method = data["method"]
    m = registry[method]
    own = m.defaults
    for key, users in keys.items():
        if key in data and data[key] is not None and key not in own:
            hint = f" ({method} has no retain term: use method: grad-diff)" \
                if key == "retain_weight" and m.gradient else ""
            raise ValueError(f"'{key}' does not apply to method {method}; it is used by "
                             f"{', '.join(n for n, _ in users)}{hint}")
    _check_training_keys(m, method, data)
    if m.needs_retain is False and data.get("retain") is not None:
        raise ValueError(f"'retain' does not apply to method {method}")
    data = dict(data)
    for key, value in own.items():
        if data.get(key) is None:
            data[key] = value
    return data


def _check_training_keys(m: um.UnlearnMethod, method: str, data: dict) -> None:
    """Training keys a method without gradient steps (or without a retain term) does not take."""
    if not m.gradient:
        for key in _NO_GRADIENT_STEPS:
            if key in data:
                raise ValueError(f"'{key}' does not apply to method {method} (it takes no gradient steps)")
    elif not m.retain_term and "retain_loss" in data:
        raise ValueError(f"'retain_loss' does not apply to method {method} (no retain term; "
                         "use method: grad-diff)")


def _check_retain_given(m: um.UnlearnMethod, params) -> None:
    """``_Method``'s after-validator: a method that needs retain data has it."""
    if m.needs_retain is True and params.retain is None:
        if not m.retain_term:
            raise ValueError(f"method {params.method} needs 'retain' data ({m.retain_use})")
        if params.retain_weight:
            raise ValueError(f"method {params.method} needs 'retain' data (or retain_weight: 0)")


def params_model(registry: Mapping[str, um.UnlearnMethod]) -> type[TrainParams]:
    """unlearn's params model for a registry of methods (``um.methods()`` for the op)."""
    return create_model("UnlearnParams", __base__=(TrainParams, _method_fields(registry)),
                        __doc__="unlearn's parameters: model, data and method, then the shared training keys.",
                        learning_rate=(FiniteFloat, Field(1e-5, gt=0, description="peak learning rate")))


def op_doc(registry: Mapping[str, um.UnlearnMethod]) -> str:
    """The op's doc: the objective, each method's formula (its module docstring), the rest."""
    items = "\n".join(um.bullet(m) for m in registry.values())
    return f"{__doc__.strip()}\n\n{items}\n\n{_TRAILER.strip()}\n"


METHODS = um.methods()
UnlearnParams = params_model(METHODS)


def preflight(params, env) -> None:
    check_data(params, env, [params.forget, params.retain])


def options(params, method: um.UnlearnMethod) -> dict:
    """The method's own keys -> their values in ``params``."""
    return {k: getattr(params, um.field_name(k)) for k in method.params}


# -- the op ---------------------------------------------------------------------------

def run(inputs, params, ctx) -> dict:  # noqa: C901
    import copy

    import torch

    from weightflow.ops.lib import training as T

    art = inputs["model"]
    task = T.resolve_task(params.task, art.path)
    device = params.device
    method = params.method
    m = METHODS[method]
    opts = options(params, m)
    with T.deterministic(ctx.seed, device):
        model = T.load_model(art.path, task, ctx)
        encoder, data = T.prepare(model, params, task, art.path, ctx,
                                  {"forget": params.forget, "retain": params.retain})
        forget, retain = data["forget"], data.get("retain")
        pad, bs = encoder.pad_id, params.batch_size
        uses_retain = m.gradient and m.retain_term and bool(params.retain_weight) and retain is not None
        ref = None
        if m.needs_reference or (uses_retain and params.retain_loss == "kl"):
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
        if not m.gradient:
            extra = m.apply(um.Job(model, forget, retain, bs, pad, task, device, opts, ctx))
            steps = 0
        else:
            forget_order = T.batch_order(len(forget), bs, params.shuffle_seed if params.shuffle_seed
                                         is not None else ctx.seed)
            retain_order = T.batch_order(len(retain), bs, T.derived_seed(ctx.seed, "retain")) \
                if retain is not None else None

            def micro_loss():
                batch = T.collate([forget[i] for i in next(forget_order)], pad, task, device)
                nll_sum, n_tok, logits = T.sequence_nll(model, batch, task)
                ref_nll = None
                if m.needs_reference:
                    with torch.no_grad():
                        ref_nll = T.sequence_nll(ref, batch, task)[0]
                lf = m.forget_loss(um.ForgetBatch(nll_sum, n_tok, logits, batch.labels, task, ref_nll), opts)
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
        ctx.info[method] = extra
    if curve:
        ctx.info["training_curve"] = curve
    meta.update({"task": task, "unlearned_from": art.digest, "method": method})
    return meta


# params: built per method registry by ``params_model`` (a TrainParams subclass), so Any here
OP = OpSpec[Any](name="unlearn", version=1, output=Kind.MODEL, params=UnlearnParams, run=run,
                 doc=op_doc(METHODS), preflight=preflight,
                 resources={"cpus": "all"})  # its threads use every CPU of a worker
