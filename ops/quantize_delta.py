"""``quantize-delta``: a delta stored in int8 or int4 codes with per-group scales.

Robust Weight Signatures (Cai et al. 2023) patch a model with a fine-tune's shallow-layer
delta and find such patches quantize painlessly; this op stores a delta's tensors as
``bits``-bit codes (int4: two a byte) with one scale per output channel
(``group_size: null``) or per run of ``group_size`` values, ``symmetric`` (zero point
``2^(bits-1)``) or with a per-group zero point, scales in float16 (float32 where a tensor's
scales are outside float16's normal range) or ``scale_dtype: float32``.  Formulas and
layout: ``weightflow.dsl.format.quantized``.  Every later op reads the dequantized
float32 values ``(u − z)·s``; ``export --format dense`` writes them.

A tensor that is mostly zeros -- a DARE-pruned or sparse-stored delta -- keeps its
nonzero pattern as a bitmask and only the kept values are coded (whenever mask plus
codes are smaller than codes for every element), so DARE then quantize composes.
Tensors outside ``include``/``exclude`` are stored as they were (dense or sparse
float32).  One tensor is in memory at a time.  The manifest (``info``) has each
tensor's largest absolute error, relative error ``‖x − x̂‖₂/‖x‖₂`` and stored bytes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weightflow.dsl.lang.spec import DeltaRef, Kind, OpParams, OpSpec


class QuantizeDeltaParams(OpParams):
    delta: DeltaRef = Field(description="step producing the delta to quantize")
    bits: Literal[8, 4] = Field(8, description="bits per code: 8 or 4 (int4 packed two a byte)")
    group_size: int | None = Field(None, ge=1, description="values per scale; null: one scale per output "
                                                            "channel (row)")
    symmetric: bool = Field(True, description="symmetric codes around zero; false: a zero point per group")
    scale_dtype: Literal["float16", "float32"] = Field("float16", description="dtype the scales are stored in")
    include: list[str] | None = Field(None, description="tensor globs to quantize (default: all)")
    exclude: list[str] = Field(default_factory=list, description="tensor globs stored unquantized")


def run(inputs, params: QuantizeDeltaParams, ctx) -> dict:
    import torch

    from weightflow.dsl.format.quantized import QUANT_META, quantize
    from weightflow.ops.lib.tensors import Checkpoint, TensorInfo, row_ranges, select

    art = inputs["delta"]
    delta = Checkpoint(art.path, prefix="delta", label=f"delta '{art.step}'")
    chosen = set(select([n for n in delta.names() if delta.is_float(n)], params.include, params.exclude))
    plan = [TensorInfo(n, "F32" if n in chosen else delta.info[n].dtype, delta.info[n].shape)
            for n in delta.names()]
    writer = ctx.delta_writer(plan)
    stats: dict[str, dict] = {}
    with ctx.progress(len(plan), "quantize") as bar:
        for n in delta.names():
            if n not in chosen:
                for lo, hi in row_ranges(delta.info[n].shape):
                    writer.append(n, delta.get(n, lo, hi))
                bar.update(1)
                continue
            x = delta.get(n).to(torch.float32).reshape(-1).numpy()
            q = quantize(n, x, delta.info[n].shape, params.bits, params.group_size, params.symmetric,
                         params.scale_dtype)
            writer.append_encoded(n, q.parts, QUANT_META, q.spec)
            stats[n] = {"max_error": q.max_error, "relative_error": q.relative_error,
                        "stored_bytes": q.stored_bytes, "float32_bytes": 4 * x.size,
                        "masked": q.spec["masked"], "scale_dtype": q.scale_dtype}
            bar.update(1)
    writer.close()
    delta.close()
    stored = sum(s["stored_bytes"] for s in stats.values())
    full = sum(s["float32_bytes"] for s in stats.values())
    ctx.info["tensors"] = stats
    ctx.info["max_relative_error"] = max((s["relative_error"] for s in stats.values()), default=0.0)
    ctx.info["quantized_bytes"] = {"stored": stored, "float32": full,
                                   "ratio": (full / stored) if stored else None}
    return {"base": art.meta.get("base"), "model": art.meta.get("model"), "quantized_from": art.digest,
            "bits": params.bits, "group_size": params.group_size, "symmetric": params.symmetric}


OP = OpSpec[QuantizeDeltaParams](name="quantize-delta", version=1, output=Kind.DELTA, params=QuantizeDeltaParams,
                                 run=run, doc=__doc__)
