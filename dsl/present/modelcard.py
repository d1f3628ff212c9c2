"""Hugging Face model cards for exports: where a model came from, how it was made, how it scored.

An exported model directory is what people share (``huggingface-cli upload``); the card
``README.md`` is what the Hub shows of it.  mergekit writes its config there; ours carries
the whole lineage instead, because a merge is only reviewable with its upstream steps (an
exported TIES merge says nothing about the DARE ``drop_rate`` two steps up otherwise):

- YAML front matter as the Hub's model card metadata reads it: ``base_model`` (the hub ids
  of the loaded models the export descends from; local sources are not hub ids, so they
  are described in the text instead), ``base_model_relation``, ``library_name``,
  ``pipeline_tag``, ``tags`` (``weightflow`` and what the lineage did: ``merge``,
  ``pruned``, ``unlearned``, ``fine-tuned``...) and ``model-index`` with the scores of
  every report in the pipeline's lock that evaluated exactly this digest;
- every step back to each loaded source: op, parameters (as the stored recipe recorded
  them, inputs by step name), key and digest, as a table and as a YAML recipe;
- the pipeline's path relative to its git repository and weightflow's version.

The card depends only on the lock file, the store and the pipeline file (no network, no
torch) and holds no timestamps, so exporting the same thing twice writes the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weightflow.dsl.format.text import fmt
from weightflow.dsl.lang.diagnostics import WeightflowError

CARD_FILE = "README.md"

# What each op of the lineage adds to the card's tags (an op not listed adds its own name).
_OP_TAGS = {"merge": ["merge"], "dare-prune": ["dare"], "prune-wanda": ["pruned"],
            "unlearn": ["unlearned"], "finetune": ["fine-tuned"], "extract-delta": [], "load": [],
            "evaluate": []}
# The Hub's pipeline tag (and model-index task type) from the task weightflow recorded.
_PIPELINE_TAGS = {"causal-lm": "text-generation", "sequence-classification": "text-classification"}
# Recipe keys that are the op's bookkeeping, not a parameter a reader set.
_NOT_PARAMS = {"external"}


@dataclass
class Node:
    """One step of an export's lineage, as the lock file and the store know it."""

    name: str
    op: str
    key: str | None
    digest: str | None
    params: dict[str, Any]
    inputs: list[str] = field(default_factory=list)  # upstream step names, in field order
    source: dict[str, Any] | None = None  # a load step's manifest info.source
    from_pipeline: bool = False  # params read from the pipeline file (the store has no entry)


def repository_path(pipeline_path: Path) -> str:
    """The pipeline's path relative to the top of its git work tree (where ``.git`` is), or
    its file name outside git: an absolute path would publish the user's home layout."""
    path = Path(pipeline_path).resolve()
    for parent in path.parents:
        if (parent / ".git").exists():
            return path.relative_to(parent).as_posix()
    return path.name


