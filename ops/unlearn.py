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

from weightflow.dsl.lang.diagnostics import OpError, did_you_mean
from weightflow.dsl.lang.spec import DataPath, FiniteFloat, Kind, ModelRef, OpSpec
from weightflow.ops import unlearn_methods as um
from weightflow.ops.lib.data import read_records, require_fields
from weightflow.ops.lib.train_params import (
    AliasedParams,
    TrainParams,
    check_data,
    check_data_path,
)

_TRAILER = """
Training keys, data mapping and LoRA are those of ``finetune`` (``learning_rate``
defaults to 1e-5 here).  The manifest records the forget and retain loss (mean token
NLL, eval mode; also of the alternate answers, for a method with them) before and after,
on at most 64 evenly spaced rows of each set (``losses_measured_on`` says when fewer than
all), and the training curve.  A method marked Composite (uld, eco) outputs a Composite
(ops/lib/composite.py) instead of weights: its "after" losses are the stored composite's.
"""

# The method-specific keys of unlearn v1: they are in the key of every unlearn step (null
# where the method has none), so those keys stay as they were.  A key a method adds later
# enters only the keys of the methods that use it, so adding it changes no existing key.
# The before/after losses in the manifest are a progress report, not a benchmark (`evaluate`
# is): each set is measured on at most this many of its rows, evenly spaced.  On TOFU's 225
# retain rows the full measurement took more time than the unlearning itself.
MEASURE_ROWS = 64
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
    for key, param in m.params.items():
        if param.required and data.get(key) is None:
            raise ValueError(f"method {method} needs '{key}' ({param.description})")
    if m.check is not None:
        m.check({k: data.get(k) for k in m.params})
    return data


def _check_training_keys(m: um.UnlearnMethod, method: str, data: dict) -> None:
    """Training keys a method without gradient steps (or without a retain term) does not take."""
    if not m.gradient:
        for key in _NO_GRADIENT_STEPS:
            if key in data:
                raise ValueError(f"'{key}' does not apply to method {method} (it takes no gradient steps "
                                 "on the model)")
    elif not m.retain_term and "retain_loss" in data:
        raise ValueError(f"'retain_loss' does not apply to method {method} (no retain term; "
                         "use method: grad-diff)")
    elif m.retain_loss is not None and "retain_loss" in data:
        raise ValueError(f"'retain_loss' does not apply to method {method} (it has its own retain term)")
    for key in m.refuses:
        if data.get(key) is not None:
            raise ValueError(f"'{key}' does not apply to method {method}")
    if data.get("task") not in (None, "auto", *m.tasks):
        raise ValueError(f"method {method} is defined for task: {' | '.join(m.tasks)}, not {data['task']}")


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
    m = METHODS[params.method]
    own_data = [getattr(params, um.field_name(k)) for k, p in m.params.items() if p.annotation is DataPath]
    check_data(params, env, [params.forget, params.retain, *own_data])
    if m.alternate is not None or m.forget_fields is not None:
        path = env.data_path(params.forget)
        rows = read_records(path, params.limit)
        if m.forget_fields is not None:
            require_fields(path, rows, m.forget_fields(options(params, m)))
        if m.alternate is not None:
            _check_has_prompt(m, params, path, rows)


def _check_has_prompt(m: um.UnlearnMethod, params, path, rows: list[dict]) -> None:
    """An alternate answer replaces the forget answer after the prompt: plain text has none."""
    if params.prompt_field is None and not any("input_ids" in r for r in rows):
        raise OpError(f"{path}: method {m.name} needs question/answer data (set prompt_field and "
                      "response_field) or pre-tokenized rows (input_ids, with -100 labels on the prompt): "
                      "its alternate answer replaces the forget answer after the prompt")


def options(params, method: um.UnlearnMethod) -> dict:
    """The method's own keys -> their values in ``params``."""
    return {k: getattr(params, um.field_name(k)) for k in method.params}


# -- the op ---------------------------------------------------------------------------

