"""Safe YAML loading that remembers where every key and value came from.

Plain YAML features work (anchors, aliases, merge keys ``<<``); Python tags do not
(this is PyYAML's SafeLoader).  Duplicate keys, which PyYAML silently accepts, are
errors.  Alongside the data we return ``Positions``: for each path of keys/indices,
the 1-based line and column of the key and of the value, so later stages can point
at the exact spot of a problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .diagnostics import Diagnostic

Path = tuple  # tuple[str | int, ...]


@dataclass(frozen=True)
class Mark:
    line: int
    col: int


@dataclass
class Positions:
    """Maps a path such as ('steps', 'merged', 'weights', 1) to source marks."""

    keys: dict[Path, Mark] = field(default_factory=dict)
    values: dict[Path, Mark] = field(default_factory=dict)

    def value(self, path: Path) -> Mark:
        """Where the value at ``path`` starts, or the nearest enclosing place we know."""
        path = tuple(path)
        while path:
            if path in self.values:
                return self.values[path]
            if path in self.keys:
                return self.keys[path]
            path = path[:-1]
        return self.values.get((), Mark(1, 1))

    def key(self, path: Path) -> Mark:
        """Where the key of ``path`` is written (falls back to the value's place)."""
        path = tuple(path)
        if path in self.keys:
            return self.keys[path]
        return self.value(path)


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (explicit ones; merge keys may override)."""

    duplicates: list[tuple[Any, yaml.Mark, yaml.Mark]]

    def construct_mapping(self, node, deep=False):  # noqa: D401 - PyYAML hook
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node, deep=True)
                    try:
                        if key in seen:
                            self.duplicates.append((key, seen[key], key_node.start_mark))
                        else:
                            seen[key] = key_node.start_mark
                    except TypeError:
                        pass  # unhashable keys are reported by PyYAML itself
        return super().construct_mapping(node, deep=deep)


def _mark(m: yaml.Mark) -> Mark:
    return Mark(m.line + 1, m.column + 1)


def _record(node: yaml.Node, path: Path, pos: Positions, loader: _Loader, depth: int = 0) -> None:
    if depth > 200:
        return
    pos.values[path] = _mark(node.start_mark)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            try:
                key = loader.construct_object(key_node, deep=True)
            except yaml.YAMLError:
                continue
            try:
                hash(key)
            except TypeError:
                continue
            sub = path + (key,)
            pos.keys.setdefault(sub, _mark(key_node.start_mark))
            _record(value_node, sub, pos, loader, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record(item, path + (i,), pos, loader, depth + 1)


def load_yaml(text: str, filename: str) -> tuple[Any, Positions, list[Diagnostic]]:
    """Parse ``text``; return (data, positions, diagnostics).

    On a syntax error ``data`` is None and the diagnostics say where and why.
    """
    loader = _Loader(text)
    loader.duplicates = []
    pos = Positions()
    try:
        node = loader.get_single_node()
        if node is None:
            return None, pos, []
        data = loader.construct_document(node)
        # construct_mapping flattened merge keys in place, so the walk sees merged keys.
        _record(node, (), pos, loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid YAML"
        if exc.context and exc.context not in problem:
            problem = f"{exc.context}: {problem}"
        if "could not determine a constructor" in problem:
            problem += " (only plain YAML is allowed; tags such as !!python/... are refused)"
        return None, pos, [Diagnostic(filename, line, col, f"YAML syntax error: {problem}")]
    except yaml.YAMLError as exc:
        return None, pos, [Diagnostic(filename, 1, 1, f"YAML error: {exc}")]
    except RecursionError:
        return None, pos, [Diagnostic(filename, 1, 1, "YAML error: document nests too deeply")]
    finally:
        loader.dispose()
    diags = [
        Diagnostic(
            filename,
            second.line + 1,
            second.column + 1,
            f"duplicate key '{key}' (first defined on line {first.line + 1})",
        )
        for key, first, second in loader.duplicates
    ]
    return data, pos, diags
