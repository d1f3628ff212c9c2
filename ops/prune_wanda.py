"""``prune-wanda``: prune a model's linear layers by |W|·‖X‖₂ (Wanda) or by |W| (magnitude).

- ``method: wanda`` (Sun et al. 2023) scores each weight by its magnitude times the
  L2 norm of its input feature over the ``calibration`` data, and prunes the lowest
  scores within each output row; ``magnitude`` (the baseline) scores by |W| alone and
  needs no data, comparing within the whole layer by default (as the Wanda paper's
  baseline does; ``group: row`` compares within rows instead).
- ``pattern``: ``unstructured`` with ``sparsity`` s in [0, 1) -- floor(s·n) weights
  pruned per comparison group of n -- or ``N:M`` (``2:4``, ``4:8``): the N highest
  scores of every M consecutive input weights of a row are kept (sparsity 1 − N/M).
- Calibration is layer by layer, as the reference implementation does it: the
  calibration inputs go through one transformer block at a time, per-linear input
  norms are collected with hooks, the block is pruned, and the *pruned* block's
  outputs feed the next block.  ``calibration.data`` is text (.txt, .jsonl with
  ``text_field``; tokenized, documents joined with EOS, cut into ``samples`` windows
  of ``seq_len``, capped at the model's maximum) or pre-tokenized .jsonl with
  ``input_ids``.  Padding tokens never count.
- Only linears inside the transformer blocks are candidates (Llama-, GPT-2- and
  BERT-family models); ``lm_head`` and embeddings are never pruned.  ``include`` /
  ``exclude`` are globs over module names such as ``model.layers.0.mlp.down_proj``.

The sparsity of every pruned layer and per block (exact counts) is recorded in the
artifact's metadata; ``weightflow show`` prints the model's overall sparsity.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import Dtype, DtypeParam, Kind, ModelRef, OpSpec
from weightflow.ops.lib.params import Calibration

_NM = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


class PruneParams(DtypeParam):
    """What to prune, how much, and by which score."""

    model: ModelRef = Field(description="the step whose model is pruned")
    method: Literal["wanda", "magnitude"] = Field("wanda", description="wanda: |W|·‖X‖₂ "
                                                  "(needs calibration); magnitude: |W| (baseline)")
    sparsity: float | None = Field(None, ge=0, lt=1, description="fraction of weights pruned "
                                   "(unstructured; implied by N:M patterns)")
    pattern: str = Field("unstructured", pattern=r"^(unstructured|[1-9][0-9]*:[1-9][0-9]*)$",
                         description="'unstructured', or 'N:M': keep N of every M consecutive weights "
                         "of a row (2:4, 4:8)")
    group: Literal["row", "layer"] | None = Field(
        None, description="comparison group for unstructured pruning: row (each output row loses "
        "the same fraction) or layer; default: row for wanda, layer for magnitude")
    calibration: Calibration | None = Field(None, description="calibration data (wanda)")
    include: list[str] | None = Field(None, description="globs over linear module names to prune "
                                      "(default: every linear inside the transformer blocks)")
    exclude: list[str] = Field(default_factory=list, description="globs over linear module names "
                               "to leave dense")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward pass")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where calibration runs")
    dtype: Dtype | None = Field(None, description="dtype of the stored weights (default: pipeline dtype)")

    @model_validator(mode="after")
    def _consistent(self):
        nm = _NM.match(self.pattern)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if n >= m:
                raise ValueError(f"pattern {self.pattern}: N must be smaller than M (keep N of every M)")
            implied = 1 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"pattern {self.pattern} keeps {n} of every {m} weights, i.e. sparsity "
                                 f"{implied:g}; sparsity {self.sparsity:g} contradicts it (leave it out)")
            if self.group is not None:
                raise ValueError(f"'group' applies to unstructured pruning; pattern {self.pattern} "
                                 "always compares within M consecutive weights of a row")
        elif self.sparsity is None:
            raise ValueError("unstructured pruning needs 'sparsity' (e.g. sparsity: 0.5)")
        if self.method == "wanda" and self.calibration is None:
            raise ValueError("method wanda needs 'calibration' data ({data: FILE, samples: 128, "
                             "seq_len: 2048}); method magnitude needs none")
        if self.method == "magnitude" and self.calibration is not None:
            raise ValueError("method magnitude uses no calibration data; remove 'calibration'")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        m = _NM.match(self.pattern)
        return (int(m.group(1)), int(m.group(2))) if m else None

    @property
    def effective_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity)

    @property
    def effective_group(self) -> str:
        return self.group or ("row" if self.method == "wanda" else "layer")


def run(inputs, params: PruneParams, ctx) -> dict:
    import time

    import torch

    from weightflow.ops.lib import models, wanda
    from weightflow.ops.lib.calibration import windows

    art = inputs["model"]
    if params.device == "cuda" and not torch.cuda.is_available():
        raise OpError("device: cuda, but no CUDA device is available")
    model = models.load_model(art.path, params.device)
    samples = None
    started = time.perf_counter()
    if params.method == "wanda":
        cal = params.calibration
        samples = windows(cal, ctx.data_path(cal.data), art.path, models.max_positions(model))
        if not samples:
            raise OpError(f"calibration data {cal.data} gave no samples")
        vocab = model.get_input_embeddings().num_embeddings
        top = max(int(s.max()) for s in samples)
        if top >= vocab:
            raise OpError(f"calibration token id {top} is outside the model's vocabulary ({vocab})")
    _, mods = models.blocks(model)
    with ctx.progress(len(mods), "calibrate and prune" if samples else "prune", unit="block") as bar:
        result = wanda.prune(
            model, method=params.method, sparsity=params.effective_sparsity, nm=params.nm,
            group=params.effective_group, include=params.include, exclude=params.exclude,
            samples=samples, batch_size=params.batch_size, pad=models.pad_id(model),
            device=params.device, progress=bar)
    ctx.info["prune_seconds"] = round(time.perf_counter() - started, 3)
    ctx.info["device"] = params.device
    meta = models.save_model(model.cpu(), art.path, ctx, params.dtype or ctx.dtype)

    per_block: dict[str, dict] = {}
    layer_of = re.compile(rf"^{re.escape(result.blocks)}\.(\d+)\.")
    for name, c in result.layers.items():
        b = per_block.setdefault(layer_of.match(name).group(1), {"zeros": 0, "numel": 0})
        b["zeros"] += c["zeros"]
        b["numel"] += c["numel"]
    zeros = sum(c["zeros"] for c in result.layers.values())
    numel = sum(c["numel"] for c in result.layers.values())
    return {
        **meta,
        "pruned_from": art.digest,
        "method": params.method,
        "pattern": params.pattern,
        "group": None if params.nm else params.effective_group,
        "target_sparsity": params.effective_sparsity,
        "calibration_samples": len(samples) if samples else 0,
        "calibration_tokens": int(sum(len(s) for s in samples)) if samples else 0,
        "sparsity": zeros / numel if numel else 0.0,
        "zeros": zeros,
        "numel": numel,
        "per_block": {k: {**v, "sparsity": v["zeros"] / v["numel"]} for k, v in per_block.items()},
        "layers": {k: {**v, "sparsity": v["zeros"] / v["numel"]} for k, v in result.layers.items()},
    }


def preflight(params: PruneParams, env) -> None:
    """A calibration .jsonl reads and has input_ids or the text field, before anything runs."""
    cal = params.calibration
    if cal is None:
        return
    path = env.data_path(cal.data)
    if path.suffix == ".jsonl":
        from weightflow.ops.lib.data import read_records

        rows = read_records(path, limit=1)
        if "input_ids" not in rows[0] and cal.text_field not in rows[0]:
            raise OpError(f"{path}: line 1 has neither 'input_ids' nor the text field '{cal.text_field}'")


OP = OpSpec[PruneParams](name="prune-wanda", version=1, output=Kind.MODEL, params=PruneParams, run=run,
                         doc=__doc__, preflight=preflight)
