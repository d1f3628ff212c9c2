"""``finetune``: train a model on data, in full or with LoRA adapters (Model → Model).

Tasks: ``causal-lm`` (next-token loss on the text; with ``prompt_field`` +
``response_field`` on the response only) and ``sequence-classification`` (cross-entropy
on ``label_field``: integers, or strings mapped to class ids in sorted order and recorded
in the model config as ``id2label``).  ``task`` defaults to what the model's
architecture is.

Data: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or ``.txt`` (one example a line),
as text for the model's tokenizer, or pre-tokenized (``input_ids`` lists, optional
``labels`` with -100 for positions without loss).  ``limit`` keeps the first N
examples; ``max_length`` truncates; the order is shuffled every epoch from
``shuffle_seed`` (default: ``seed``).  The data file's content is part of the key.

Training: AdamW (or SGD), ``learning_rate`` with ``warmup_ratio`` of linear warm-up and
a linear, cosine or constant schedule (as Hugging Face's ``get_scheduler``),
``batch_size`` × ``gradient_accumulation_steps`` examples per step, for ``epochs``
(or ``max_steps``), gradient clipping at ``max_grad_norm``.  Hugging Face and axolotl
spellings are accepted (``num_epochs``, ``num_train_epochs``, ``micro_batch_size``,
``per_device_train_batch_size``, ``sequence_len``, ``lr_scheduler_type``, ``eval_steps``)
and normalised, so they never change a key.

``lora: {r, alpha, dropout, target_modules}`` trains peft LoRA adapters (and the
classification head) and merges them into the weights, so later steps see a normal
model; ``lora.keep_adapter: true`` also stores the adapter under ``adapter/``.

The manifest (``weightflow show STEP --json``) records the training curve (step,
loss, lr), ``eval_data`` losses every ``eval_every`` steps and at the end (and
accuracy for classification).  On CPU, the same seed, data and params give
bit-identical weights.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.lang.spec import DataPath, Kind, ModelRef, OpSpec
from weightflow.ops.lib.train_params import (
    AliasedParams,
    TrainParams,
    aliased,
    check_data,
    check_data_path,
)


class _Inputs(AliasedParams):
    """What finetune trains on (listed first; the training keys follow)."""

    model: ModelRef = Field(description="step producing the model to train")
    data: DataPath = Field(description="training data (.jsonl, .json, .csv, .parquet, .txt)")
    eval_data: DataPath | None = Field(None, description="held-out data: loss (and accuracy) recorded")
    eval_every: int | None = Field(None, ge=1, validation_alias=aliased("eval_every", "eval_steps"),
                                   description="evaluate eval_data every N steps (alias: eval_steps); "
                                   "default: before and after training only")

    @field_validator("data", "eval_data")
    @classmethod
    def _data_file(cls, v):
        return check_data_path(v)

    @model_validator(mode="after")
    def _eval_needs_data(self):
        if self.eval_every is not None and self.eval_data is None:
            raise ValueError("'eval_every' needs 'eval_data' (the held-out data to evaluate)")
        return self


class FinetuneParams(TrainParams, _Inputs):
    """finetune's parameters: the inputs, then the shared training keys."""


def preflight(params: FinetuneParams, env) -> None:
    check_data(params, env, [params.data, params.eval_data])


def run(inputs, params: FinetuneParams, ctx) -> dict:  # noqa: C901
    from weightflow.ops.lib import training as T

    art = inputs["model"]
    task = T.resolve_task(params.task, art.path)
    device = params.device
    with T.deterministic(ctx.seed, device):
        model = T.load_model(art.path, task, ctx)
        encoder, data = T.prepare(model, params, task, art.path, ctx,
                                  {"data": params.data, "eval_data": params.eval_data})
        if params.lora is not None:
            model = T.attach_lora(model, params.lora, task)
        if params.gradient_checkpointing:
            T.enable_checkpointing(model, params.lora is not None)
        model.to(device)
        train, held_out = data["data"], data.get("eval_data")
        pad, bs = encoder.pad_id, params.batch_size
        evals: list[dict] = []

        def evaluate(step: int) -> None:
            if held_out is not None:
                evals.append({"step": step, **T.evaluate(model, held_out, bs, pad, task, device)})

        def on_step(step: int) -> None:
            if params.eval_every and step % params.eval_every == 0 and step != steps:
                evaluate(step)

        order = T.batch_order(len(train), bs, params.shuffle_seed if params.shuffle_seed is not None
                              else ctx.seed)

        def micro_loss():
            batch = T.collate([train[i] for i in next(order)], pad, task, device)
            nll_sum, n_tok, _ = T.sequence_nll(model, batch, task)
            loss = T.mean_nll(nll_sum, n_tok)
            return loss, {"loss": loss.detach()}

        steps = T.total_steps(params, len(train))
        evaluate(0)
        curve = T.train(model, params, ctx, steps, micro_loss, on_step)
        evaluate(steps)
        if params.lora is not None:
            if params.lora.keep_adapter:
                T.save_adapter(model, ctx.out, ctx.out.parent)
            model = model.merge_and_unload()
        if params.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.to("cpu")
        meta = T.save_model(model, art.path, ctx, params.dtype or ctx.dtype)
    summary = {"task": task, "examples": len(train), "steps": steps,
               "loss_first": curve[0].get("loss"), "loss_last": curve[-1].get("loss")}
    if evals:
        summary["eval_before"], summary["eval_after"] = evals[0], evals[-1]
    # (the manifest sorts keys: the summary comes first in `weightflow show`)
    ctx.info.update({"summary": summary, "training_curve": curve, "validation": evals})
    meta.update({"task": task, "trained_from": art.digest, "lora": params.lora is not None})
    if params.lora is not None and params.lora.keep_adapter:
        meta["adapter"] = "adapter"
    if task == "sequence-classification":
        meta["id2label"] = {str(k): v for k, v in sorted(model.config.id2label.items())}
    return meta


OP = OpSpec[FinetuneParams](name="finetune", version=1, output=Kind.MODEL, params=FinetuneParams, run=run,
                            doc=__doc__, preflight=preflight,
                            resources={"cpus": "all"})  # its threads use every CPU of a worker