def _render(value: Any, written: Any, names: dict[str, str]) -> Any:
    """A recipe value for people: ``{"input": digest}`` becomes the step's name and
    ``{"file": digest}`` the path the pipeline wrote (the key has the content digest)."""
    if isinstance(value, dict):
        if set(value) == {"input"} and isinstance(value["input"], str):
            return names.get(value["input"], f"object {value['input'][:12]}")
        if set(value) == {"file"} and isinstance(value["file"], str):
            return written if isinstance(written, str) else f"file with digest {value['file'][:12]}"
        fields = written if isinstance(written, dict) else {}
        return {k: _render(v, fields.get(k), names) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        items = written if isinstance(written, list) else []
        return [_render(v, items[i] if i < len(items) else None, names) for i, v in enumerate(value)]
    return value


def source_text(source: dict | None) -> str:
    """Where a load step read its model, in words (from its manifest's ``info.source``)."""
    if not isinstance(source, dict):
        return "an unrecorded source"
    if source.get("hf"):
        return f"hf:{source['hf']}" + (f"@{source['commit']}" if source.get("commit") else "")
    if source.get("directory"):
        return f"local directory {source['directory']}"
    if source.get("gguf"):
        return f"GGUF file {source['gguf']}"
    if "config" in source:
        return f"random initialisation (seed {source.get('init_seed')}) from a config"
    return json.dumps(source, sort_keys=True)


def lineage(pipeline, store, step: str, lock: dict | None = None,
            warn: Callable[[str], None] | None = None) -> list[Node]:
    """``step`` and every step it descends from, sources first (pipeline order).

    Names and edges come from the pipeline, keys and digests from its lock file, the
    parameters from the stored manifest of each locked key (what really made the digest,
    even where the pipeline file was edited since); only a step whose entry the store lacks
    falls back to the pipeline's parameters, and says so."""
    from weightflow.dsl.lang import graph
    from weightflow.dsl.store import lockfile

    lock = lockfile.read(pipeline.lock_path) if lock is None else lock
    need = graph.needed(pipeline, [step])
    names = {e.digest: n for n, e in lock.items() if n in need}
    out = []
    for name in graph.topo_order(pipeline):
        if name not in need:
            continue
        spec = pipeline.steps[name]
        locked = lock.get(name)
        entry = store.lookup(locked.key, warn=warn, touch=False) if locked else None
        written = spec.params_json()
        if entry is not None and isinstance((entry.manifest.get("recipe") or {}).get("params"), dict):
            params = _render(entry.manifest["recipe"]["params"], written, names)
            from_pipeline = False
        else:
            params = {k: v for k, v in written.items() if v is not None}
            from_pipeline = True
        params = {k: v for k, v in params.items() if k not in _NOT_PARAMS}
        source = ((entry.manifest.get("info") or {}).get("source") if entry is not None else None)
        if spec.op.name == "load" and source is None and isinstance(written.get("source"), str):
            source = _source_from_text(written["source"])
        out.append(Node(name, spec.op.name, locked.key if locked else None, locked.digest if locked else None,
                        params, list(dict.fromkeys(e.source for e in spec.inputs)), source, from_pipeline))
    return out


def _source_from_text(text: str) -> dict:
    """A source as the pipeline wrote it (only when the store has no manifest for it)."""
    if text.startswith("hf:"):
        repo, _, rev = text[3:].partition("@")
        return {"hf": repo, **({"commit": rev} if rev else {})}
    return {"directory": Path(text).name}


def hub_bases(nodes: list[Node], step: str | None = None) -> list[str]:
    """The hub ids of the loaded sources ``step`` (default: the last node) descends from."""
    by_name = {n.name: n for n in nodes}
    seen: list[str] = []
    todo = [step or nodes[-1].name]
    roots: list[Node] = []
    while todo:
        n = by_name.get(todo.pop(0))
        if n is None or n.name in seen:
            continue
        seen.append(n.name)
        if n.op == "load":
            roots.append(n)
        todo += n.inputs
    order = [n.name for n in nodes]
    roots.sort(key=lambda n: order.index(n.name))
    return list(dict.fromkeys(str(n.source["hf"]) for n in roots if isinstance(n.source, dict) and n.source.get("hf")))


def _tags(nodes: list[Node], kind: str, layout: str) -> list[str]:
    tags = ["weightflow"]
    for n in nodes:
        tags += _OP_TAGS.get(n.op, [n.op])
        method = n.params.get("method")
        if n.op in ("merge", "prune-wanda", "unlearn") and isinstance(method, str):
            tags.append(method)
        if n.params.get("lora"):
            tags.append("lora")
    if kind == "Delta":
        tags.append("task-vector")
    if layout == "peft":
        tags += ["peft", "lora"]
    return list(dict.fromkeys(tags))


def _relation(nodes: list[Node], layout: str) -> str | None:
    """``base_model_relation`` as the Hub defines it (adapter, merge, finetune, quantized)."""
    if layout == "peft":
        return "adapter"
    ops = {n.op for n in nodes}
    if "merge" in ops:
        return "merge"
    if ops & {"finetune", "unlearn"}:
        return "finetune"
    return None


# -- scores -------------------------------------------------------------------------------

@dataclass
class Score:
    report: str         # the evaluate step
    label: str          # the metric's label in that report
    metric: str         # the metric's name
    column: str
    value: float
    better: str | None
    dataset: str | None  # the data file the pipeline names for the metric, when it names one

    @property
    def title(self) -> str:
        return self.label if self.column == self.label else f"{self.label} {self.column}"


def scores(pipeline, store, digest: str, warn: Callable[[str], None] | None = None) -> list[Score]:
    """Every value that a report of this pipeline (its locked, stored Report steps) gives
    for the model with ``digest``; columns a report does not chart (counts) are left out."""
    from weightflow.dsl.present.report import collect

    try:
        docs = collect(pipeline, store, warn=warn)
    except WeightflowError as exc:  # a card without scores beats no export
        if warn:
            warn(f"the model card has no scores: {exc}")
        return []
    out: list[Score] = []
    for doc in docs:
        report = doc.get("report") or {}
        rows = [i for i, m in enumerate(report.get("models") or []) if m.get("digest") == digest]
        if not rows:
            continue
        i = rows[0]
        written = _metric_items(pipeline, doc["step"])
        for j, metric in enumerate(report.get("metrics") or []):
            try:
                values = report["results"][i][j].get("values") or {}
            except (KeyError, IndexError, TypeError, AttributeError):
                continue
            data = _dataset(written, j, metric.get("metric"))
            for col in metric.get("columns") or []:
                v = values.get(col.get("name"))
                if col.get("chart") is False or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                out.append(Score(doc["step"], str(metric.get("label") or metric.get("metric")),
                                 str(metric.get("metric")), str(col["name"]), v, col.get("better"), data))
    return out


def _metric_items(pipeline, step: str) -> list:
    spec = pipeline.steps.get(step)
    items = spec.params_json().get("metrics") if spec is not None else None
    return items if isinstance(items, list) else []


def _dataset(items: list, j: int, metric: str | None) -> str | None:
    """The data file of metric ``j`` as the pipeline writes it (reports keep only digests)."""
    if j >= len(items) or not isinstance(items[j], dict) or metric not in items[j]:
        return None
    params = items[j][metric]
    data = params.get("data") if isinstance(params, dict) else None
    return data if isinstance(data, str) else None


def model_index(name: str, found: list[Score], task: str | None) -> list[dict]:
    """The Hub's ``model-index``: one result per report metric, its columns as metrics."""
    results: dict[tuple, dict] = {}
    for s in found:
        res = results.setdefault((s.report, s.label), {
            "task": {"type": task or "other", "name": s.label},
            "dataset": {"name": s.dataset or s.label, "type": s.dataset or s.metric},
            "metrics": [],
            "source": {"name": f"weightflow evaluate step '{s.report}'"},
        })
        res["metrics"].append({"type": s.column, "value": s.value, "name": s.title})
    return [{"name": name, "results": list(results.values())}] if results else []


# -- the card ---------------------------------------------------------------------------

def _task(obj: Path) -> str | None:
    """The pipeline tag of an artifact: weightflow's recorded task, else the architecture."""
    meta = _json(obj / "weightflow.json")
    if meta.get("task") in _PIPELINE_TAGS:
        return _PIPELINE_TAGS[meta["task"]]
    archs = _json(obj / "config.json").get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else ""
    if arch.endswith("ForCausalLM"):
        return "text-generation"
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    return None


def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def wants_card(op: str, kind: str) -> bool:
    """Models and deltas that a step made get a card; a loaded model is exported as it was
    read (its own card, if it had one, is the right one) and a report is not a model."""
    return op != "load" and kind in ("Model", "Delta")


def model_card(pipeline, store, step: str, obj: Path, kind: str, layout: str,
               warn: Callable[[str], None] | None = None) -> str:
    """The ``README.md`` of an export of ``step`` (stored at ``obj``) written as ``layout``
    (``dense``, ``bitmask`` or ``peft``)."""
    from weightflow import __version__
    from weightflow.dsl.store import lockfile

    lock = lockfile.read(pipeline.lock_path)
    nodes = lineage(pipeline, store, step, lock, warn)
    me = nodes[-1]
    digest = me.digest or Path(obj).name
    found = scores(pipeline, store, digest, warn) if kind == "Model" else []
    task = _task(Path(obj)) if kind == "Model" else None
    bases = hub_bases(nodes)
    front: dict[str, Any] = {}
    if bases:
        front["base_model"] = bases[0] if len(bases) == 1 else bases
        relation = _relation(nodes, layout)
        if relation and not (relation == "merge" and len(bases) < 2):
            front["base_model_relation"] = relation
    if layout == "peft":
        front["library_name"] = "peft"
    elif kind == "Model":
        front["library_name"] = "transformers"
    if task:
        front["pipeline_tag"] = task
    front["tags"] = _tags(nodes, kind, layout)
    index = model_index(step, found, task)
    if index:
        front["model-index"] = index
    where = repository_path(pipeline.path)
    title = f"{pipeline.name}: {step}" if getattr(pipeline, "name", None) else step
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {title}", "",
             f"Made with weightflow {__version__} by step `{step}` (op `{me.op}`) of the pipeline "
             f"`{where}`; output digest `{digest}`.", ""]
    delta_base = _json(Path(obj) / "weightflow.json").get("base") if kind == "Delta" else None
    lines += _usage(kind, layout, nodes, {n.digest: n.name for n in nodes}.get(delta_base))
    lines += _sources_section(nodes)
    lines += _lineage_section(nodes)
    lines += _recipe_section(nodes)
    lines += _scores_section(found)
    lines += ["## Reproduce", "",
              "With the pipeline and its lock file from the repository:", "", "```sh",
              f"weightflow run {where} --target {step}",
              f"weightflow export {where} {step} DIR" + (f" --format {layout}" if layout != "dense" else ""),
              "```", ""]
    return "\n".join(lines)


