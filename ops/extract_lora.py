"""``extract-lora``: placeholder while it is being written (issue 15)."""

from __future__ import annotations

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import Kind, OpParams, OpSpec


class _Params(OpParams):
    """No params yet."""


def run(inputs, params, ctx) -> dict:
    raise OpError("extract-lora is not written yet")


OP = OpSpec[_Params](name="extract-lora", version=1, output=Kind.DELTA, params=_Params, run=run, doc="extract-lora (being written)")
