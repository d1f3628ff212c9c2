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

Speed (opt-in, each changes the numerics, so each is in the key only when on):
``group_by_length: true`` batches examples of similar length (less padding);
``packing: true`` (causal LM) packs each batch's examples into rows of ``max_length`` with
restarting position ids and attention kept within each example (the unpacked batch's loss);
``bf16: true`` runs forward and backward under bfloat16 autocast; ``optimizer:
adamw_torch_fused`` is torch's fused AdamW (HF Trainer's default); ``target_logits_only: true``
(causal LM) computes the LM head and its softmax only where a token has a target (the
response of chat data), the same loss for less work.  The default AdamW runs
torch's multi-tensor path, bit-identical to the plain loop.  The manifest records the
loop's own seconds (``timing.train_loop_s``).

``lora: {r, alpha, dropout, target_modules}`` trains peft LoRA adapters (and the
classification head) and merges them into the weights, so later steps see a normal
model; ``lora.keep_adapter: true`` also stores the adapter under ``adapter/``.

The manifest (``weightflow show STEP --json``) records the training curve (step,
loss, lr), ``eval_data`` losses every ``eval_every`` steps and at the end (and
accuracy for classification).  On CPU, the same seed, data and params give
bit-identical weights.

S3T (exact unlearning; ops/lib/s3t.py): ``slices: L`` (with ``shards: S``, default 1, and
``sequences: B``, default 1, at most L) trains, per shard of the data, B stacks of LoRA
adapters, one layer group per slice from the top layer down, group l on the first l+1
slices of its slice order; the step then produces a Composite (the shard models'
ensemble), from which ``s3t-delete`` removes rows without a gradient step.  Rows are the
examples' positions in the data file, or their ``id_field`` values.  ``epochs`` /
``max_steps`` are per stage; LoRA only; adapters stored in float32.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_serializer, model_validator

from weightflow.dsl.lang.spec import DataPath, Kind, ModelRef, OpSpec
from weightflow.ops.lib.train_params import (
    AliasedParams,
    BatchingParams,
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


class _S3TKeys(AliasedParams):
    """S3T's sharded, sliced schedule (off unless ``slices`` is given)."""

    shards: int | None = Field(None, ge=1, description="S3T: disjoint data shards, one ensemble member each "
                               "(default 1; needs slices)")
    slices: int | None = Field(None, ge=1, description="S3T: slices per shard = LoRA layer groups trained one "
                               "after another (turns S3T on; needs lora)")
    sequences: int | None = Field(None, ge=1, description="S3T: slice orders trained per shard, each its own "
                                  "adapter stack (default 1, at most slices)")
    id_field: str | None = Field(None, description="S3T: the field holding each example's row id (default: "
                                 "its position in the data file, from 0)")


S3T_KEYS = tuple(_S3TKeys.model_fields)


class FinetuneParams(TrainParams, BatchingParams, _S3TKeys, _Inputs):
    """finetune's parameters: the inputs, then the shared training keys."""

    @model_validator(mode="after")
    def _causal_only(self):
        if self.task == "sequence-classification":
            on = [k for k in ("packing", "target_logits_only") if getattr(self, k)]
            if on:
                raise ValueError(f"{', '.join(on)}: applies to causal-lm fine-tunes, not sequence-classification "
                                 "(group_by_length cuts padding there)")
        return self

    @model_validator(mode="after")
    def _s3t(self):
        if self.slices is None:
            given = [k for k in S3T_KEYS if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: S3T settings need 'slices' (the number of slices per shard)")
            return self
        if self.lora is None:
            raise ValueError("S3T (slices) trains LoRA adapters, one layer group per slice: add lora: {r: 8}")
        if self.eval_data is not None:
            raise ValueError("eval_data is not recorded for S3T (slices); score the composite with evaluate")
        if self.sequences is not None and self.sequences > self.slices:
            raise ValueError(f"sequences ({self.sequences}) must be at most slices ({self.slices}): each is a "
                             "rotation of the slice order")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_s3t(self, handler):
        """A finetune without S3T dumps (and keys) exactly as before S3T existed."""
        data = handler(self)
        for k in S3T_KEYS:
            if data.get(k) is None:
                data.pop(k, None)
        return data


def preflight(params: FinetuneParams, env) -> None:
    check_data(params, env, [params.data, params.eval_data])
    if params.id_field is not None:  # S3T's row ids: present and unique, before anything runs
        from weightflow.ops.lib.s3t import row_ids

        row_ids(env.data_path(params.data), params, 0)


def run(inputs, params: FinetuneParams, ctx) -> dict:  # noqa: C901
    from weightflow.ops.lib import training as T

    art = inputs["model"]
    task = T.resolve_task(params.task, art.path)
    if params.slices is not None:
        from weightflow.ops.lib import s3t

        return {**s3t.fit(art.path, params, ctx, task), "trained_from": art.digest}
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

        shuffle_seed = params.shuffle_seed if params.shuffle_seed is not None else ctx.seed
        order = (T.length_grouped_order([len(e.ids) for e in train], bs, shuffle_seed) if params.group_by_length
                 else T.batch_order(len(train), bs, shuffle_seed))
        if params.packing:
            T.check_packing(model, task, train, pad, device)
        if params.target_logits_only:
            T.check_target_logits(model, task, train, pad, device)

        def micro_loss():
            rows = [train[i] for i in next(order)]
            batch = (T.pack(rows, pad, encoder.max_length, device) if params.packing
                     else T.collate(rows, pad, task, device))
            nll_sum, n_tok = (T.target_nll(model, batch) if params.target_logits_only
                              else T.sequence_nll(model, batch, task)[:2])
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


def output_for(params: FinetuneParams) -> Kind:
    """A Model, or with S3T (slices) a Composite of shard models."""
    return Kind.COMPOSITE if params.slices is not None else Kind.MODEL


OP = OpSpec[FinetuneParams](name="finetune", version=1, output=Kind.MODEL, params=FinetuneParams, run=run,
                            doc=__doc__, preflight=preflight, output_for=output_for,
                            other_outputs=(Kind.COMPOSITE,),
                            resources={"cpus": "all"})  # its threads use every CPU of a worker