def _usage(kind: str, layout: str, nodes: list[Node], delta_base: str | None) -> list[str]:
    """How to load what the export holds (it depends on the kind and the format)."""
    me = nodes[-1]
    base = next((n for n in nodes if n.name in me.inputs and n.op != "evaluate"), None)
    if layout == "peft":
        if kind == "Delta":  # extract-lora's factors adapt the base the delta was taken against
            base = next((n for n in nodes if n.name == delta_base), None)
        on = f"the output of step `{base.name}` (digest `{base.digest}`)" if base else "its base model"
        return ["## Use", "",
                f"A PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) for {on}:", "",
                "```python", "from peft import PeftModel",
                "model = PeftModel.from_pretrained(base_model, \"DIR\")", "```", ""]
    if kind == "Delta":
        text = ["## Use", "",
                "A task vector: for every tensor, the fine-tuned weights minus the base's"
                + (f" (the base is step `{delta_base}`)" if delta_base else "")
                + ". Add it (times a scale) to the base's tensor of the same name."]
        if layout == "bitmask":
            text += ["", "Stored compactly: a mostly-zero tensor `W` is two tensors, `W::mask` (U8, the "
                     "nonzero pattern, 8 elements a byte, little-endian bit order) and `W::values` (the "
                     "nonzero values in row-major order); the safetensors `__metadata__` key "
                     "`weightflow.sparse` gives each such tensor's dtype and shape. "
                     "`weightflow export --format dense` writes plain tensors."]
        else:
            text += ["", "Plain safetensors (`delta*.safetensors`) with the model's own tensor names:",
                     "", "```python", "from safetensors.torch import load_file",
                     "delta = load_file(\"DIR/delta.safetensors\")", "```"]
        return text + [""]
    return ["## Use", "", "A Hugging Face model directory:", "", "```python",
            "from transformers import AutoModel  # or the task's class, e.g. AutoModelForCausalLM",
            "model = AutoModel.from_pretrained(\"DIR\")", "```", ""]


