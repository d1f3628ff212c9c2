"""``extract-delta``: the task vector of a fine-tune, model minus base, tensor by tensor.

Only floating-point tensors are differenced; ``include``/``exclude`` globs restrict
which tensors the delta carries (a tensor left out is treated as a zero delta by
later steps, e.g. RWS-style shallow-layer patches).  Deltas are stored in float32,
whatever the models' dtype, so the difference is not rounded away.  The Delta
remembers the digest of the base it was taken against.
"""

from __future__ import annotations

from pydantic import Field

from weightflow.dsl.lang.spec import Kind, ModelRef, OpParams, OpSpec


class ExtractDeltaParams(OpParams):
    model: ModelRef = Field(description="step producing the fine-tuned model")
    base: ModelRef = Field(description="step producing the base model the delta is taken against")
    include: list[str] | None = Field(None, description="tensor-name globs to keep (default: all)")
    exclude: list[str] = Field(default_factory=list, description="tensor-name globs to drop")


DELTA_PREFIX = "delta"


def run(inputs, params: ExtractDeltaParams, ctx) -> dict:
    import torch

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.tensors import (
        Checkpoint,
        TensorInfo,
        check_same_tensors,
        row_ranges,
        select,
    )

    model_art, base_art = inputs["model"], inputs["base"]
    model = Checkpoint(model_art.path, label=f"model '{model_art.step}'")
    base = Checkpoint(base_art.path, label=f"base '{base_art.step}'")
    check_same_tensors(model, base)
    floats = [n for n in model.names() if model.is_float(n) and base.is_float(n)]
    names = select(floats, params.include, params.exclude)
    if not names:
        raise OpError("include/exclude leave no tensor in the delta")
    plan = [TensorInfo(n, "F32", model.info[n].shape) for n in names]
    writer = ctx.delta_writer(plan, prefix=DELTA_PREFIX)
    sq = 0.0
    with ctx.progress(len(plan), "delta") as bar:
        for n in names:
            for lo, hi in row_ranges(model.info[n].shape):
                d = model.get(n, lo, hi).to(torch.float32) - base.get(n, lo, hi).to(torch.float32)
                sq += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
                writer.append(n, d)
            bar.update(1)
    writer.close()
    ctx.info["l2_norm"] = sq ** 0.5  # a float sum: manifest, not content
    return {"base": base_art.digest, "model": model_art.digest, "tensors": len(names)}


OP = OpSpec[ExtractDeltaParams](name="extract-delta", version=1, output=Kind.DELTA,
                                params=ExtractDeltaParams, run=run, doc=__doc__)
