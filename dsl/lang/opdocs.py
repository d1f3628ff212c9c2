"""The op reference, generated from the registry so it cannot drift from the code."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from weightflow.dsl.lang import registry
from weightflow.dsl.lang.spec import DataFile, StepRef, _markers_of


def _models(spec) -> list[tuple[str | None, type[BaseModel]]]:
    params = spec.params
    if isinstance(params, type) and issubclass(params, BaseModel):
        return [(None, params)]
    out = []
    for member in getattr(params, "__args__", ()) or ():
        for m in getattr(member, "__args__", ()) or (member,):
            if isinstance(m, type) and issubclass(m, BaseModel):
                tag = get_args(m.model_fields[spec.discriminator].annotation)[0]  # Literal["name"]
                out.append((tag, m))
    return out


def _fmt_type(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _fmt_type(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_fmt_type(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"list[{_fmt_type(args[0])}]" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _type_name(info) -> str:
    for m in _markers_of(info.annotation, info.metadata):
        if isinstance(m, StepRef):
            kinds = "|".join(k.value for k in m.kinds)
            return f"list of {kinds} steps" if get_origin(info.annotation) is list or \
                "list" in _fmt_type(info.annotation) else f"{kinds} step"
        if isinstance(m, DataFile):
            return "data file"
    return _fmt_type(info.annotation)


def _param_rows(model: type[BaseModel], skip: str | None) -> list[dict[str, Any]]:
    rows = []
    for name, info in model.model_fields.items():
        if name == skip:
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        rows.append({
            "name": info.alias or name,
            "type": _type_name(info),
            "required": info.is_required(),
            "default": default,
            "description": info.description or "",
        })
    return rows


def ops_json() -> list[dict]:
    out = []
    for spec in registry.all_ops().values():
        variants = [{"variant": tag, "params": _param_rows(m, spec.discriminator)}
                    for tag, m in _models(spec)]
        out.append({"name": spec.name, "version": spec.version, "output": spec.output.value,
                    "summary": spec.summary(), "doc": (spec.doc or "").strip(),
                    "discriminator": spec.discriminator, "variants": variants})
    return out


def _fmt_default(row) -> str:
    return "required" if row["required"] else f"default {row['default']!r}"


def ops_text(only: str | None = None) -> str:
    """Every op (its summary and parameters), or one op with its whole documentation."""
    lines = []
    for op in ops_json():
        if only is not None and op["name"] != only:
            continue
        summary = op["summary"].replace("``", "")  # the terminal shows no reST markup
        lines.append(f"{op['name']} (v{op['version']}) -> {op['output']}: {summary}")
        if only is not None:
            body = "\n".join(op["doc"].splitlines()[1:]).strip("\n").replace("``", "")  # no reST markup
            lines += ["", *[f"  {line}" if line else "" for line in body.splitlines()], "", "  parameters:"]
        for var in op["variants"]:
            indent = "    "
            if var["variant"] is not None:
                lines.append(f"  {op['discriminator']}: {var['variant']}")
                indent = "      "
            for r in var["params"]:
                desc = f"  {r['description']}" if r["description"] else ""
                lines.append(f"{indent}{r['name']}: {r['type']} ({_fmt_default(r)}){desc}")
        lines.append("")
    return "\n".join(lines)


def md_cell(text: object) -> str:
    """``text`` safe inside one cell of a GitHub Markdown table.

    A bare ``|`` ends the cell (even inside backticks: GitHub splits the row before it
    reads code spans), so type unions such as ``'auto' | 'causal-lm'`` broke the
    README's tables into extra columns; ``\\|`` is the escape GitHub honours in both
    places.  A newline would end the row, so it becomes ``<br>``.
    """
    cell = str(text).replace("\\|", "|").replace("|", "\\|")
    return "<br>".join(part.strip() for part in cell.splitlines()) if "\n" in cell else cell


def md_row(cells: list[object]) -> str:
    """One Markdown table row of ``cells``, each escaped with ``md_cell``."""
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


def ops_markdown() -> str:
    lines = ["| op | output | parameters |", "|---|---|---|"]
    for op in ops_json():
        parts = []
        for var in op["variants"]:
            names = ", ".join(f"`{r['name']}`" + ("" if r["required"] else "?") for r in var["params"])
            parts.append(f"**{op['discriminator']}: {var['variant']}** {names}" if var["variant"] else names)
        lines.append(md_row([f"`{op['name']}`", op["output"], "<br>".join(parts)]))
    out = ["### Ops", "", *lines, ""]
    for op in ops_json():
        out += [f"#### `{op['name']}` (v{op['version']}) → {op['output']}", "", op["doc"], ""]
        for var in op["variants"]:
            if var["variant"] is not None:
                out += [f"`{op['discriminator']}: {var['variant']}`", ""]
            out += ["| parameter | type | default | description |", "|---|---|---|---|"]
            for r in var["params"]:
                out.append(md_row([f"`{r['name']}`", r["type"], _fmt_default(r), r["description"]]))
            out.append("")
    return "\n".join(out)


# -- the language itself ----------------------------------------------------------------

# One line per top-level key of a pipeline file (``pipeline.TOP_LEVEL_KEYS``): a test fails
# when a key is added there without a line here, so the README cannot miss one.
TOP_LEVEL_DOCS = {
    "weightflow": "the language version; required, `1`",
    "name": "a name for reports and the store's listings (default: the file's stem)",
    "description": "one line saying what the pipeline is for",
    "seed": "default `seed` of every step whose op takes one (training, DARE, random init); default 0",
    "dtype": "default dtype of stored weights: float32, float16 or bfloat16; default float32",
    "vars": "named values, used as `${vars.NAME}` anywhere in `steps` and `outputs`; "
            "`weightflow run --var NAME=VALUE` overrides one without editing the file",
    "steps": "step name -> `op:` and that op's parameters (the op reference below); a parameter "
             "naming a model, delta or report takes another step's name, which makes the graph",
    "outputs": "step name -> directory its result is exported to after a run (relative to the "
               "pipeline file, or to `run --out DIR`); `run --no-export` skips it",
    "verify": "`changed` (default) trusts unchanged files; `always` re-hashes every input and "
              "cached artifact on each use",
    "reproducible": "`platform` (default): digests hold on this platform, which the lock file "
                    "records; `strict`: CPU bytes that hold on any machine (slower)",
    "store": "`{remote: URL}`: a shared remote store (`s3://bucket/prefix`, `file:///mnt/nfs/...`, "
             "anything fsspec opens) that the local store caches; `--remote` and `$WEIGHTFLOW_REMOTE` "
             "override it",
}

LANGUAGE_EXAMPLE = """\
weightflow: 1
name: two-finetunes-merged
seed: 0
dtype: float32
reproducible: platform
vars:
  density: 0.5
