"""Parameters shared by the training ops (``finetune``, ``unlearn``), torch-free.

Training keys follow Hugging Face ``TrainingArguments`` and axolotl; their other
spellings are accepted as aliases (``num_epochs``/``num_train_epochs`` for ``epochs``,
``micro_batch_size``/``per_device_train_batch_size`` for ``batch_size``,
``sequence_len``/``max_seq_length`` for ``max_length``, ...).  An alias is normalised
to the canonical name during validation, so the spelling never changes a step key.

``check_data`` is the ops' preflight: it reads each data file once before any step of
the pipeline runs and fails on a missing field or an unusable label, naming the file
and the first bad line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import Dtype, DtypeParam, FiniteFloat, OpParams, SeedParam
from weightflow.ops.lib.data import SUFFIXES, read_records, require_fields

TASKS = ("causal-lm", "sequence-classification")
Task = Literal["auto", "causal-lm", "sequence-classification"]


def aliased(canonical: str, *others: str) -> AliasChoices:
    """Accept ``canonical`` or any of ``others``; the params dump as ``canonical``."""
    return AliasChoices(canonical, *others)


def _alias_properties(schema: dict, cls) -> None:
    """JSON Schema: list every accepted alias as a property too, so editors accept it."""
    props = schema.get("properties")
    if not isinstance(props, dict):
        return
    for name, info in cls.model_fields.items():
        choices = getattr(info.validation_alias, "choices", None)
        if not choices or name not in props:
            continue
        for other in choices[1:]:
            if isinstance(other, str) and other not in props:
                props[other] = {**props[name], "description": f"alias of '{name}'"}


def check_data_path(value: str | None) -> str | None:
    if value is None:
        return value
    if value.startswith("hf:"):
        raise ValueError(f"{value}: hub datasets are not fetched (weightflow runs offline); export the "
                         "split to a local .jsonl/.csv/.parquet file (datasets' to_json/to_csv) and "
                         "point the step at that file")
    suffix = Path(value).suffix
    if suffix not in SUFFIXES:
        raise ValueError(f"{value}: unsupported data format '{suffix}'; expected one of {', '.join(SUFFIXES)}")
    return value


class AliasedParams(OpParams):
    """Params with alias spellings: one spelling per setting; aliases in the JSON Schema."""

    model_config = {"json_schema_extra": _alias_properties}

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data):
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                choices = getattr(info.validation_alias, "choices", None) or ()
                given = [c for c in choices if isinstance(c, str) and c in data]
                if len(given) > 1:
                    raise ValueError(f"{' and '.join(repr(g) for g in given)} are the same setting "
                                     f"('{name}'); give only one")
        return data


class LoraParams(AliasedParams):
    """LoRA adapters (peft), merged into the weights of the produced model."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: FiniteFloat = Field(16, gt=0, validation_alias=aliased("alpha", "lora_alpha"),
                               description="scaling numerator: updates are scaled by alpha / r "
                               "(alias: lora_alpha)")
    dropout: FiniteFloat = Field(0.0, ge=0, lt=1, validation_alias=aliased("dropout", "lora_dropout"),
                                 description="dropout on the adapter input (alias: lora_dropout)")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, validation_alias=aliased("target_modules", "lora_target_modules"),
        description="module names (or name suffixes) to adapt, or 'all-linear'; default: peft's "
        "choice for the architecture (e.g. q_proj, v_proj for Llama; query, value for BERT)")
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full besides the adapters (default: the "
        "classification head for sequence classification, none for causal LMs)")
    keep_adapter: bool = Field(False, description="also store the adapter (adapter/ in the artifact)")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules must name at least one module (or be 'all-linear')")
        return v


def _off(value) -> bool:
    """An opt-in speed setting that is off is left out of the params dump, so the keys of steps
    that do not use it stay as they were before it existed."""
    return not value


