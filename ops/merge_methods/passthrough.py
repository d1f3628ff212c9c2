"""``passthrough``: a model stacked from layer ranges of other models (a frankenmerge), or one
model copied as it is, as mergekit's passthrough with ``slices:``."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.lang.spec import ModelRef, OpParams
from weightflow.ops.lib.merging import MergeCommon, stream_merge
from weightflow.ops.lib.params import PerTensor
from weightflow.ops.merge_methods import MergeMethod

#: A tensor of a transformer block: ``<stack>.<index>.<rest>``, where the stack is a
#: Llama/Mistral/Qwen ``model.layers``, a BERT ``encoder.layer``, a GPT-2 ``transformer.h``,
#: a GPT-NeoX ``gpt_neox.layers``, an MPT ``transformer.blocks`` (with any prefix; the first
#: such name in a tensor name is the stack, so a block's own sub-lists stay inside the block).
LAYER_TENSOR = re.compile(r"^(?P<stack>(?:.+?\.)?(?:layers|layer|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
#: Non-layer tensors that come before the layers (embeddings); the others come after them.
BEFORE_LAYERS = re.compile(r"(^|\.)(embed_tokens|embeddings|embed_in|wte|wpe)(\.|$)")
#: config.json keys holding the number of layers, by architecture family.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class Slice(OpParams):
    """Layers ``layers[0]`` up to (not including) ``layers[1]`` of ``model``."""

    model: ModelRef = Field(description="step producing the model the layers come from")
    layers: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(
        description="half-open layer range [first, end), as mergekit's layer_range")
    scale: PerTensor | None = Field(None, description="factor on the slice's tensors (a number or per-tensor "
                                    "rules matched against the source tensor names, as mergekit's scale)")

    @field_validator("layers")
    @classmethod
    def _range(cls, layers: list[int]) -> list[int]:
        if layers[0] < 0 or layers[1] <= layers[0]:
            raise ValueError(f"layers must be [first, end) with 0 <= first < end, got {layers}")
        return layers


class PassthroughParams(MergeCommon):
    """Stacks ``slices`` (layer ranges of models, in order, renumbered from 0), or copies the one
    model of ``models``; an optional ``scale`` multiplies tensors.  The embeddings come from the
    first slice's model, the final norm and output head from the last slice's (as mergekit),
    both from ``base`` when it is set; config.json gets the new layer count, and per-layer
    lists (``layer_types``) are sliced with the layers."""

    method: Literal["passthrough"]
    slices: list[Slice] | None = Field(None, min_length=1, description="layer ranges to stack, in order")
    models: list[ModelRef] | None = Field(None, min_length=1, max_length=1,
                                          description="the one model to copy (instead of slices)")
    scale: PerTensor | None = Field(None, description="factor on the tensors of `models` (with slices, give "
                                    "each slice its own scale)")
    base: ModelRef | None = Field(None, description="step whose embeddings, final norm and head the result "
                                  "takes (default: first slice's embeddings, last slice's norm and head)")

    @model_validator(mode="after")
    def _slices_or_model(self):
        if (self.slices is None) == (self.models is None):
            raise ValueError("give either slices: [{model: STEP, layers: [first, end)}, ...] or models: [STEP]")
        if self.slices is not None and self.scale is not None:
            raise ValueError("with slices, give each slice its own scale")
        if self.models is not None and self.base is not None:
            raise ValueError("base: says where the embeddings and head of stacked slices come from; "
                             "it does not apply to models:")
        return self


def _layer_stack(ckpt) -> tuple[str | None, int]:
    """The layer stack prefix of a checkpoint and its number of layers (None, 0 if none)."""
    from weightflow.dsl.lang.diagnostics import OpError

    stacks: dict[str, int] = {}
    for name in ckpt.names():
        m = LAYER_TENSOR.match(name)
        if m:
            stacks[m["stack"]] = max(stacks.get(m["stack"], 0), int(m["index"]) + 1)
    if len(stacks) > 1:
        raise OpError(f"{ckpt.label} has more than one stack of layers ({', '.join(sorted(stacks))}); "
                      "slices need a model with one")
    return next(iter(stacks.items()), (None, 0))


def _sliced_config(cfg: dict, slice_configs: list[tuple[dict, int, int, int]], n_layers: int) -> dict:
    """``cfg`` with the new layer count, and every per-layer list (a list as long as its model's
    layer count, such as ``layer_types``) rebuilt from the slices' own configs."""
    from weightflow.dsl.lang.diagnostics import OpError

    out = dict(cfg)
    count_key = next((k for k in LAYER_COUNT_KEYS if isinstance(cfg.get(k), int)), None)
    if count_key is None:
        raise OpError(f"config.json names no layer count ({', '.join(LAYER_COUNT_KEYS)}) to set to {n_layers}")
    template_layers = cfg[count_key]
    out[count_key] = n_layers
    for key, value in cfg.items():
        if key == "architectures" or not isinstance(value, list) or len(value) != template_layers:
            continue
        joined: list = []
        for scfg, layers, lo, hi in slice_configs:
            own = scfg.get(key)
            if not isinstance(own, list) or len(own) != layers:
                raise OpError(f"config.json key '{key}' lists one value per layer, but a slice's model has "
                              f"{own!r} for its {layers} layers")
            joined.extend(own[lo:hi])
        out[key] = joined
    return out