steps:
  base: {op: load, source: models/base}
  ft_a:
    op: finetune
    model: base
    data: data/task_a.jsonl
    max_steps: 200
    lora: {r: 8, alpha: 16, target_modules: all-linear}
  ft_b: {op: finetune, model: base, data: data/task_b.jsonl, max_steps: 200}
  delta_a: {op: extract-delta, model: ft_a, base: base}
  delta_b: {op: extract-delta, model: ft_b, base: base}
  merged:
    op: merge
    method: ties
    base: base
    deltas: [delta_a, delta_b]
    density: ${vars.density}
  pruned:
    op: prune-wanda
    model: merged
    sparsity: 0.5
    calibration: {data: data/calibration.txt, samples: 32, seq_len: 256}
outputs:
  pruned: out/merged-pruned
"""

LANGUAGE_BEGIN = "<!-- BEGIN generated by `weightflow ops --language`; do not edit -->"
LANGUAGE_END = "<!-- END generated pipeline-file reference -->"


def _sub_key_table(model: type[BaseModel]) -> list[str]:
    out = ["| key | type | default | description |", "|---|---|---|---|"]
    for r in _param_rows(model, None):
        out.append(md_row([f"`{r['name']}`", r["type"], _fmt_default(r), r["description"]]))
    return out


def _one_line(model: type[BaseModel]) -> str:
    """A params model's docstring as a phrase (its first line, without the full stop)."""
    return (model.__doc__ or model.__name__).strip().splitlines()[0].rstrip(".")


