"""``merge``: combine models or deltas into one Model, streaming tensor by tensor.

Each method is one module of ``weightflow.ops.merge_methods`` (listed below from their
declarations).  Delta methods are one generalised task arithmetic,
``base + λ·combine(select(δᵢ))``: a selection (keep all, magnitude trim, DARE,
breadcrumbs, DELLA) and a combination (a weighted sum, or TIES: elect each element's
sign as sign(Σ wᵢ·δ̂ᵢ) — a zero sum elects + — and take the disjoint weighted mean
Σ wᵢ·δ̂ᵢ·mᵢ / Σ wᵢ·mᵢ of the agreeing terms, 0 where none agrees, or their disjoint sum
with ``normalize: false``).  A negative weight negates a delta (unlearning by negation);
a delta taken against another base of the same architecture may be applied (patching)
and warns, naming both bases.

``weights``, ``density`` and ``t`` take a number or per-tensor rules
(``[{pattern: GLOB, value: X}, ..., {pattern: "*", value: X}]``).  Every tensor is
computed in float32 from row chunks of the inputs and written as soon as it is
ready, so peak memory is a few chunks, not whole models.  DARE masks are drawn per
(seed, delta digest, tensor name): the inline ``dare-*`` methods give the same
tensors as explicit ``dare-prune`` steps followed by ``ties``/``task-arithmetic``
with ``density: 1``.

``method:`` takes mergekit's spellings too (``task_arithmetic``, ``dare_ties``,
``della_linear``, ...: ``_`` for ``-``, and each method's aliases); they are read as the
canonical name, so either spelling gives the same step key.
"""

from __future__ import annotations

from typing import Any

from weightflow.dsl.lang.spec import Kind, OpSpec
from weightflow.ops.merge_methods import methods, params_union


def _doc() -> str:
    lines = [__doc__.rstrip(), "", "Methods:", ""]
    for m in methods().values():
        also = f" (also ``{'``, ``'.join(m.spellings[1:])}``)" if len(m.spellings) > 1 else ""
        lines.append(f"- ``{m.name}``{also}: {m.doc}")
    return "\n".join(lines) + "\n"


MergeParams = params_union()


def run(inputs, params, ctx) -> dict:
    return methods()[params.method](inputs, params, ctx)


# params: a union of every method's params (each typed in its module), tagged by ``method``
OP = OpSpec[Any](name="merge", version=2, output=Kind.MODEL, params=MergeParams, run=run, doc=_doc(),
                 discriminator="method")