class TrainParams(AliasedParams, SeedParam, DtypeParam):
    """Keys shared by every training op: data mapping, optimisation, LoRA, output dtype."""

    task: Task = Field("auto", description="causal-lm | sequence-classification; auto: from the "
                       "model's architecture")
    # -- data mapping ---------------------------------------------------------
    text_field: str = Field("text", description="field holding the text")
    label_field: str = Field("label", description="field holding the class (sequence classification): "
                             "ints, or strings mapped to ids in sorted order")
    prompt_field: str | None = Field(None, description="instruction/chat data: the prompt field "
                                     "(no loss on it); needs response_field")
    response_field: str | None = Field(None, description="instruction/chat data: the response field "
                                       "(the loss is on it only)")
    chat_template: bool = Field(False, description="format prompt/response with the tokenizer's chat "
                                "template (prompt as the user turn)")
    max_length: int = Field(512, ge=2, validation_alias=aliased("max_length", "sequence_len", "max_seq_length"),
                            description="tokens per example, truncated beyond (capped at the model's "
                            "maximum; aliases: sequence_len, max_seq_length)")
    limit: int | None = Field(None, ge=1, description="use only the first N examples of each data file")
    shuffle_seed: int | None = Field(None, ge=0, description="seed of the example order (default: seed)")
    # -- optimisation ---------------------------------------------------------
    epochs: FiniteFloat = Field(1.0, gt=0, validation_alias=aliased("epochs", "num_epochs", "num_train_epochs"),
                                description="passes over the data (aliases: num_epochs, num_train_epochs)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when given")
    learning_rate: FiniteFloat = Field(5e-5, gt=0, description="peak learning rate")
    batch_size: int = Field(8, ge=1, validation_alias=aliased(
        "batch_size", "micro_batch_size", "per_device_train_batch_size"),
        description="examples per forward pass (aliases: micro_batch_size, per_device_train_batch_size)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="forward passes per optimizer step")
    weight_decay: FiniteFloat = Field(0.0, ge=0, description="decoupled weight decay (not on biases "
                                      "and norm weights)")
    warmup_ratio: FiniteFloat = Field(0.0, ge=0, lt=1, description="fraction of steps of linear warm-up")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", validation_alias=aliased("lr_scheduler", "lr_scheduler_type"),
        description="decay after warm-up (alias: lr_scheduler_type)")
    optimizer: Literal["adamw", "sgd", "adamw_torch_fused"] = Field(
        "adamw", description="adamw (betas 0.9, 0.999, eps 1e-8), sgd, or adamw_torch_fused: the same "
        "update in torch's fused kernel (HF Trainer's default; faster, other last-bit rounding)")
    max_grad_norm: FiniteFloat | None = Field(1.0, ge=0, description="clip the gradient norm (0 or null: off)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    logging_steps: int = Field(1, ge=1, description="record the training curve every N steps")
    lora: LoraParams | None = Field(None, description="train LoRA adapters instead of all weights")
    bf16: bool = Field(False, exclude_if=_off, description="forward and backward under bfloat16 autocast "
                       "(weights, gradients and optimizer stay float32): faster where the CPU or GPU has "
                       "bfloat16 units, other numerics")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu (bit-reproducible) or cuda")
    seed: int | None = Field(None, ge=0, description="seed (default: the pipeline's)")
    dtype: Dtype | None = Field(None, description="dtype of the stored weights (default: pipeline dtype)")

    @model_validator(mode="after")
    def _prompt_response(self):
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("'prompt_field' and 'response_field' go together: give both (loss on the "
                             "response only) or neither (loss on the whole text)")
        if self.chat_template and self.prompt_field is None:
            raise ValueError("'chat_template' needs 'prompt_field' and 'response_field'")
        return self


class BatchingParams(AliasedParams):
    """How ``finetune`` forms its batches and its loss beyond the default (off: shuffled,
    right-padded, logits at every position).

    Each changes the numerics (which tokens share a forward pass, or over how many rows the
    LM head's gradient is summed), so each is opt-in and in the key only when on.
    """

    group_by_length: bool = Field(False, exclude_if=_off, description="batches of examples of similar "
                                  "length (HF's group_by_length): less padding, a different example "
                                  "order; deterministic from shuffle_seed")
    packing: bool = Field(False, exclude_if=_off, description="causal LM: pack each batch's examples "
                          "into as few rows of max_length tokens as fit (no padding between them); "
                          "position ids restart and attention stays within each example, so the loss "
                          "is that of the unpacked batch")
    target_logits_only: bool = Field(False, exclude_if=_off, description="causal LM: compute the LM head "
                                     "and softmax only at positions that predict a target (the response "
                                     "with prompt_field/response_field; never padding): the same loss, "
                                     "less work; the head's gradient is summed over fewer rows (other "
                                     "last-bit rounding)")

    @model_validator(mode="after")
    def _not_with_s3t(self):
        if getattr(self, "slices", None) is not None:
            on = [k for k in ("group_by_length", "packing", "target_logits_only") if getattr(self, k)]
            if on:
                raise ValueError(f"{', '.join(on)}: not used by S3T (slices); leave it out")
        return self


# -- preflight: the data files' fields, before any step runs -------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_INT_TEXT = re.compile(r"^-?[0-9]+$")


def label_value(path: Path, v):
    """A label as read from ``path``: ints stay ints; CSV cells that are integers become ints."""
    if isinstance(v, str) and Path(path).suffix == ".csv" and _INT_TEXT.match(v.strip()):
        return int(v.strip())
    return v


def where(path: Path, i: int) -> str:
    """How to point at example ``i`` of a data file: a line for line-based formats."""
    return f"line {i}" if Path(path).suffix in (".jsonl", ".txt") else f"example {i}"


def check_records(path: Path, rows: list[dict], params: TrainParams, task: str) -> None:
    """The fields an example needs, by how it is given (pre-tokenized, prompt/response, text)."""
    tokenized = [r for r in rows if "input_ids" in r]
    if tokenized and len(tokenized) != len(rows):
        i = next(i for i, r in enumerate(rows, 1) if "input_ids" not in r)
        raise OpError(f"{path}: {where(path, i)} has no 'input_ids' while other examples are "
                      "pre-tokenized; give every example as input_ids or none")
    if not tokenized:
        if params.prompt_field is not None:
            require_fields(path, rows, [params.prompt_field, params.response_field])
        else:
            require_fields(path, rows, [params.text_field])
    if task == "sequence-classification":
        require_fields(path, rows, [params.label_field])
        kinds = set()
        for i, row in enumerate(rows, 1):
            v = label_value(path, row[params.label_field])
            if _is_int(v):
                if v < 0:
                    raise OpError(f"{path}: {where(path, i)}: label {v} is negative")
                kinds.add("int")
            elif isinstance(v, str):
                kinds.add("str")
            else:
                raise OpError(f"{path}: {where(path, i)}: label {v!r} must be an integer or a string")
            if len(kinds) > 1:
                raise OpError(f"{path}: {where(path, i)}: labels mix integers and strings; use one kind")


def check_data(params: TrainParams, env, files: list[str | None]) -> None:
    """Preflight of a training op: every given data file reads and has the needed fields."""
    for f in files:
        if f is None:
            continue
        path = env.data_path(f)
        rows = read_records(path, params.limit)
        check_records(path, rows, params, params.task)
