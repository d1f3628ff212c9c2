"""L2 norm of model − base over every floating-point tensor, absolute and relative to the
base's norm (float64 accumulation; the architectures must match tensor for tensor).
"""

from __future__ import annotations

import math

from pydantic import Field

from weightflow.dsl.lang.spec import ModelRef
from weightflow.ops.metrics import Metric, MetricParams


class DeltaNormMetric(MetricParams):
    """L2 norm of the difference to a base model."""

    base: ModelRef = Field(description="the step whose model is subtracted")


def delta_norm(subject, m: DeltaNormMetric, ctx) -> tuple[dict, dict]:
    import torch

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.tensors import FLOAT_ST, Checkpoint, row_ranges

    base_art = subject.ref("base")
    a = Checkpoint(subject.path, label=f"model '{subject.art.step}'")
    b = Checkpoint(base_art.path, label=f"base '{base_art.step}'")
    diff = base = 0.0
    try:
        for name in a.names():
            info = a.info[name]
            if info.dtype not in FLOAT_ST:
                continue
            if name not in b:
                raise OpError(f"architectures differ: tensor '{name}' is not in the base '{base_art.step}'")
            if b.info[name].shape != info.shape:
                raise OpError(f"architectures differ: tensor '{name}' has shape {list(info.shape)} but "
                              f"{list(b.info[name].shape)} in the base '{base_art.step}'")
            for lo, hi in row_ranges(info.shape):
                x = a.get(name, lo, hi).to(torch.float64)
                y = b.get(name, lo, hi).to(torch.float64)
                diff += float((x - y).pow(2).sum())
                base += float(y.pow(2).sum())
    finally:
        a.close()
        b.close()
    l2 = math.sqrt(diff)
    return {"l2": l2, "relative": l2 / math.sqrt(base) if base else None}, {"base_digest": base_art.digest}


METRIC = Metric(
    name="delta_norm", params=DeltaNormMetric, compute=delta_norm, doc=__doc__,
    columns=(("l2", None, True), ("relative", None, True)),
    scores_composites=False,
)
