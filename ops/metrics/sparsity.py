"""Fraction of zeros in the 2-D weights inside the transformer blocks (what pruning
targets), overall and per block (in the details), and over every floating-point tensor
(``sparsity_all``).  Reads the checkpoint's tensors; no forward pass.
"""

from __future__ import annotations

import re

from weightflow.ops.metrics import Metric, MetricParams

BLOCK = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


class SparsityMetric(MetricParams):
    """Fraction of zero weights."""


def sparsity(subject, m: SparsityMetric, ctx) -> tuple[dict, dict]:
    from weightflow.ops.lib.tensors import FLOAT_ST, Checkpoint, row_ranges

    ck = Checkpoint(subject.path, label=f"model '{subject.art.step}'")
    zeros = numel = all_zeros = all_numel = 0
    per_block: dict[str, list[int]] = {}
    try:
        for name in ck.names():
            info = ck.info[name]
            if info.dtype not in FLOAT_ST:
                continue
            z = n = 0
            for lo, hi in row_ranges(info.shape):
                t = ck.get(name, lo, hi)
                z += int((t == 0).sum())
                n += t.numel()
            all_zeros += z
            all_numel += n
            b = BLOCK.search(name)
            if b and len(info.shape) == 2 and name.endswith(".weight"):
                zeros += z
                numel += n
                acc = per_block.setdefault(b.group(1), [0, 0])
                acc[0] += z
                acc[1] += n
    finally:
        ck.close()
    values = {"sparsity": zeros / numel if numel else None, "sparsity_all": all_zeros / all_numel,
              "zeros": zeros, "numel": numel}
    details = {"per_block": {k: v[0] / v[1] for k, v in sorted(per_block.items(), key=lambda kv: int(kv[0]))}}
    return values, details


METRIC = Metric(
    name="sparsity", params=SparsityMetric, compute=sparsity, doc=__doc__,
    columns=(("sparsity", None, True), ("sparsity_all", None, True), ("zeros", None, False),
             ("numel", None, False)),
    scores_composites=False,
)
