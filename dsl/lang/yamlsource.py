"""Safe YAML loading that remembers where every key and value came from.

Plain YAML features work (anchors, aliases, merge keys ``<<``); Python tags do not
(this is PyYAML's SafeLoader).  Duplicate keys, which PyYAML silently accepts, are
errors, and so are aliases that make a value contain itself and alias "bombs" that
expand a small file into a huge tree.  Size limits keep a hostile file from taking minutes
and gigabytes: ``MAX_FILE_BYTES`` of text, ``MAX_NODES`` values as written and as expanded
through aliases (each limit is named when hit).  ``load_value`` applies the same rules to
a YAML value given on the command line (``--var NAME=VALUE``).  Alongside the data we
return ``Positions``: for each path of keys/indices, the 1-based line and column of the
key and of the value, so later stages can point at the exact spot of a problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from weightflow.dsl.lang.diagnostics import Diagnostic, WeightflowError

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
    """SafeLoader that rejects duplicate keys (explicit ones; merge keys may override).

    Values PyYAML's constructors choke on with plain Python errors (``2001-13-45``
    looks like a date, a 5000-digit integer exceeds ``int``'s string limit) become
    ``ConstructorError``s that carry the value's position.
    """

    duplicates: list[tuple[Any, yaml.Mark, yaml.Mark, yaml.Node]]
    _dup_checked: set[int]   # ids of mapping nodes already checked for duplicate keys
    expanded: int            # values counted while expanding aliases
    node_count = 0  # values composed so far (keys and aliases not counted)

    def compose_node(self, parent, index):  # a PyYAML hook
        # Count values as they are read, so a file with too many stops being read there
        # (instead of building the whole tree first); aliases are counted when expanded.
        if not (isinstance(parent, yaml.MappingNode) and index is None) \
                and not self.check_event(yaml.AliasEvent):
            self.node_count += 1
            if self.node_count > MAX_NODES:
                raise _TooMany(self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def _check_duplicates(self, node) -> None:
        # Runs once per mapping node, before PyYAML flattens merge keys into it in place
        # (after that, merged and explicit keys can no longer be told apart).
        if id(node) in self._dup_checked:
            return
        self._dup_checked.add(id(node))
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        self.duplicates.append((key, seen[key], key_node.start_mark, node))
                    else:
                        seen[key] = key_node.start_mark
                except TypeError:
                    pass  # unhashable keys are reported by PyYAML itself

    def flatten_mapping(self, node):  # noqa: D401 - PyYAML hook
        if isinstance(node, yaml.MappingNode):
            self._check_duplicates(node)
        return super().flatten_mapping(node)

    def construct_mapping(self, node, deep=False):  # noqa: D401 - PyYAML hook
        if isinstance(node, yaml.MappingNode):
            self._check_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):  # noqa: D401 - PyYAML hook
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as exc:
            value = f" {node.value!r}" if isinstance(node, yaml.ScalarNode) else ""
            if len(value) > 60:
                value = value[:57] + "...'"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read value{value}: {exc}", node.start_mark) from None


def _mark(m: yaml.Mark) -> Mark:
    return Mark(m.line + 1, m.column + 1)


# A pipeline is a page or two of YAML; the pure-Python reader takes seconds per MB.
MAX_FILE_BYTES = 4 * 1024 * 1024
# Values (scalars, lists, mappings) a document may hold, as written and as expanded:
# aliases let a short file describe a huge tree (the "billion laughs"), and the position
# walk, interpolation and validation all visit the expanded tree, so refuse big ones.
MAX_NODES = 200_000


def size_problem(size: int, exact: bool = True, what: str = "the pipeline file") -> str | None:
    """The message for a text of ``size`` bytes over MAX_FILE_BYTES, else None."""
    if size <= MAX_FILE_BYTES:
        return None
    mb = f"{size / 2**20:.1f} MB" if exact else f"more than {MAX_FILE_BYTES // 2**20} MB"
    return (f"{what} is {mb}; the limit is {MAX_FILE_BYTES // 2**20} MB (a pipeline "
            "describes steps; keep data in data files)")


class _TooBig(Exception):
    """The tree, with aliases expanded, has more than MAX_NODES values."""


class _TooMany(Exception):
    """The document as written has more than MAX_NODES values (no aliases involved)."""

    def __init__(self, mark: yaml.Mark):
        self.mark = mark


class _Recursive(Exception):
    """An alias inside the very node it names: the data would contain itself."""

    def __init__(self, mark: yaml.Mark):
        self.mark = mark


def _record(node: yaml.Node, path: Path, pos: Positions, loader: _Loader, paths: dict,
            depth: int = 0, inside: set | None = None, where: yaml.Mark | None = None) -> None:
    inside = set() if inside is None else inside  # ids of the nodes on the path from the root
    if id(node) in inside:
        raise _Recursive(where or node.start_mark)
    loader.expanded += 1
    if loader.expanded > MAX_NODES:
        raise _TooBig()
    # Later entries win, as in the constructed dict (a key after a merge key '<<'
    # overrides the merged one), so positions are overwritten, not kept first.
    pos.values[path] = _mark(node.start_mark)
    paths.setdefault(id(node), path)
    inside.add(id(node))
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
            pos.keys[sub] = _mark(key_node.start_mark)
            _record(value_node, sub, pos, loader, paths, depth + 1, inside, key_node.start_mark)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record(item, path + (i,), pos, loader, paths, depth + 1, inside, node.start_mark)
    inside.discard(id(node))


def _owner_step(path: Path | None) -> str | None:
    """The step whose block holds the mapping at ``path`` (None outside 'steps')."""
    if path and path[0] == "steps" and len(path) >= 2 and isinstance(path[1], str):
        return path[1]
    return None


def _offset_mark(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, col) of character ``offset`` of ``text``."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _text_size(text: str) -> int:
    """UTF-8 size of ``text`` (only encoded when it could be near the limit)."""
    if 4 * len(text) <= MAX_FILE_BYTES:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _source_lines(text: str) -> list[str]:
    return text.split("\n")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _content_line_before(lines: list[str], index: int) -> int | None:
    """Index of the nearest line above ``index`` holding YAML (not blank, not a comment)."""
    for i in range(min(index, len(lines)) - 1, -1, -1):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("#"):
            return i
    return None


_CLOSERS = {"flow mapping": ("{", "}"), "flow sequence": ("[", "]")}
_KEY_VALUE = re.compile(r"^\s*(?:-\s+)?[^\s#:][^:#]*:\s+\S")  # 'key: value' on one line


def plain_yaml_problem(exc: yaml.MarkedYAMLError, text: str) -> str | None:  # noqa: C901
    """What the common YAML mistakes mean, in the user's terms (None: no better words).

    PyYAML reports where its grammar broke, in grammar words ("expected <block end>, but
    found '<block mapping start>'"), often lines after the mistake.  The usual causes are
    few -- a line indented more or less than its neighbours, a tab, a quote or bracket
    left open, a ': ' inside an unquoted value -- and each shows in the text around the
    marks, so we look there and name the line to fix.
    """
    mark, context_mark = exc.problem_mark, exc.context_mark
    problem, context = exc.problem or "", exc.context or ""
    if mark is None:
        return None
    lines = _source_lines(text)
    line_no = mark.line + 1
    here = lines[mark.line] if mark.line < len(lines) else ""

    if "found character '\\t'" in problem:
        if here[:mark.column].strip(" ") == "":
            return (f"line {line_no} is indented with a tab; YAML indents with spaces only: "
                    "replace the tab with spaces")
        return f"a tab on line {line_no} where YAML expects a value or a key: use spaces"

    if "quoted scalar" in context and "end of stream" in problem and context_mark is not None:
        quote = text[context_mark.index] if context_mark.index < len(text) else "'"
        return (f"the {quote} opened on line {context_mark.line + 1}, column {context_mark.column + 1} is "
                f"never closed: add the closing {quote} (to put a {quote} inside the text, use the "
                "other kind of quote around it)")

    for kind, (opener, closer) in _CLOSERS.items():
        if kind in context and context_mark is not None and f"or '{closer}'" in problem:
            opened = f"the '{opener}' opened on line {context_mark.line + 1}, column {context_mark.column + 1}"
            got = problem.rsplit("but got ", 1)[-1].strip("'")
            if got in ("}", "]") and got != closer:
                return f"{opened} is closed with '{got}' on line {line_no}: close it with '{closer}'"
            if got == "<stream end>" or mark.line != context_mark.line:
                return (f"{opened} is not closed by the end of its line: add '{closer}' where its "
                        f"items end (items are separated by ', ')")
            return None

    if "while parsing a block mapping" in context and context_mark is not None and "expected <block end>" in problem:
        keys = (f"the mapping's keys start in column {context_mark.column + 1}, as on line "
                f"{context_mark.line + 1}")
        if "'-'" in problem:
            return (f"line {line_no} starts a list item ('- ') inside a mapping ({keys}): a list must be "
                    "the value of a key (the key on the line before, ending in ':'); check the "
                    f"indentation of line {line_no}")
        if "<scalar>" in problem and (mark.line == context_mark.line or mark.column > _indent(here)):
            return (f"text after a value on line {line_no}: a quoted value must end at its closing "
                    "quote; quote the whole value, or put it on a line of its own")
        before = _content_line_before(lines, mark.line)
        if before is not None and mark.column < _indent(lines[before]):
            # dedented from the line above, yet deeper than the mapping: lines up with nothing
            return (f"line {line_no} is indented to column {mark.column + 1}, which lines up with no key "
                    f"above it (line {before + 1} starts in column {_indent(lines[before]) + 1}; {keys}): "
                    f"check the indentation of line {line_no}")
        return (f"this line is indented more than its mapping ({keys}): check the "
                f"indentation of line {line_no}")

    if problem == "mapping values are not allowed here":
        before = _content_line_before(lines, mark.line)
        prefix = here[:mark.column]
        if ": " in prefix.strip() or prefix.rstrip().endswith(":"):
            return (f"a ': ' inside the value on line {line_no}: quote the value (e.g. "
                    "key: \"text: with a colon\")")
        if before is not None and _indent(here) > _indent(lines[before]) and _KEY_VALUE.match(lines[before]):
            return (f"line {line_no} is indented more than line {before + 1} above it, whose key already has "
                    f"a value: check the indentation of line {line_no} (a nested mapping goes under a "
                    "key that ends in ':' with nothing after it)")
        if before is not None and re.search(r"\S:\S", lines[before]) and ": " not in lines[before]:
            return (f"line {before + 1} has no space after its ':' ({lines[before].strip()!r}), so YAML reads "
                    "it as text, not as a key: write 'key: value'")
        return None

    if "while scanning a simple key" in context and "could not find expected ':'" in problem \
            and context_mark is not None:
        return (f"line {context_mark.line + 1} ({lines[context_mark.line].strip()!r}) is neither 'key: value' "
                "nor a list item: add the ':' (or check its indentation)")
    return None


def load_yaml(text: str, filename: str) -> tuple[Any, Positions, list[Diagnostic]]:
    """Parse ``text``; return (data, positions, diagnostics).

    On a syntax error ``data`` is None and the diagnostics say where and why.
    Duplicate-key diagnostics name the step whose block holds them.
    """
    data, pos, diags, _ = _load(text, filename)
    return data, pos, diags


def _load(text: str, filename: str,  # noqa: C901
          noun: str = "the pipeline file") -> tuple[Any, Positions, list[Diagnostic], bool]:
    """load_yaml, plus whether the diagnostics are only about YAML syntax (not limits,
    duplicate keys or self-containing aliases)."""
    pos = Positions()
    paths: dict[int, Path] = {}
    too_big = size_problem(_text_size(text), what=noun)
    if too_big:
        return None, pos, [Diagnostic(filename, 1, 1, too_big)], False
    loader = None
    try:
        loader = _Loader(text)  # the reader rejects control characters right here
        loader.duplicates = []
        loader._dup_checked = set()
        loader.expanded = 0
        node = loader.get_single_node()
        if node is None:
            return None, pos, [], True
        data = loader.construct_document(node)
        # construct_mapping flattened merge keys in place, so the walk sees merged keys.
        _record(node, (), pos, loader, paths)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid YAML"
        if exc.context and exc.context not in problem:
            context = exc.context
            cm = exc.context_mark
            if cm is not None and mark is not None and (cm.line, cm.column) != (mark.line, mark.column):
                # "while parsing a flow mapping" -> say where that mapping began: the
                # missing '}' or bad indentation is usually there, not where it's noticed.
                context += f" started at line {cm.line + 1}, column {cm.column + 1}"
            problem = f"{context}: {problem}"
        if "could not determine a constructor" in problem:
            problem += " (only plain YAML is allowed; tags such as !!python/... are refused)"
        if "found character '\\t'" in problem:
            problem += " (indent with spaces; YAML does not allow tabs there)"
        plain = plain_yaml_problem(exc, text)
        if plain:  # say what to fix first; the parser's words stay for searching
            problem = f"{plain} (the YAML parser says: {problem})"
        return None, pos, [Diagnostic(filename, line, col, f"YAML syntax error: {problem}")], True
    except yaml.reader.ReaderError as exc:
        line, col = _offset_mark(text, exc.position) if isinstance(text, str) else (1, 1)
        return None, pos, [Diagnostic(
            filename, line, col,
            f"YAML syntax error: unacceptable character #x{exc.character:04x}: {exc.reason}")], True
    except yaml.YAMLError as exc:
        return None, pos, [Diagnostic(filename, 1, 1, f"YAML error: {exc}")], True
    except RecursionError:
        return None, pos, [Diagnostic(filename, 1, 1, "YAML error: document nests too deeply")], False
    except _Recursive as exc:
        return None, pos, [Diagnostic(
            filename, exc.mark.line + 1, exc.mark.column + 1,
            "YAML error: an alias here refers to a node that contains it, so the value would "
            "contain itself; a pipeline must be a tree")], False
    except _TooMany as exc:
        return None, pos, [Diagnostic(
            filename, exc.mark.line + 1, exc.mark.column + 1,
            f"YAML error: the document holds more than {MAX_NODES} values (the limit was reached "
            "here); a pipeline file should be far smaller")], False
    except _TooBig:
        return None, pos, [Diagnostic(
            filename, 1, 1, f"YAML error: the document expands (through aliases) to more than "
            f"{MAX_NODES} values; a pipeline file should be far smaller")], False
    finally:
        if loader is not None:
            loader.dispose()
    diags = []
    for key, first, second, mapping in loader.duplicates:
        where = paths.get(id(mapping))
        step = _owner_step(where)
        if where == ("steps",) and isinstance(key, str):
            step = key  # a step defined twice
        diags.append(Diagnostic(
            filename, second.line + 1, second.column + 1,
            f"duplicate key '{key}' (first defined on line {first.line + 1})", step))
    return data, pos, diags, not diags


def load_value(text: str, what: str) -> Any:
    """A YAML value given on the command line (``what``: e.g. "--var w"), read under the
    rules and limits of pipeline files.  Text that is not valid YAML (``a: b: c``) stays
    the string it is; a value over a limit, with duplicate keys or a self-containing
    alias raises WeightflowError."""
    data, _, diags, syntax_only = _load(text, what, noun="the value")
    if not diags:
        return data
    if syntax_only:
        return text
    d = diags[0]
    where = f" (line {d.line}, column {d.col} of the value)" if (d.line, d.col) != (1, 1) else ""
    raise WeightflowError(f"{what}: {d.message}{where}")