def _sources_section(nodes: list[Node]) -> list[str]:
    roots = [n for n in nodes if n.op == "load"]
    if not roots:
        return []
    out = ["## Sources", ""]
    for n in roots:
        out.append(f"- `{n.name}`: {source_text(n.source)}, digest `{n.digest or 'not locked'}`")
    return out + [""]


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _lineage_section(nodes: list[Node]) -> list[str]:
    out = ["## Lineage", "", "Every step from the loaded sources to this model, in the order they ran.", "",
           "| step | op | from | key | digest |", "|---|---|---|---|---|"]
    for n in nodes:
        out.append(f"| `{_md(n.name)}` | {_md(n.op)} | {_md(', '.join(n.inputs) or '-')} | "
                   f"`{n.key or '-'}` | `{n.digest or '-'}` |")
    return out + [""]


def _recipe_section(nodes: list[Node]) -> list[str]:
    steps: dict[str, dict] = {}
    for n in nodes:
        doc: dict[str, Any] = {"op": n.op}
        if n.op == "load":
            doc["source"] = source_text(n.source)
        doc.update({k: v for k, v in n.params.items() if k != "source"})
        steps[n.name] = doc
    text = yaml.safe_dump({"steps": steps}, sort_keys=False, allow_unicode=True, default_flow_style=False)
    out = ["## Recipe", "",
           "Each step's parameters as recorded when its output was made (defaults included; inputs by "
           "step name, data files by the path the pipeline names).", "", "```yaml", text.rstrip(), "```", ""]
    stale = [n.name for n in nodes if n.from_pipeline]
    if stale:
        out += [f"Parameters of {', '.join(f'`{s}`' for s in stale)} are read from the pipeline file: the "
                "store holds no record of how their locked output was made.", ""]
    return out


def _scores_section(found: list[Score]) -> list[str]:
    if not found:
        return []
    out = ["## Evaluation", "", "From the pipeline's evaluate steps that scored this exact digest "
           "(↓ lower is better, ↑ higher is better).", "",
           "| report | metric | data | value |", "|---|---|---|---:|"]
    for s in found:
        arrow = {"lower": " ↓", "higher": " ↑"}.get(s.better or "", "")
        out.append(f"| `{_md(s.report)}` | {_md(s.title)}{arrow} | "
                   f"{_md(s.dataset or '-')} | {fmt(s.value)} |")
    return out + [""]