def language_markdown() -> str:
    """The README's "The pipeline file" section: an example, every top-level key, and the
    ``lora`` and ``calibration`` sub-keys, generated from the declarations (the keys from
    ``pipeline.TOP_LEVEL_KEYS``, the sub-keys from their params models) so it cannot drift.
    """
    from weightflow.dsl.lang.pipeline import TOP_LEVEL_KEYS
    from weightflow.ops.lib.params import Calibration
    from weightflow.ops.lib.train_params import LoraParams

    missing = [k for k in TOP_LEVEL_KEYS if k not in TOP_LEVEL_DOCS]
    if missing:
        raise ValueError(f"top-level keys without a line in opdocs.TOP_LEVEL_DOCS: {', '.join(missing)}")
    out = ["## The pipeline file", "",
           "A pipeline is one YAML file: top-level settings, `steps` (each an `op` and its "
           "parameters; a step names the steps it reads, which makes the graph) and `outputs`. "
           "`weightflow validate FILE` checks it without running anything, `weightflow schema` "
           "gives editors a JSON Schema, and `weightflow ops OP` documents each op.", "",
           "```yaml", LANGUAGE_EXAMPLE.rstrip(), "```", "",
           "Top-level keys:", "", "| key | meaning |", "|---|---|"]
    out += [md_row([f"`{k}`", TOP_LEVEL_DOCS[k]]) for k in TOP_LEVEL_KEYS]
    out += ["", "A whole value `${vars.NAME}` keeps the variable's type (a number stays a number); "
            "inside a longer string it is substituted as text.  Paths (`source`, `data`, `outputs`) "
            "are relative to the pipeline file.  `weightflow run` writes `<pipeline>.lock` beside "
            "the file (or into `--out DIR`, or at `--lock FILE`): commit it; `run --frozen` fails "
            "instead of changing it.", "",
           f"`lora:` ({_one_line(LoraParams)}; in `finetune` and `unlearn`):", ""]
    out += _sub_key_table(LoraParams)
    out += ["", f"`calibration:` ({_one_line(Calibration)}; in `prune-wanda` and `dare-prune`):", ""]
    out += _sub_key_table(Calibration)
    return "\n".join(out) + "\n"


def with_language(text: str) -> str:
    """``text`` with the block between LANGUAGE_BEGIN and LANGUAGE_END replaced by
    ``language_markdown()``; unchanged when it has no such block."""
    if LANGUAGE_BEGIN not in text or LANGUAGE_END not in text:
        return text
    head, rest = text.split(LANGUAGE_BEGIN, 1)
    _, tail = rest.split(LANGUAGE_END, 1)
    return f"{head}{LANGUAGE_BEGIN}\n{language_markdown().rstrip()}\n{LANGUAGE_END}{tail}"


README_BEGIN = "<!-- BEGIN generated by `weightflow ops --markdown --write README.md`; do not edit -->"
README_END = "<!-- END generated op reference -->"


def with_reference(text: str) -> str:
    """``text`` (a README) with the block between the markers replaced by ``ops_markdown()``.

    The README carries a copy of the op reference so it reads well on a code host; the
    markers let ``weightflow ops --markdown --write`` refresh it and a test spot staleness.
    """
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"the file has no '{README_BEGIN}' ... '{README_END}' block")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{ops_markdown().rstrip()}\n{README_END}{tail}"