def run(inputs, params, ctx) -> dict:  # noqa: C901
    import contextlib
    import copy

    import torch

    from weightflow.ops.lib import training as T

    art = inputs["model"]
    task = T.resolve_task(params.task, art.path)
    device = params.device
    method = params.method
    m = METHODS[method]
    opts = options(params, m)
    if task not in m.tasks:
        raise OpError(f"method {method} is defined for task: {' | '.join(m.tasks)}; the model is a {task} model")
    with T.deterministic(ctx.seed, device):
        model = T.load_model(art.path, task, ctx)
        encoder, data = T.prepare(model, params, task, art.path, ctx,
                                  {"forget": params.forget, "retain": params.retain})
        forget, retain = data["forget"], data.get("retain")
        alternates = None
        if m.alternate is not None:
            forget, alternates = _with_alternates(m, encoder, params, task, ctx, opts)
        pad, bs = encoder.pad_id, params.batch_size
        target = model  # the input model; a method that ``trains`` another keeps it as it is
        if m.trains is not None:
            model = m.trains(target, opts)
            target.requires_grad_(False).eval().to(device)
        uses_retain = m.gradient and m.retain_term and bool(params.retain_weight) and retain is not None
        layer = ref_layer = None
        if m.needs_hidden:
            layer = um.decoder_layer(model, opts["layer"])[1]
        ref = None
        if m.needs_reference or m.needs_hidden or (uses_retain and params.retain_loss == "kl"):
            ref = copy.deepcopy(model).eval().requires_grad_(False).to(device)
            if m.needs_hidden:
                ref_layer = um.decoder_layer(ref, opts["layer"])[1]
        if m.trainable is not None:
            chosen = m.trainable(model, opts)
            for n, p in model.named_parameters():
                p.requires_grad_(n in chosen)
            ctx.info[method] = {"updated_tensors": len(chosen),
                                "updated_parameters": sum(p.numel() for n, p in model.named_parameters()
                                                          if n in chosen)}
        if params.lora is not None:
            model = T.attach_lora(model, params.lora, task)
        if params.gradient_checkpointing:
            T.enable_checkpointing(model, params.lora is not None)
        model.to(device)

        sets = {k: v for k, v in (("forget", forget), ("retain", retain), ("alternate", alternates))
                if v is not None}
        measured = {k: _measured_rows(v) for k, v in sets.items()}
        if any(len(measured[k]) < len(v) for k, v in sets.items()):
            ctx.info["losses_measured_on"] = {k: {"rows": len(measured[k]), "of": len(v)} for k, v in sets.items()}

        def measure(net) -> dict:
            return {k: T.evaluate(net, rows, bs, pad, task, device)["loss"] for k, rows in measured.items()}

        before = measure(target)
        trained_before = measure(model) if model is not target else None
        curve: list[dict] = []
        extra: dict = {}
        job = um.Job(model, forget, retain, bs, pad, task, device, opts, ctx, target=target, art=art,
                     inputs=inputs, params=params, encoder=encoder)
        if not m.gradient:
            extra = m.apply(job)
            steps = 0
        else:
            forget_order = T.batch_order(len(forget), bs, params.shuffle_seed if params.shuffle_seed
                                         is not None else ctx.seed)
            retain_order = T.batch_order(len(retain), bs, T.derived_seed(ctx.seed, "retain")) \
                if retain is not None else None

            def tapped(module):  # records the module's output, where the method needs it
                return um.Capture(module) if module is not None else contextlib.nullcontext()

            def micro_loss():
                rows = next(forget_order)
                batch = T.collate([forget[i] for i in rows], pad, task, device)
                with tapped(layer) as tap:
                    nll_sum, n_tok, logits = T.sequence_nll(model, batch, task)
                fb = um.ForgetBatch(nll_sum, n_tok, logits, batch.labels, task, seed=ctx.seed,
                                    hidden=tap.output if tap is not None else None)
                if m.needs_reference:
                    with torch.no_grad():
                        fb.ref_nll_sum, _, fb.ref_logits = T.sequence_nll(ref, batch, task)
                if alternates is not None:
                    ab = T.collate([alternates[i] for i in rows], pad, task, device)
                    fb.alt_nll_sum, fb.alt_n_tok, _ = T.sequence_nll(model, ab, task)
                    if m.needs_reference:
                        with torch.no_grad():
                            fb.alt_ref_nll_sum = T.sequence_nll(ref, ab, task)[0]
                lf = m.forget_loss(fb, opts)
                loss = params.forget_weight * lf
                logs = {"forget_loss": lf.detach(), "forget_nll": T.mean_nll(nll_sum, n_tok).detach()}
                if uses_retain:
                    rb = T.collate([retain[i] for i in next(retain_order)], pad, task, device)
                    if m.retain_loss is not None:
                        with tapped(layer) as tap:
                            r_nll, r_tok, r_logits = T.sequence_nll(model, rb, task)
                        ref_hidden = None
                        if ref_layer is not None:
                            with torch.no_grad(), tapped(ref_layer) as ref_tap:
                                T.sequence_nll(ref, rb, task)
                            ref_hidden = ref_tap.output
                        lr_ = m.retain_loss(um.RetainBatch(r_nll, r_tok, r_logits, rb.labels, task,
                                                           tap.output if tap is not None else None,
                                                           ref_hidden, rb.attention_mask), opts)
                    elif params.retain_loss == "kl":
                        lr_ = T.kl_to_reference(model, ref, rb, task)
                    else:
                        lr_ = T.mean_nll(*T.sequence_nll(model, rb, task)[:2])
                    loss = loss + params.retain_weight * lr_
                    logs["retain_loss"] = lr_.detach()
                return loss, {"loss": loss.detach(), **logs}

            steps = T.total_steps(params, len(forget))
            curve = T.train(model, params, ctx, steps, micro_loss)
        trained_after = measure(model) if model is not target else None
        after = measure(model) if not m.composite else {}
        if params.lora is not None:
            if params.lora.keep_adapter and not m.composite:
                T.save_adapter(model, ctx.out, ctx.out.parent)
            elif params.lora.keep_adapter:
                ctx.warn(f"lora.keep_adapter: method {method} stores its trained model merged, inside the composite")
            model = model.merge_and_unload()
        if params.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.to("cpu")
        if m.composite:
            job.model = model
            meta, written = _write_composite(m, job, measure)
            after = written.pop("after")
            extra = {**extra, **written}
        else:
            meta = T.save_model(model, art.path, ctx, params.dtype or ctx.dtype)
    losses = {k: {"before": before[k], "after": after[k]} for k in before}
    if trained_before is not None and trained_after is not None:
        ctx.info["trained_model_losses"] = {k: {"before": trained_before[k], "after": trained_after[k]}
                                            for k in trained_before}
    ctx.info.update({"summary": {"method": method, "task": task, "steps": steps, "forget_examples": len(forget),
                                 "retain_examples": len(retain) if retain is not None else 0},
                     "losses": losses})
    if extra:
        ctx.info[method] = {**ctx.info.get(method, {}), **extra}
    if curve:
        ctx.info["training_curve"] = curve
    meta.update({"task": task, "unlearned_from": art.digest, "method": method})
    return meta


