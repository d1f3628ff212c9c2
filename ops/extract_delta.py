"""``extract-delta``: the task vector of a fine-tune, model minus base, tensor by tensor.

Only floating-point tensors are differenced; ``include``/``exclude`` globs restrict
which tensors the delta carries (a tensor left out is treated as a zero delta by
later steps, e.g. RWS-style shallow-layer patches).  Deltas are stored in float32,
whatever the models' dtype, so the difference is not rounded away.  The Delta
remembers the digest of the base it was taken against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import Kind, ModelRef, OpParams, OpSpec


class ExtractDeltaParams(OpParams):
    model: ModelRef = Field(description="step producing the fine-tuned model")
    base: ModelRef = Field(description="step producing the base model the delta is taken against")
    include: list[str] | None = Field(None, description="tensor-name globs to keep (default: all)")
    exclude: list[str] = Field(default_factory=list, description="tensor-name globs to drop")


DELTA_PREFIX = "delta"


# -- preflight: both sides must have the same head (torch-free) ---------------------

_TASK_OF_SUFFIX = {"ForSequenceClassification": "sequence-classification", "ForCausalLM": "causal-lm"}
_TRAINING_OPS = ("finetune", "unlearn")  # ops whose ``task`` may give the model a new head


@dataclass(frozen=True)
class _Head:
    """What a step's model is, as far as the pipeline and the source's config.json tell."""

    kind: str    # 'sequence-classification', 'causal-lm', or an architecture name ('BertModel')
    step: str    # the step that decided it (a load, or a training step with task:)
    how: str     # how, in words: "loaded with task: sequence-classification"


def _saved_architecture(params, base_dir: Path) -> str | None:
    """The architecture a local model directory's config.json names (None if unknown)."""
    if params.config is not None:
        archs = params.config.get("architectures") or []
    elif params.source is None or params.source.startswith("hf:") or params.gguf_file \
            or params.source.endswith(".gguf"):
        return None  # a hub model's config is not fetched in a preflight
    else:
        src = Path(params.source).expanduser()
        src = src if src.is_absolute() else base_dir / src
        try:
            archs = json.loads((src / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            return None
    return str(archs[0]) if archs and isinstance(archs[0], str) else None


def _head_of(pipeline, name: str, depth: int = 0) -> _Head | None:
    """The head of step ``name``'s model: a load's ``task`` (or its saved architecture),
    a training step's ``task``, else that of the step's first model input (merge, prune).
    None when the pipeline cannot tell (a hub source, a very deep chain)."""
    step = pipeline.steps.get(name)
    if step is None or depth > 64:
        return None
    params = step.params
    task = getattr(params, "task", "auto")
    if step.op.name == "load":
        if task != "auto":
            return _Head(task, name, f"loaded with task: {task}")
        arch = _saved_architecture(params, pipeline.base_dir)
        if arch is None:
            return None
        kind = next((t for suffix, t in _TASK_OF_SUFFIX.items() if arch.endswith(suffix)), arch)
        return _Head(kind, name, "loaded without task:" + ("" if kind == arch else f", saved as {arch}"))
    if step.op.name in _TRAINING_OPS and task != "auto":
        return _Head(task, name, f"trained with task: {task}")
    for edge in step.inputs:
        if Kind.MODEL in edge.kinds:
            return _head_of(pipeline, edge.source, depth + 1)
    return None


def _describe(head: _Head) -> str:
    what = f"a {head.kind} model" if head.kind in _TASK_OF_SUFFIX.values() else f"a {head.kind}"
    return f"{what} (step '{head.step}' {head.how})"


def preflight(params: ExtractDeltaParams, env) -> None:
    """Before any step runs: refuse a model and base whose heads differ.

    Their tensor names would not line up (a classifier's ``bert.`` prefix and
    ``classifier.*`` against a bare encoder), and that used to surface only after the
    fine-tune, as "architectures differ".  The fix is almost always to load the base
    with the same ``task`` as the model, so say that.
    """
    pipeline = getattr(env, "pipeline", None)
    if pipeline is None:
        return
    model, base = _head_of(pipeline, params.model), _head_of(pipeline, params.base)
    if model is None or base is None:
        return
    # Only a classification head on one side is certain to break the names: a causal LM
    # may be saved as e.g. GPT2LMHeadModel, which `task: causal-lm` loads unchanged.
    clf = "sequence-classification"
    if (model.kind == clf) == (base.kind == clf):
        return
    if model.kind == clf:
        fix = (f"load the base with the same head: add `task: {clf}` to step '{base.step}' "
               "(with the same num_labels or labels)")
    else:
        fix = f"load the model with the same head: add `task: {clf}` to step '{model.step}'"
    raise OpError(f"model '{params.model}' is {_describe(model)} but base '{params.base}' is "
                  f"{_describe(base)}: their tensors would not line up, so the delta would fail after "
                  f"every step before it has run; {fix}")


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
                                params=ExtractDeltaParams, run=run, doc=__doc__, preflight=preflight)
