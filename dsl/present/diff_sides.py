"""The two sides of ``weightflow diff``: pipeline texts read from files or from git.

A side is the text of a pipeline file and the working-copy path it is parsed at.  A side
read from git (``HEAD:pipelines/x.yaml``) is parsed *as if* it were the working copy's
file at that path, so its relative data and model paths resolve against the working
copy's pipeline directory: a diff compares recipes, not the files of another checkout.

Argument forms (as ``git diff`` reads them):

- ``diff P``: the committed ``HEAD:P`` against the working copy ``P``;
- ``diff REV P``: ``REV:P`` against the working copy ``P``;
- ``diff REV1 REV2 P``: ``REV1:P`` against ``REV2:P``;
- ``diff OLD NEW``: each a pipeline file, ``/dev/null`` (no file: every step added or
  removed) or a ``REV:PATH`` spec (``main:pipelines/x.yaml``; ``:PATH`` is the index).
  A ``REV:PATH`` path is relative to the repository's top level, as in git, unless it
  starts with ``./`` or ``../`` (then relative to the current directory).
- ``--git-driver`` with git's seven arguments (``path old-file old-hex old-mode new-file
  new-hex new-mode``): see ``driver_sides``.

Git runs as an argv list (never through a shell); a missing git, a directory outside a
repository, an unknown revision or a path the revision lacks is a clear error.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from weightflow.dsl.lang.diagnostics import WeightflowError

DEV_NULL = "/dev/null"


@dataclass(frozen=True)
class Side:
    """One side of a diff: what to parse, where, and how to name it."""

    label: str              # how the output names it: "HEAD:examples/q.yaml", "examples/q.yaml"
    text: str | None        # the pipeline's text; None when the file does not exist there
    path: Path              # the working-copy path it is parsed at (relative paths resolve here)
    rev: str | None = None  # the git revision it was read from; None for a file
    lock_text: str | None = None  # the lock file committed beside it at ``rev``, if any

    @property
    def kind(self) -> str:
        """``git``, ``file`` or ``none`` (no such file: every step added or removed)."""
        if self.text is None:
            return "none"
        return "git" if self.rev is not None else "file"

    def as_json(self) -> dict:
        return {"label": self.label, "kind": self.kind, "rev": self.rev, "path": str(self.path)}


class GitError(WeightflowError):
    """git is missing, the directory is not in a repository, or a revision is unknown."""


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise GitError("git is not installed (weightflow diff reads revisions with `git show`); "
                       "compare two files instead: weightflow diff OLD.yaml NEW.yaml") from None


def toplevel(cwd: Path) -> Path:
    """The top-level directory of the repository that contains ``cwd``."""
    res = _git(["rev-parse", "--show-toplevel"], cwd)
    if res.returncode != 0:
        raise GitError(f"{cwd}: not inside a git repository (weightflow diff reads revisions with "
                       "`git show`); compare two files instead: weightflow diff OLD.yaml NEW.yaml")
    return Path(res.stdout.strip()).resolve()


def _existing_dir(path: Path) -> Path:
    """The nearest existing directory at or above ``path`` (where git can run)."""
    for d in [path, *path.parents]:
        if d.is_dir():
            return d
    return Path.cwd()


def _check_rev(rev: str, top: Path) -> None:
    if rev == "":  # ':PATH' is the index
        return
    res = _git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], top)
    if res.returncode != 0:
        raise GitError(f"unknown git revision '{rev}' in {top} (a branch, a tag, a commit or an "
                       "expression such as HEAD~1)")


def _show(rev: str, rel: str, top: Path) -> str | None:
    """The text of ``rev:rel`` (None when the revision has no such file)."""
    spec = f"{rev}:{rel}"
    if _git(["cat-file", "-e", spec], top).returncode != 0:
        return None
    res = _git(["show", spec], top)
    if res.returncode != 0:
        raise GitError(f"git show {spec}: {res.stderr.strip() or 'failed'}")
    return res.stdout


def git_side(rev: str, path: str | Path, base: Path | None = None) -> Side:
    """``rev:path``; ``path`` relative to the repository's top level unless it is absolute or
    (with ``base``, the current directory) starts with ``./`` or ``../``."""
    base = base or Path.cwd()
    raw = str(path)
    anchored = Path(raw).is_absolute() or raw.startswith(("./", "../"))
    where = _existing_dir((base / raw).resolve().parent) if anchored else base
    top = toplevel(where)
    full = (base / raw).resolve() if anchored else (top / raw).resolve()
    try:
        rel = full.relative_to(top).as_posix()
    except ValueError:
        raise GitError(f"{raw}: outside the git repository at {top}") from None
    _check_rev(rev, top)
    text = _show(rev, rel, top)
    label = f"{rev}:{rel}"
    lock_text = _show(rev, Path(rel).with_suffix(".lock").as_posix(), top) if text is not None else None
    return Side(label if text is not None else f"{label} (no such file)", text, full, rev, lock_text)


def file_side(path: str) -> Side:
    """A pipeline file on disk (or ``/dev/null``: no file)."""
    if path == DEV_NULL:
        return Side(DEV_NULL, None, Path(os.devnull))
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except FileNotFoundError:
        raise WeightflowError(f"{path}: no such pipeline file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightflowError(f"{path}: cannot read the pipeline file: {exc}") from None
    return Side(path, text, p.resolve())


def _is_spec(arg: str) -> bool:
    """``REV:PATH`` rather than a file name (a file that exists wins, as in git)."""
    return ":" in arg and arg != DEV_NULL and not Path(arg).exists()


def _side(arg: str) -> Side:
    if _is_spec(arg):
        rev, _, path = arg.partition(":")
        if not path:
            raise WeightflowError(f"'{arg}': expected REV:PATH (a path after the colon)")
        return git_side(rev, path)
    return file_side(arg)


def _working(path: str) -> Side:
    if not Path(path).is_file():
        raise WeightflowError(f"{path}: no such pipeline file in the working copy")
    return file_side(path)


def _rev_of(path: str, rev: str) -> Side:
    """``rev`` of the working-copy file ``path`` (given relative to the current directory)."""
    full = Path(path).resolve()
    top = toplevel(_existing_dir(full.parent))
    try:
        rel = full.relative_to(top)
    except ValueError:
        raise GitError(f"{path}: outside the git repository at {top}") from None
    return git_side(rev, rel.as_posix(), top)


def resolve(args: list[str]) -> tuple[Side, Side]:
    """The (old, new) sides named by ``weightflow diff``'s positional arguments."""
    if not args:
        raise WeightflowError("diff needs a pipeline: weightflow diff PIPELINE (HEAD against the "
                              "working copy), diff REV PIPELINE, diff REV1 REV2 PIPELINE or diff OLD NEW")
    if len(args) == 1:
        (arg,) = args
        if _is_spec(arg):  # REV:PATH against the working copy of PATH
            old = _side(arg)
            return old, _working(str(old.path))
        return _rev_of(arg, "HEAD"), _working(arg)
    if len(args) == 2:
        a, b = args
        if a == DEV_NULL or _is_spec(a) or Path(a).exists():
            return _side(a), _side(b)
        # a bare revision: REV against the working copy of B (or against B's own revision)
        if b == DEV_NULL:
            raise WeightflowError(f"'{a}' is neither a pipeline file nor a REV:PATH spec "
                                  "(beside /dev/null, give a file or REV:PATH)")
        if _is_spec(b):
            new = _side(b)
            return git_side(a, new.path), new
        new = _working(b)
        return _rev_or_file(a, b), new
    if len(args) == 3:
        r1, r2, path = args
        return _rev_of(path, r1), _rev_of(path, r2)
    raise WeightflowError(f"diff takes at most 3 arguments (got {len(args)}); for git's external "
                          "diff driver use --git-driver")