def _measured_rows(examples: list) -> list:
    """At most MEASURE_ROWS of ``examples``, evenly spaced (all of them when fewer)."""
    n = len(examples)
    if n <= MEASURE_ROWS:
        return examples
    return [examples[i * n // MEASURE_ROWS] for i in range(MEASURE_ROWS)]


def _write_composite(m: um.UnlearnMethod, job: um.Job, measure) -> tuple[dict, dict]:
    """The method writes its Composite into ctx.out; it is loaded back (as evaluate will load it)
    and its forget/retain losses measured.  Returns (the artifact's metadata, the info)."""
    from weightflow.ops.lib import composite

    info = dict(m.write(job))
    spec = composite.read_spec(job.ctx.out)
    loaded = composite.load(job.ctx.out, job.device)  # fails now, not at scoring time, if the parts do not fit
    info["after"] = measure(loaded)
    del loaded
    meta = {"rule": spec["rule"], "components": sorted(spec["components"])}
    return meta, info


def output_for(params) -> Kind:
    """A Model, or a Composite for a method that writes one (uld, eco)."""
    return Kind.COMPOSITE if METHODS[params.method].composite else Kind.MODEL


def _with_alternates(m: um.UnlearnMethod, encoder, params, task: str, ctx, opts: dict) -> tuple[list, list]:
    """The forget examples and, row for row, their alternate answers after the same prompt
    (a row whose alternate has no token within max_length is left out, with a warning)."""
    from weightflow.ops.lib import training as T

    path = ctx.data_path(params.forget)
    rows = T.read_data(params, path, task)
    _check_has_prompt(m, params, path, rows)
    originals = encoder.encode(path, rows)
    kept = list(encoder.kept)
    alt_rows = [_alternate_row(m, encoder, params, path, i, row, opts, ctx.seed) for i, row in enumerate(rows)]
    alts = encoder.encode(path, alt_rows)
    alt_of = dict(zip(encoder.kept, alts, strict=True))
    pairs = [(ex, alt_of[r]) for ex, r in zip(originals, kept, strict=True) if r in alt_of]
    if len(pairs) < len(originals):
        ctx.warn(f"{path.name}: {len(originals) - len(pairs)} forget example(s) have no alternate answer token "
                 f"within max_length {encoder.max_length} and are skipped")
    return [a for a, _ in pairs], [b for _, b in pairs]


def _alternate_row(m: um.UnlearnMethod, encoder, params, path, i: int, row: dict, opts: dict, seed: int) -> dict:
    """Forget row ``i`` (0-based) with its answer replaced by the method's alternate answer."""
    from weightflow.ops.lib.train_params import where
    from weightflow.ops.lib.training import IGNORE

    value = m.alternate(i, row, opts, seed)
    what = opts.get("alternate_field", "alternate")
    if "input_ids" in row:  # the prompt is the leading run of -100 labels
        ids = row["input_ids"]
        labels = row.get("labels", ids)
        n = next((k for k, t in enumerate(labels) if t != IGNORE), len(labels)) if isinstance(labels, list) else 0
        if isinstance(value, str):
            tok = encoder._tokenizer(path)
            tail = tok(value, add_special_tokens=False)["input_ids"]
            tail = tail + [encoder.eos] if encoder.eos is not None else tail
        else:
            tail = encoder._ids(path, i + 1, value, what)
        return {"input_ids": list(ids[:n]) + list(tail), "labels": [IGNORE] * n + list(tail)}
    if not isinstance(value, str):
        raise OpError(f"{path}: {where(path, i + 1)}: '{what}' must be a text (the alternate answer)")
    return {**row, params.response_field: value}


# params: built per method registry by ``params_model`` (a TrainParams subclass), so Any here
OP = OpSpec[Any](name="unlearn", version=1, output=Kind.MODEL, params=UnlearnParams, run=run,
                 doc=op_doc(METHODS), preflight=preflight, output_for=output_for,
                 other_outputs=(Kind.COMPOSITE,),
                 resources={"cpus": "all"})  # its threads use every CPU of a worker
