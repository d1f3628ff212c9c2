"""S3T: exact unlearning by sequence-aware sharded sliced training (Chowdhury et al., 2024).

The idea, in four parts:

- **Shards.** The training examples are split into ``shards`` disjoint parts.  Each shard gets
  a model of its own (the base plus LoRA adapters trained on that shard only), and the
  composite answers with their ensemble: the mean of the shard models' next-token (or class)
  probabilities.  A deletion request touches only the shards that hold the deleted rows.
- **Slices and layer groups.** Each shard is split into ``slices`` disjoint slices, and the
  model's transformer layers into as many contiguous *layer groups*, counted from the top
  (group 0 = the layers nearest the output; the paper trains top to bottom).  The adapters of
  a shard are trained in stages: stage ``l`` trains the LoRA adapters of group ``l`` alone,
  on the union of the first ``l+1`` slices of the slice order, with the groups trained before
  frozen and those after still zero (LoRA's B starts at zero, so an untrained adapter adds
  exactly nothing).  Group ``l``'s adapters have therefore seen slices ``order[0..l]`` and
  nothing else, and the model made of groups ``0..k-1`` is exactly what training the first
  ``k`` stages gives: it never saw ``order[k:]``.
- **Sequences.** Per shard, ``sequences`` (the budget B) slice orders are trained, each its
  own adapter stack.  The orders are rotations of ``0..L-1`` by evenly spread shifts
  (``shift_b = floor(b·L/B)``): with B = L every slice takes every position once, so whatever
  slice a deletion hits, some order has it last.
- **Deletion.** Deleting a row of slice ``j`` truncates, in every sequence of its shard, the
  adapters from the position of ``j`` onward (they saw ``j``); the composite keeps, per shard
  and sequence, the number of groups still active (``keep``), and each shard answers with the
  sequence whose active prefix is longest (ties: the first).  No gradient step is taken:
  the result equals, bit for bit, a composite whose sequences were trained only up to those
  prefixes.  A shard left with no active group answers with the base model.

The rows are assigned to shards and slices from the seed alone: the examples are ordered by
``sha256(f"{seed}:s3t-rows:{i}")`` and the ordered list is cut into ``shards`` near-equal
parts, each into ``slices`` near-equal parts.  A row is its position in the data file
(0-based: the i-th example), or its ``id_field`` value.

Stored (see ops/lib/composite.py): ``composite.json`` with rule ``s3t``; ``base/`` (the model
the adapters apply to); ``adapters/`` with ``adapter_config.json`` (peft's LoRA config) and
one ``s{shard}-q{sequence}-g{group}.safetensors`` per trained, still active adapter, tensors
named as peft saves them.  A deactivated adapter is not copied into the new composite: what
it learned is gone from the artifact, not just switched off.  The params record the schedule
(``sequences``, ``layer_groups``), the rows of each slice, ``keep``, the deleted rows and each
adapter file's digest (so the composite's digest binds every file to its place).

Loading builds, per shard, base + the active adapters of its chosen sequence merged into the
weights (W + alpha/r · B·A), and averages the shard models' probabilities (mean_probs).
This module imports torch only inside functions: the schedule part is used by torch-free code.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weightflow.dsl.lang.diagnostics import OpError

RULE = "s3t"
BASE = "base"
ADAPTERS = "adapters"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# the block index in a module name: Llama/Mistral/Qwen "layers.3", BERT "layer.3", GPT-2 "h.3"
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


# -- the schedule (no torch) --------------------------------------------------------------

def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``parts`` contiguous near-equal runs, the longer ones first."""
    q, r = divmod(len(items), parts)
    out, at = [], 0
    for i in range(parts):
        n = q + (1 if i < r else 0)
        out.append(list(items[at: at + n]))
        at += n
    return out


def assign(n_examples: int, shards: int, slices: int, seed: int) -> list[list[list[int]]]:
    """Example indices per shard and slice: ``[shard][slice] -> sorted indices``.

    The examples are ordered by a seeded hash (the same on every machine and Python), cut
    into shards, each shard into slices."""
    if n_examples < shards * slices:
        raise OpError(f"S3T needs at least shards × slices = {shards * slices} training examples (one per "
                      f"slice); the data has {n_examples}")
    ranked = sorted(range(n_examples),
                    key=lambda i: hashlib.sha256(f"{seed}:s3t-rows:{i}".encode()).digest())
    return [[sorted(part) for part in split(shard, slices)] for shard in split(ranked, shards)]


