"""The typed DAG of a pipeline: references resolved, types checked, cycles named.

Nodes are step names; an edge ``a -> b`` means step ``b`` reads ``a``'s output.  The
checks here run on every ``validate``/``plan``/``run`` before anything heavy.
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx

from weightflow.dsl.lang.diagnostics import Diagnostic, did_you_mean


def build(pipeline) -> nx.DiGraph:
    """The dependency graph of the pipeline's (valid) steps."""
    g = nx.DiGraph()
    for name in pipeline.steps:
        g.add_node(name)
    for name, step in pipeline.steps.items():
        for edge in step.inputs:
            if edge.source in pipeline.steps:
                g.add_edge(edge.source, name)
    return g


def check_graph(pipeline, all_names: set[str], filename: str) -> list[Diagnostic]:
    """Unknown references, wrong-typed edges and cycles, each at its YAML position."""
    pos = pipeline.positions
    diags: list[Diagnostic] = []
    for name, step in pipeline.steps.items():
        for edge in step.inputs:
            path = ("steps", name) + edge.field
            mark = pos.value(path)
            field_name = _fmt(edge.field)
            if edge.source == name:
                diags.append(Diagnostic(filename, mark.line, mark.col,
                                        f"'{field_name}' refers to the step itself", name))
                continue
            if "${" in edge.source:
                continue  # an interpolation that failed: reported where it is written
            family = _family_problem(pipeline, edge, field_name, all_names)
            if family is not None:
                if family:
                    diags.append(Diagnostic(filename, mark.line, mark.col, family, name))
                continue
            if edge.source not in all_names:
                diags.append(Diagnostic(
                    filename, mark.line, mark.col,
                    f"'{field_name}' refers to unknown step '{edge.source}'"
                    f"{did_you_mean(edge.source, all_names)}", name))
                continue
            src = pipeline.steps.get(edge.source)
            if src is None:
                continue  # that step is invalid itself and already reported
            if src.output not in edge.kinds:
                wanted = " or ".join(k.value for k in edge.kinds)
                diags.append(Diagnostic(
                    filename, mark.line, mark.col,
                    f"type mismatch: '{field_name}' expects a {wanted}, but step '{edge.source}' "
                    f"(op '{src.op.name}') produces a {src.output.value}", name))
    g = build(pipeline)
    reported: set[frozenset] = set()
    for cycle in _cycles(g):
        key = frozenset(cycle)
        if key in reported:
            continue
        reported.add(key)
        first = min(cycle, key=lambda n: pipeline.steps[n].line)
        i = cycle.index(first)
        ordered = cycle[i:] + cycle[:i]
        text = " -> ".join(ordered + [ordered[0]])
        step = pipeline.steps[first]
        diags.append(Diagnostic(filename, step.line, step.col,
                                f"dependency cycle: {text} (a step cannot depend, directly or "
                                "through other steps, on its own output)", first))
    return diags


def _family_problem(pipeline, edge, field_name: str, all_names: set[str]) -> str | None:
    """What is wrong with a reference that names a family rather than one step: '' when it
    is reported already (the family's matrix is invalid), None when it names no family.

    List items ``FAMILY@*`` were expanded while parsing, so one left here was written where
    a single step is expected (or names no family)."""
    families = getattr(pipeline, "families", {}) or {}
    source = edge.source
    list_item = bool(edge.field) and isinstance(edge.field[-1], int)
    if source in families:
        members = families[source]
        return (f"'{field_name}' names the step family '{source}' ({len(members)} members): name one "
                f"member, e.g. '{members[0].name}'"
                + (f", or all of them as '{source}@*'" if list_item else ""))
    base, sep, rest = source.partition("@")
    if not sep:
        return None
    if base in all_names and base not in families and base not in pipeline.steps:
        return ""  # a family whose matrix is invalid: reported there
    if rest != "*":
        return None  # one member, or a typo of one: checked as any step name
    if base not in families:
        known = [f"{f}@*" for f in families]
        return (f"'{field_name}' refers to unknown step family '{source}'{did_you_mean(source, known)}"
                + (f"; families: {', '.join(known)}" if known else "; the pipeline has no family "
                   "(a step with 'matrix:' or 'foreach:')"))
    members = families[base]
    if list_item:  # a list-valued field written as one string: `models: merged@*`
        top = field_name.rsplit("[", 1)[0]
        return (f"'{top}' takes a list: write it as [{source}] to name all {len(members)} members of "
                f"family '{base}'")
    return (f"'{field_name}' takes a single step, but '{source}' names all {len(members)} members of "
            f"family '{base}'; name one, e.g. '{members[0].name}' (only list-valued references such as "
            "evaluate's 'models' take a whole family)")


def _cycles(g: nx.DiGraph) -> Iterable[list[str]]:
    for component in nx.strongly_connected_components(g):
        if len(component) > 1:
            sub = g.subgraph(component)
            yield [u for u, _ in nx.find_cycle(sub, source=min(component))]
        # A step naming itself is a one-step loop, reported as "refers to the step itself".


def _fmt(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def topo_order(pipeline) -> list[str]:
    """Steps in a deterministic topological order (file order breaks ties)."""
    g = build(pipeline)
    order = {n: i for i, n in enumerate(pipeline.steps)}
    return list(nx.lexicographical_topological_sort(g, key=lambda n: order[n]))


def needed(pipeline, targets: Iterable[str] | None) -> set[str]:
    """The targets and every step they depend on (all steps when no targets)."""
    if not targets:
        return set(pipeline.steps)
    g = build(pipeline)
    out: set[str] = set()
    for t in targets:
        out.add(t)
        out |= nx.ancestors(g, t)
    return out


def last_consumers(pipeline, order: list[str], run_set: set[str]) -> dict[str, str]:
    """For each step, the last step (in ``order``) that reads it; used to free memory."""
    last: dict[str, str] = {}
    for name in order:
        if name not in run_set:
            continue
        for edge in pipeline.steps[name].inputs:
            last[edge.source] = name
    return last
