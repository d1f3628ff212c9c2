"""``merge``: combine models or deltas into one Model, streaming tensor by tensor.

Methods (``method:``):

- ``linear``: Σ wᵢ·Mᵢ over ``models`` (``normalize: true``, the default, divides by Σ wᵢ:
  a weighted average, as mergekit's linear).
- ``task-arithmetic``: ``base`` + λ·Σ wᵢ·Δᵢ over ``deltas``.  A negative weight
  negates a delta (unlearning by negation); applying a delta taken against another
  base of the same architecture is allowed (patching) and warns, naming both bases.

Every output tensor is computed in float32 from memory-mapped inputs and written as
soon as it is ready, so peak memory is a few tensors, not whole models.  Config and
tokenizer come from the base (task-arithmetic) or the first model (linear).
"""

from __future__ import annotations

from typing import Annotated, Callable, Literal, Union

from pydantic import Field, ValidationInfo, field_validator

from weightflow.dsl.oplib import DeltaRef, Dtype, FiniteFloat, Kind, ModelRef, OpParams, OpSpec


class _MergeCommon(OpParams):
    dtype: Dtype | None = Field(None, description="dtype of the merged weights (default: pipeline dtype)")

    @field_validator("weights", check_fields=False)
    @classmethod
    def _one_weight_per_input(cls, weights, info: ValidationInfo):
        inputs = info.data.get("models", info.data.get("deltas"))
        if weights is not None and inputs is not None and len(weights) != len(inputs):
            what = "models" if "models" in info.data else "deltas"
            raise ValueError(f"expected {len(inputs)} weights, one per entry of '{what}', got {len(weights)}")
        return weights


class LinearParams(_MergeCommon):
    """Weighted sum (or average) of whole models."""

    method: Literal["linear"]
    models: list[ModelRef] = Field(min_length=1, description="steps producing the models to merge")
    weights: list[FiniteFloat] | None = Field(None, description="one per model (default: 1 each)")
    normalize: bool = Field(True, description="divide by the sum of the weights")


class TaskArithmeticParams(_MergeCommon):
    """base + lambda * sum of weighted deltas (task vectors)."""

    method: Literal["task-arithmetic"]
    base: ModelRef = Field(description="step producing the model the deltas are added to")
    deltas: list[DeltaRef] = Field(min_length=1, description="steps producing deltas")
    weights: list[FiniteFloat] | None = Field(None, description="one per delta (default: 1 each); "
                                              "negative negates")
    lambda_: FiniteFloat = Field(1.0, alias="lambda", description="scale of the summed deltas")


MergeParams = Annotated[Union[LinearParams, TaskArithmeticParams], Field(discriminator="method")]


def _stream(ctx, template, template_dir, compute: Callable, dtype: str) -> int:
    """Write every tensor of ``template`` in row chunks: floats via ``compute(name, lo, hi)``,
    others copied."""
    import torch

    from weightflow.ops._tensors import (
        FLOAT_ST, TORCH_DTYPES, TensorInfo, copy_side_files, row_ranges, st_dtype_of, tensor_buffer)

    target = st_dtype_of(dtype)
    plan = [TensorInfo(n, target if i.dtype in FLOAT_ST else i.dtype, i.shape)
            for n, i in template.info.items()]
    writer = ctx.tensor_writer(plan)
    with ctx.progress(len(plan), "merge") as bar, torch.inference_mode():
        for info in plan:
            for lo, hi in row_ranges(info.shape):
                if template.is_float(info.name):
                    t = compute(info.name, lo, hi).to(TORCH_DTYPES[dtype])
                else:
                    t = template.get(info.name, lo, hi)
                writer.append(info.name, tensor_buffer(t))
            bar.update(1)
    writer.close()
    copy_side_files(template_dir, ctx.out, dtype=dtype)
    return len(plan)


def _linear(inputs, p: LinearParams, ctx) -> dict:
    import torch

    from weightflow.dsl.diagnostics import OpError
    from weightflow.ops._tensors import Checkpoint, check_same_tensors

    arts = inputs["models"]
    ckpts = [Checkpoint(a.path, label=f"model '{a.step}'") for a in arts]
    for c in ckpts[1:]:
        check_same_tensors(ckpts[0], c)
    weights = list(p.weights) if p.weights is not None else [1.0] * len(ckpts)
    total = sum(weights)
    if p.normalize and abs(total) < 1e-12:
        raise OpError("normalize: true needs weights whose sum is not zero")

    def compute(name, lo, hi):
        acc = None
        for w, c in zip(weights, ckpts):
            term = c.get(name, lo, hi).to(torch.float32) * w
            acc = term if acc is None else acc.add_(term)
        return acc / total if p.normalize else acc

    n = _stream(ctx, ckpts[0], arts[0].path, compute, p.dtype or ctx.dtype)
    return {"method": "linear", "tensors": n}


def _task_arithmetic(inputs, p: TaskArithmeticParams, ctx) -> dict:
    import torch

    from weightflow.dsl.diagnostics import OpError
    from weightflow.ops._tensors import Checkpoint

    base_art = inputs["base"]
    delta_arts = inputs["deltas"]
    base = Checkpoint(base_art.path, label=f"base '{base_art.step}'")
    deltas = [Checkpoint(a.path, prefix="delta", label=f"delta '{a.step}'") for a in delta_arts]
    for art in delta_arts:
        taken = art.meta.get("base")
        if taken and taken != base_art.digest:
            ctx.warn(f"delta '{art.step}' was taken against base {ctx.name_of(taken)} but is applied "
                     f"to base {ctx.name_of(base_art.digest)} (patching onto a different base)")
    for art, d in zip(delta_arts, deltas):
        for n, info in d.info.items():
            if n not in base:
                raise OpError(f"architectures differ: tensor '{n}' of delta '{art.step}' is not in "
                              f"base '{base_art.step}'")
            if base.info[n].shape != info.shape:
                raise OpError(f"architectures differ: tensor '{n}' has shape {list(info.shape)} in delta "
                              f"'{art.step}' but {list(base.info[n].shape)} in base '{base_art.step}'")
    weights = list(p.weights) if p.weights is not None else [1.0] * len(deltas)

    def compute(name, lo, hi):
        b = base.get(name, lo, hi).to(torch.float32)
        acc = None
        for w, d in zip(weights, deltas):
            if name in d:
                term = d.get(name, lo, hi).to(torch.float32) * w
                acc = term if acc is None else acc.add_(term)
        return b if acc is None else b + acc * p.lambda_

    n = _stream(ctx, base, base_art.path, compute, p.dtype or ctx.dtype)
    return {"method": "task-arithmetic", "tensors": n}


METHODS = {"linear": _linear, "task-arithmetic": _task_arithmetic}


def run(inputs, params, ctx) -> dict:
    return METHODS[params.method](inputs, params, ctx)


OP = OpSpec(name="merge", version=1, output=Kind.MODEL, params=MergeParams, run=run, doc=__doc__,
            discriminator="method")
