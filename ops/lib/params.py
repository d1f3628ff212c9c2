"""Parameter types shared by the delta and merge ops (torch-free).

``PerTensor`` lets a number vary by tensor: either one number, or a list of
``{pattern: GLOB, value: X}`` rules where the first matching pattern wins and the last
rule is the default (``pattern: "*"``).  So a user can merge attention and MLP
tensors differently, or patch only the shallow layers (Robust Weight Signatures).
"""

from __future__ import annotations

import fnmatch
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from weightflow.dsl.lang.spec import DataPath, FiniteFloat, OpParams


class Rule(BaseModel):
    """One per-tensor rule: tensors whose name matches ``pattern`` take ``value``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pattern: str = Field(description="glob over tensor names, e.g. 'model.layers.[0-3].*'")
    value: FiniteFloat


def _default_last(rules: list[Rule]) -> list[Rule]:
    if not rules:
        raise ValueError("a rule list needs at least one rule")
    if rules[-1].pattern != "*":
        raise ValueError("the last rule must be the default, {pattern: '*', value: X}, so every "
                         "tensor gets a value")
    return rules


RuleList = Annotated[list[Rule], AfterValidator(_default_last)]
PerTensor = FiniteFloat | RuleList
# One value for every delta of a merge, or one per delta in the order of ``deltas`` (mergekit's
# per-model ``density``: ``[1.0, 0.7, 0.1]``); each value a number or per-tensor rules.
PerDelta = PerTensor | list[PerTensor]


def is_per_delta(value) -> bool:
    """A list with one value per delta (not a single rule list)."""
    return isinstance(value, list) and bool(value) and not isinstance(value[0], Rule)


def for_delta(value, index: int) -> PerTensor:
    """The value delta ``index`` takes: its entry of a per-delta list, else ``value`` itself."""
    return value[index] if is_per_delta(value) else value


def resolve(value: PerTensor, tensor: str) -> float:
    """The number ``value`` gives tensor ``tensor``."""
    if isinstance(value, (int, float)):
        return float(value)
    for rule in value:
        if fnmatch.fnmatchcase(tensor, rule.pattern):
            return float(rule.value)
    return float(value[-1].value)  # unreachable: the last rule matches everything


def check_range(value: PerTensor, lo: float, hi: float, what: str, lo_open=False, hi_open=False) -> PerTensor:
    """Check every number of a PerTensor (or of each entry of a per-delta list) against [lo, hi]
    (open ends as asked)."""
    if is_per_delta(value):
        for v in value:
            check_range(v, lo, hi, what, lo_open, hi_open)
        return value
    values = [value] if isinstance(value, (int, float)) else [r.value for r in value]
    for v in values:
        bad = v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
        if bad:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ValueError(f"{what} must be in {left}{lo}, {hi}{right}, got {v}")
    return value


class Calibration(OpParams):
    """Calibration data for ops that look at activations (DAREx-q auto, WANDA)."""

    data: DataPath = Field(description="text (.txt, .jsonl with text_field) or .jsonl with input_ids")
    samples: int = Field(128, ge=1, description="number of calibration windows")
    seq_len: int = Field(2048, ge=2, description="tokens per window (capped at the model's maximum)")
    seed: int = Field(0, ge=0, description="seed for random window positions")
    random: bool = Field(False, description="draw window positions at random instead of consecutively")
    text_field: str = Field("text", description="field holding the text in .jsonl data")
