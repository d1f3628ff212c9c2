"""``collect-stats``: placeholder while it is being written (issue 15)."""

from __future__ import annotations

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import Kind, OpParams, OpSpec


class _Params(OpParams):
    """No params yet."""


def run(inputs, params, ctx) -> dict:
    raise OpError("collect-stats is not written yet")


OP = OpSpec[_Params](name="collect-stats", version=1, output=Kind.STATS, params=_Params, run=run, doc="collect-stats (being written)")
