"""Errors a user can act on: every problem names the file, line, column and step.

The whole front end (YAML reading, validation, graph checks) collects ``Diagnostic``
objects instead of raising on the first problem, so one ``validate`` shows every
mistake in a file.  ``PipelineError`` carries the list to the CLI, which prints them
and exits with status 2 -- never a Python traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem at one place of a pipeline file."""

    file: str
    line: int
    col: int
    message: str
    step: str | None = None
    severity: str = field(default="error", compare=False)

    def format(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}:"
        who = f" step '{self.step}':" if self.step else ""
        tag = " warning:" if self.severity == "warning" else ""
        return f"{where}{tag}{who} {self.message}"

    def as_json(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "step": self.step,
            "severity": self.severity,
            "message": self.message,
        }


class WeightflowError(Exception):
    """Base of every error the CLI reports without a traceback (exit status 2)."""

    exit_code = 2

    def lines(self) -> list[str]:
        return [f"error: {self}"]


class PipelineError(WeightflowError):
    """A pipeline file is invalid; holds every diagnostic found in it."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.file, d.line, d.col, d.message))
        super().__init__("\n".join(d.format() for d in self.diagnostics))

    def lines(self) -> list[str]:
        return [d.format() for d in self.diagnostics]


class StepFailed(WeightflowError):
    """An op failed while running; names the step and keeps finished cache entries."""

    exit_code = 1

    def __init__(self, step: str, message: str, where: str = ""):
        self.step = step
        self.detail = message
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}step '{step}' failed: {message}")


class OpError(WeightflowError):
    """Raised by an op for bad input it can only see at run time (shapes, files)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