def sequence_orders(slices: int, budget: int) -> list[list[int]]:
    """``budget`` slice orders: rotations of ``0..slices-1`` by ``floor(b·slices/budget)``."""
    if not 1 <= budget <= slices:
        raise OpError(f"sequences must be between 1 and slices ({slices}), got {budget}")
    shifts = [b * slices // budget for b in range(budget)]
    return [[(i + k) % slices for i in range(slices)] for k in shifts]


def layer_groups(n_layers: int, slices: int) -> list[list[int]]:
    """The layer indices of each group, group 0 the top ones (trained first)."""
    if n_layers < slices:
        raise OpError(f"S3T trains one layer group per slice: the model has {n_layers} layer(s), fewer than "
                      f"slices: {slices}")
    return [sorted(g) for g in split(list(range(n_layers - 1, -1, -1)), slices)]


def group_of(name: str, groups: list[list[int]]) -> int:
    """The layer group a parameter (or state-dict key) belongs to: by its block index; outside
    the blocks, embeddings go with the bottom group, everything else (heads) with the top."""
    m = _LAYER.search(name)
    if m is not None:
        layer = int(m.group(1))
        return next(g for g, layers in enumerate(groups) if layer in layers)
    return len(groups) - 1 if "embed" in name else 0


def adapter_name(shard: int, sequence: int, group: int) -> str:
    return f"s{shard}-q{sequence}-g{group}"


def chosen(keep: Sequence[int]) -> int:
    """The sequence a shard answers with: the longest active prefix, the first on ties."""
    return max(range(len(keep)), key=lambda b: (keep[b], -b))


def _canon(row_id: Any) -> str:
    """Row ids are matched by their text: 3 and "3" are the same row."""
    return str(row_id)


def check_params(params: Any, where: str) -> dict:
    """An s3t composite's params, checked enough that loading and deleting never trip on them."""
    try:
        shards, slices = int(params["shards"]), int(params["slices"])
        orders, groups, rows, keep = params["sequences"], params["layer_groups"], params["rows"], params["keep"]
        ok = (len(orders) >= 1 and all(sorted(o) == list(range(slices)) for o in orders)
              and len(groups) == slices and len(rows) == shards and all(len(r) == slices for r in rows)
              and len(keep) == shards and all(len(k) == len(orders) and all(0 <= int(n) <= slices for n in k)
                                              for k in keep)
              and isinstance(params["adapters"], dict))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise OpError(f"{where}: not a well-formed S3T schedule (shards, slices, sequences, layer_groups, rows, "
                      "keep, adapters)")
    return params


# -- deletion (no torch) ------------------------------------------------------------------

def _classify(params: dict, requested: Sequence[Any]) -> tuple[dict[int, set[int]], list, list, list]:
    """The requested rows sorted out: (shard -> slices hit, rows to delete now, rows deleted
    before, rows never trained on); unknown ids are an error."""
    rows = params["rows"]
    where_is = {_canon(r): (s, j) for s, shard in enumerate(rows) for j, sl in enumerate(shard) for r in sl}
    untrained = {_canon(r) for r in params.get("untrained_rows", [])}
    deleted_before = {_canon(r) for r in params.get("deleted_rows", [])}
    seen: set[str] = set()
    hits: dict[int, set[int]] = {}
    new_deleted, already, untrained_hit, unknown = [], [], [], []
    for r in requested:
        c = _canon(r)
        if c in seen:
            continue
        seen.add(c)
        if c in where_is:
            s, j = where_is[c]
            hits.setdefault(s, set()).add(j)
            new_deleted.append(r)
        elif c in deleted_before:
            already.append(r)
        elif c in untrained:
            untrained_hit.append(r)
            new_deleted.append(r)
        else:
            unknown.append(r)
    if unknown:
        what = (f"its id_field '{params['id_field']}' values" if params.get("id_field")
                else "positions 0.. of the examples in its training data")
        shown = ", ".join(map(repr, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        raise OpError(f"rows: {len(unknown)} row id(s) the S3T composite was not trained with: {shown} "
                      f"(its rows are {what})")
    return hits, new_deleted, already, untrained_hit


def plan_deletion(params: dict, requested: Sequence[Any]) -> tuple[dict, dict]:
    """The params after deleting ``requested`` rows, and what changed (for the manifest)."""
    rows, keep, orders = params["rows"], params["keep"], params["sequences"]
    hits, new_deleted, already, untrained_hit = _classify(params, requested)
    gone = {_canon(r) for r in new_deleted}
    new_rows = [[[r for r in sl if _canon(r) not in gone] for sl in shard] for shard in rows]
    new_keep = [list(k) for k in keep]
    shards_info = []
    dropped_all: list[str] = []
    for s in sorted(hits):
        dropped = []
        for b, order in enumerate(orders):
            cut = min(order.index(j) for j in hits[s])
            old = new_keep[s][b]
            if cut < old:
                dropped += [adapter_name(s, b, g) for g in range(cut, old)]
                new_keep[s][b] = cut
        b = chosen(new_keep[s])
        entry = {"shard": s, "slices_hit": sorted(hits[s]), "dropped": dropped, "keep": new_keep[s],
                 "chosen_sequence": b, "slices_kept": new_keep[s][b]}
        if new_keep[s][b] == 0:
            entry["note"] = ("every sequence of this shard lost its first slice: the shard now answers with "
                             "the base model")
        shards_info.append(entry)
        dropped_all += dropped
    new_params = {**params, "rows": new_rows, "keep": new_keep,
                  "adapters": {n: d for n, d in params["adapters"].items() if n not in set(dropped_all)},
                  "deleted_rows": list(params.get("deleted_rows", [])) + new_deleted,
                  "untrained_rows": [r for r in params.get("untrained_rows", []) if _canon(r) not in gone]}
    info = {"deleted_rows": len(new_deleted), "dropped_adapters": len(dropped_all), "shards": shards_info,
            "untouched_shards": [s for s in range(len(rows)) if s not in hits],
            "slices_kept_per_shard": [k[chosen(k)] for k in new_keep]}
    if already:
        info["already_deleted"] = already
    if untrained_hit:
        info["never_trained_on"] = untrained_hit  # dropped by the encoder (no token to predict)
    return new_params, info


def read_row_ids(path: Path, field: str) -> list[Any]:
    """Row ids from a file: ``.txt`` one a line; ``.json`` a list of ids; ``.jsonl``, ``.csv``,
    ``.parquet`` (or a ``.json`` list of objects) records holding them in ``field``."""
    from weightflow.ops.lib.data import read_records

    path = Path(path)
    if not path.is_file():
        raise OpError(f"rows_file not found: {path}")
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise OpError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(doc, list) and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in doc):
            return doc
    records = read_records(path)
    missing = next((i for i, r in enumerate(records) if field not in r), None)
    if missing is not None:
        raise OpError(f"{path}: example {missing} has no '{field}' field (the row id; set rows_field)")
    return [r[field] for r in records]


# -- training ----------------------------------------------------------------------------

def row_ids(path: Path, params: Any, n_records: int) -> list[Any]:
    """The id of each record of the data file: its position, or its ``id_field`` value."""
    from weightflow.ops.lib.data import read_records

    if params.id_field is None:
        return list(range(n_records))
    records = read_records(path, params.limit)
    ids: list[Any] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        v = r.get(params.id_field)
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise OpError(f"{path}: example {i}: id_field '{params.id_field}' must hold an integer or a string, "
                          f"got {v!r}")
        if _canon(v) in seen:
            raise OpError(f"{path}: examples {seen[_canon(v)]} and {i} have the same id {v!r} "
                          f"(id_field '{params.id_field}' must be unique)")
        seen[_canon(v)] = i
        ids.append(v)
    return ids


def fit(model_dir: Path, params: Any, ctx, task: str, stop: dict[tuple[int, int], int] | None = None) -> dict:
    """Train an S3T composite into ``ctx.out``; returns the artifact's metadata.

    ``stop[(shard, sequence)] = k`` trains only the first ``k`` stages of that sequence (the
    reference a deletion must equal); by default every stage is trained."""
    from weightflow.ops.lib import composite
    from weightflow.ops.lib import training as T
    from weightflow.ops.lib.data import read_records

    shards, slices, budget = params.shards or 1, params.slices, params.sequences or 1
    orders = sequence_orders(slices, budget)
    with T.deterministic(ctx.seed, params.device):
        base = T.load_model(model_dir, task, ctx)
        encoder, data = T.prepare(base, params, task, model_dir, ctx, {"data": params.data})
        train, kept = data["data"], list(encoder.kept)
        data_path = ctx.data_path(params.data)
        ids = row_ids(data_path, params, len(read_records(data_path, params.limit)))
        n_layers = getattr(base.config, "num_hidden_layers", None)
        if not isinstance(n_layers, int):
            raise OpError("S3T needs the model's number of layers (config num_hidden_layers)")
        groups = layer_groups(n_layers, slices)
        parts = assign(len(train), shards, slices, ctx.seed)
        _write_base(base, model_dir, task, ctx)
        (ctx.out / ADAPTERS).mkdir()
        digests: dict[str, str] = {}
        keep: list[list[int]] = []
        stages: list[dict] = []
        for s in range(shards):
            keep.append([])
            for b, order in enumerate(orders):
                n_train = slices if stop is None else stop.get((s, b), slices)
                sequence = _Sequence(base, params, ctx, task, groups, [[train[e] for e in sl] for sl in parts[s]],
                                encoder.pad_id, (s, b))
                stages += [sequence.stage(pos, order) for pos in range(n_train)]
                digests |= sequence.save(n_train)
                keep[s].append(n_train)
    trained = set(kept)
    spec_params = {
        "shards": shards, "slices": slices, "sequences": orders, "layer_groups": groups,
        "rows": [[[ids[kept[e]] for e in sl] for sl in shard] for shard in parts],
        "untrained_rows": [ids[i] for i in range(len(ids)) if i not in trained],
        "deleted_rows": [], "id_field": params.id_field, "keep": keep, "adapters": digests,
        "task": task, "aggregate": "mean_probs",
    }
    composite.write_spec(ctx.out, RULE, spec_params, {BASE: BASE, ADAPTERS: ADAPTERS}, BASE)
    ctx.info.update({"summary": {"task": task, "examples": len(train), "shards": shards, "slices": slices,
                                 "sequences": budget, "adapters": len(digests),
                                 "examples_per_slice": [[len(sl) for sl in shard] for shard in parts]},
                     "stages": stages})
    return {"rule": RULE, "task": task, "shards": shards, "slices": slices, "sequences": budget,
            "adapters": len(digests)}


def _write_base(base, model_dir: Path, task: str, ctx) -> None:
    """The base component: the input's files when they are used as they are, else the model as
    loaded (a classification head initialised from the seed, the label names set)."""
    import tempfile

    from weightflow.ops.lib import composite
    from weightflow.ops.lib.models import WEIGHT_SIDE_FILES, architectures
    from weightflow.ops.lib.tensors import side_files

    if task == "causal-lm" and any(a.endswith("ForCausalLM") for a in architectures(model_dir)):
        composite.add_component(ctx.out, BASE, model_dir)
        return
    with tempfile.TemporaryDirectory(dir=ctx.out.parent) as tmp:
        base.save_pretrained(tmp, safe_serialization=True)
        for f in side_files(Path(model_dir)):
            if f.name not in WEIGHT_SIDE_FILES and not (Path(tmp) / f.name).exists():
                (Path(tmp) / f.name).write_bytes(f.read_bytes())
        composite.add_component(ctx.out, BASE, Path(tmp))


class _Sequence:
    """One slice sequence of one shard: a fresh LoRA stack on a copy of the base, trained stage
    by stage.  Everything random is seeded by (seed, shard, sequence[, stage]) alone, so stage
    ``l`` computes the same bytes whether or not later stages follow."""

    def __init__(self, base, params, ctx, task: str, groups: list[list[int]], slices: list[list], pad: int,
                 where: tuple[int, int]):
        import copy

        import torch

        from weightflow.ops.lib import training as T

        self.params, self.ctx, self.task, self.groups, self.slices, self.pad = params, ctx, task, groups, slices, pad
        self.shard, self.seq = where
        torch.manual_seed(T.derived_seed(ctx.seed, f"s3t:{self.shard}:{self.seq}:lora"))
        self.model = T.attach_lora(copy.deepcopy(base), params.lora, task)
        if params.gradient_checkpointing:
            T.enable_checkpointing(self.model, True)
        self.trainable = {n: group_of(n, groups) for n, p in self.model.named_parameters() if p.requires_grad}
        empty = sorted(set(range(len(groups))) - set(self.trainable.values()))
        if empty:
            raise OpError(f"lora.target_modules adapt no module of layer group(s) {empty} (layers "
                          f"{[groups[g] for g in empty]}): S3T needs adapters in every group")
        self.model.to(params.device)

    def stage(self, pos: int, order: list[int]) -> dict:
        """Train group ``pos`` alone on the slices ``order[0..pos]``; the others frozen."""
        import torch

        from weightflow.ops.lib import training as T

        p, ctx, tag = self.params, self.ctx, f"s3t:{self.shard}:{self.seq}:{pos}"
        examples = [e for j in order[: pos + 1] for e in self.slices[j]]
        for n, param in self.model.named_parameters():
            if n in self.trainable:
                param.requires_grad_(self.trainable[n] == pos)
        torch.manual_seed(T.derived_seed(ctx.seed, tag))
        shuffle = p.shuffle_seed if p.shuffle_seed is not None else ctx.seed
        batches = T.batch_order(len(examples), p.batch_size, T.derived_seed(shuffle, tag))

        def micro_loss():
            batch = T.collate([examples[i] for i in next(batches)], self.pad, self.task, p.device)
            nll_sum, n_tok, _ = T.sequence_nll(self.model, batch, self.task)
            loss = T.mean_nll(nll_sum, n_tok)
            return loss, {"loss": loss.detach()}

        steps = T.total_steps(p, len(examples))
        curve = T.train(self.model, p, ctx, steps, micro_loss)
        return {"shard": self.shard, "sequence": self.seq, "group": pos, "slices": order[: pos + 1],
                "examples": len(examples), "steps": steps, "loss_first": curve[0].get("loss"),
                "loss_last": curve[-1].get("loss")}

    def save(self, n_groups: int) -> dict[str, str]:
        """Groups ``0..n_groups-1`` as one adapter file each (peft names); their digests."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        from weightflow.dsl.format.checkpoint import hash_file

        self.model.to("cpu")
        adapters = self.ctx.out / ADAPTERS
        if not (adapters / ADAPTER_CONFIG).is_file():
            (adapters / ADAPTER_CONFIG).write_text(json.dumps(_peft_config(self.model), indent=2, sort_keys=True)
                                                   + "\n")
        state = get_peft_model_state_dict(self.model)
        digests = {}
        for g in range(n_groups):
            name = adapter_name(self.shard, self.seq, g)
            path = adapters / f"{name}.safetensors"
            save_file({k: v.detach().float().contiguous() for k, v in sorted(state.items())
                       if group_of(k, self.groups) == g}, str(path), metadata={"format": "pt"})
            digests[name] = hash_file(path)
        return digests


def _peft_config(peft_model) -> dict:
    """peft's adapter_config.json content, stable: no paths or versions, lists sorted."""
    cfg = peft_model.peft_config["default"].to_dict()
    out = {}
    for k, v in cfg.items():
        if isinstance(v, set):
            v = sorted(v)
        elif hasattr(v, "value"):  # enums (task_type, peft_type)
            v = v.value
        out[k] = v
    out["base_model_name_or_path"] = None
    out.pop("peft_version", None)
    for key in ("target_modules", "modules_to_save"):
        if isinstance(out.get(key), list):
            out[key] = sorted(out[key])
    return json.loads(json.dumps(out, sort_keys=True, default=str))


# -- writing a deletion, loading ----------------------------------------------------------

def write_deleted(src: Path, requested: Sequence[Any], out: Path) -> tuple[dict, dict]:
    """The composite ``src`` without the adapters that saw ``requested`` rows, written to ``out``.

    Returns (the new params, what changed)."""
    from weightflow.ops.lib import composite

    src = Path(src)
    spec = composite.read_spec(src)
    if spec["rule"] != RULE:
        raise OpError(f"s3t-delete needs an S3T composite (a finetune step with slices:); this one is a "
                      f"'{spec['rule']}' composite")
    params = check_params(spec.get("params"), str(src / composite.FILE))
    new_params, info = plan_deletion(params, requested)
    composite.add_component(out, BASE, src / spec["components"][BASE])
    dst = Path(out) / ADAPTERS
    dst.mkdir()
    srcdir = src / spec["components"][ADAPTERS]
    composite._link_or_copy(srcdir / ADAPTER_CONFIG, dst / ADAPTER_CONFIG)
    for name in sorted(new_params["adapters"]):
        composite._link_or_copy(srcdir / f"{name}.safetensors", dst / f"{name}.safetensors")
    composite.write_spec(out, RULE, new_params, {BASE: BASE, ADAPTERS: ADAPTERS}, BASE)
    return new_params, info


def load(path: Path, spec: dict, device: str = "cpu"):
    """The composite's module: per shard, base + the active adapters of its chosen sequence."""
    import copy

    from safetensors.torch import load_file

    from weightflow.ops.lib import composite, models

    path = Path(path)
    params = check_params(spec.get("params"), str(path / composite.FILE))
    adir = path / spec["components"][ADAPTERS]
    try:
        cfg = json.loads((adir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        scaling = float(cfg["lora_alpha"]) / float(cfg["r"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise OpError(f"{adir / ADAPTER_CONFIG}: not a readable LoRA config ({exc})") from None
    transpose = bool(cfg.get("fan_in_fan_out"))
    base = models.load_model(path / spec["components"][BASE], device)
    members: dict[str, Any] = {}
    for s, keep in enumerate(params["keep"]):
        b = chosen(keep)
        if keep[b] == 0:
            members[f"shard{s}"] = base  # nothing active: the base itself (shared, not copied)
            continue
        model = copy.deepcopy(base)
        for g in range(keep[b]):
            f = adir / f"{adapter_name(s, b, g)}.safetensors"
            if not f.is_file():
                raise OpError(f"{path}: the active adapter {f.name} is missing from the composite")
            _merge(model, load_file(str(f), device=str(device)), scaling, transpose, f)
        members[f"shard{s}"] = model
    inner = {"rule": RULE, "primary": "shard0", "components": {m: m for m in members}}
    return composite._module(inner, members, {"aggregate": params.get("aggregate", "mean_probs")}, {})


def _merge(model, tensors: dict, scaling: float, transpose: bool, where: Path) -> None:
    """W += scaling · B·A for each LoRA pair (peft names); full tensors (heads) replace."""
    import torch

    names = {n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n: t for n, t in tensors.items()}
    with torch.no_grad():
        for name, t in sorted(names.items()):
            try:
                if ".lora_A." in name or ".lora_embedding_A" in name:
                    embedding = ".lora_embedding_A" in name
                    module = name.split(".lora_embedding_A" if embedding else ".lora_A.")[0]
                    b_name = name.replace("lora_embedding_A", "lora_embedding_B") if embedding else \
                        name.replace(".lora_A.", ".lora_B.")
                    delta = (names[b_name].float() @ t.float()) * scaling
                    if embedding or transpose:
                        delta = delta.T
                    weight = model.get_parameter(f"{module}.weight")
                    weight.add_(delta.to(weight.dtype))
                elif ".lora_B." in name or ".lora_embedding_B" in name:
                    continue
                else:
                    target = model.get_parameter(name)
                    target.copy_(t.to(target.dtype))
            except (KeyError, AttributeError, RuntimeError) as exc:
                raise OpError(f"{where}: tensor '{name}' does not fit the base model ({exc})") from None