class _Stacked:
    """The output checkpoint as a view: each output tensor name -> (source checkpoint, its name,
    scale); ``stream_merge`` writes it like any template."""

    def __init__(self, plan: list[tuple[str, Any, str, Any]]):
        from weightflow.ops.lib.tensors import TensorInfo

        self.entries = {out: (ckpt, src, scale) for out, ckpt, src, scale in plan}
        self.info = {out: TensorInfo(out, ckpt.info[src].dtype, ckpt.info[src].shape) for out, ckpt, src, _ in plan}

    def names(self) -> list[str]:
        return list(self.info)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def is_float(self, name: str) -> bool:
        ckpt, src, _ = self.entries[name]
        return ckpt.is_float(src)

    def is_sparse(self, name: str) -> bool:
        ckpt, src, _ = self.entries[name]
        return ckpt.is_sparse(src)

    def encoding(self, name: str) -> Any:
        ckpt, src, _ = self.entries[name]
        return ckpt.encoding(src) if hasattr(ckpt, "encoding") else None

    def file_of(self, name: str):
        ckpt, src, _ = self.entries[name]
        return ckpt.file_of(src)

    def get(self, name: str, start: int | None = None, stop: int | None = None):
        ckpt, src, _ = self.entries[name]
        return ckpt.get(src, start, stop)

    def close(self) -> None:
        for ckpt in {id(c): c for c, _, _ in self.entries.values()}.values():
            ckpt.close()


def _outside(ckpt) -> list[str]:
    return [n for n in ckpt.names() if not LAYER_TENSOR.match(n)]


def _check_slices(slices, open_ckpt) -> list[tuple[str, int]]:
    """Each slice's (stack, layer count), checked: ranges inside the model, one stack name."""
    from weightflow.dsl.lang.diagnostics import OpError

    stacks = []
    for s, art in slices:
        stack, n = _layer_stack(open_ckpt(art))
        if stack is None:
            raise OpError(f"model '{art.step}' has no layers (no tensor named like model.layers.N.*)")
        if s.layers[1] > n:
            raise OpError(f"slice layers {s.layers} of model '{art.step}': it has {n} layers (0 to {n - 1})")
        stacks.append((stack, n))
    names = sorted({st for st, _ in stacks})
    if len(names) > 1:
        raise OpError(f"the slices' models name their layers differently ({', '.join(names)})")
    return stacks


def _check_outside(reference, ckpts) -> None:
    """Every model holds the reference's non-layer tensors, with the same shapes, and no others."""
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.tensors import check_same_tensors

    for ckpt in ckpts:
        check_same_tensors(reference, ckpt, _outside(reference))
        extra = [n for n in _outside(ckpt) if n not in reference]
        if extra:
            raise OpError(f"architectures differ: tensor '{extra[0]}' is in {ckpt.label} but not in "
                          f"{reference.label}")


def _slice_plan(inputs, p: PassthroughParams, open_ckpt) -> tuple[list, Any, dict | None]:
    """(output name, checkpoint, source name, scale) per tensor, the template artifact (its side
    files and config travel), and the sliced config."""
    import json

    slices = [(s, inputs.at(("slices", i, "model"))) for i, s in enumerate(p.slices or [])]
    stacks = _check_slices(slices, open_ckpt)
    stack = stacks[0][0]
    (first, first_art), (last, last_art) = slices[0], slices[-1]
    base_art = inputs["base"] if p.base is not None else None
    if base_art is not None:
        head = open_ckpt(base_art)
        before, after = (head, None), (head, None)
    else:
        before, after = (open_ckpt(first_art), first.scale), (open_ckpt(last_art), last.scale)
    _check_outside(before[0], [open_ckpt(a) for _, a in slices])
    plan = [(n, before[0], n, before[1]) for n in _outside(before[0]) if BEFORE_LAYERS.search(n)]
    out_index = 0
    for s, art in slices:
        ckpt = open_ckpt(art)
        by_layer: dict[int, list[tuple[str, str]]] = {}
        for n in ckpt.names():
            m = LAYER_TENSOR.match(n)
            if m:
                by_layer.setdefault(int(m["index"]), []).append((n, m["rest"]))
        for layer in range(s.layers[0], s.layers[1]):
            plan += [(f"{stack}.{out_index}.{rest}", ckpt, n, s.scale) for n, rest in by_layer.get(layer, [])]
            out_index += 1
    plan += [(n, after[0], n, after[1]) for n in _outside(after[0]) if not BEFORE_LAYERS.search(n)]
    template = base_art or first_art

    def config_of(art) -> dict:
        path = art.path / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    config = None
    if (template.path / "config.json").is_file():
        per_slice = [(config_of(art), layers, s.layers[0], s.layers[1])
                     for (s, art), (_, layers) in zip(slices, stacks, strict=True)]
        config = _sliced_config(config_of(template), per_slice, out_index)
    return plan, template, config


def run(inputs, p: PassthroughParams, ctx) -> dict:
    import torch

    from weightflow.ops.lib import vocab
    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.tensors import Checkpoint, write_config

    opened: dict[str, Any] = {}

    def open_ckpt(art):
        if art.digest not in opened:
            opened[art.digest] = vocab.view(Checkpoint(art.path, label=f"model '{art.step}'"), art)
        return opened[art.digest]

    if p.models is not None:
        template = inputs["models"][0]
        ckpt = open_ckpt(template)
        plan, config = [(n, ckpt, n, p.scale) for n in ckpt.names()], None
    else:
        plan, template, config = _slice_plan(inputs, p, open_ckpt)
    stacked = _Stacked(plan)

    def compute(name, lo, hi):
        ckpt, src, scale = stacked.entries[name]
        t = ckpt.get(src, lo, hi).to(torch.float32)
        return t if scale is None else t * resolve(scale, src)

    dtype = p.dtype or ctx.dtype
    n = stream_merge(ctx, stacked, template.path, compute, dtype)
    if config is not None:
        write_config(ctx.out, config, dtype)
    for c in opened.values():
        c.close()
    return {"tensors": n}


METHOD = MergeMethod("passthrough", PassthroughParams, run=run, order=20)