def _rev_or_file(rev: str, path: str) -> Side:
    try:
        return _rev_of(path, rev)
    except GitError as exc:
        if "unknown git revision" in str(exc):
            raise GitError(f"'{rev}' is neither a pipeline file nor a git revision: {exc}") from None
        raise


def driver_sides(argv: list[str]) -> tuple[Side, Side, str]:
    """The sides of git's external diff call: ``path old-file old-hex old-mode new-file new-hex
    new-mode`` (git runs the driver in the top level; a ``/dev/null`` file is an added or
    removed file).  Both are parsed at the working-copy path of ``path``."""
    path = argv[0]
    old_file, old_hex, new_file, new_hex = argv[1], argv[2], argv[4], argv[5]
    cwd = Path.cwd()
    try:
        top = toplevel(cwd)
    except GitError:
        top = cwd
    full = (top / path).resolve()

    def read(file: str, hexsha: str, prefix: str) -> Side:
        label = f"{prefix}/{path}"
        if file == DEV_NULL:
            return Side(label + " (no such file)", None, full)
        try:
            text = Path(file).read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise WeightflowError(f"{file}: cannot read the {prefix} side of {path}: {exc}") from None
        short = hexsha[:7] if hexsha.strip("0") and hexsha != "." else ""
        return Side(label + (f" ({short})" if short else ""), text, full)

    return read(old_file, old_hex, "a"), read(new_file, new_hex, "b"), path
