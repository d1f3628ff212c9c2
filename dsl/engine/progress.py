"""Progress of a long step: a bar on a terminal, a line every few seconds in a log.

tqdm draws its bar only on a terminal (the CLI turns it off when stderr is a pipe), so
under ``make`` or in a CI log a 12-minute fine-tune printed "running" and then nothing.
Every op's ``ctx.progress(...)`` bar is a :class:`Bar`: on a terminal it is the tqdm bar;
elsewhere it prints ``STEP: train step 120/500 (24%), 1m10s elapsed, ETA 3m42s, loss
0.4123`` through ``ctx.log`` (which ``run --quiet`` silences) every
$WEIGHTFLOW_PROGRESS_INTERVAL seconds (default 15).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

PROGRESS_INTERVAL_ENV = "WEIGHTFLOW_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 15.0  # seconds between lines: a CI log shows life, not noise


def progress_interval() -> float:
    """Seconds between progress lines: $WEIGHTFLOW_PROGRESS_INTERVAL, else the default.

    A value that is not a number >= 0 falls back to the default rather than failing a
    long run over a typo in an environment variable.
    """
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_PROGRESS_INTERVAL
    except ValueError:
        return DEFAULT_PROGRESS_INTERVAL
    return value if math.isfinite(value) and value >= 0 else DEFAULT_PROGRESS_INTERVAL


def _duration(seconds: float) -> str:
    """``seconds`` as 42s, 3m05s or 1h02m: short enough for a log line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLines:
    """A progress line every ``interval`` seconds where the bar is not drawn (on a
    terminal, ``ctx.show_progress``, it prints nothing: the bar says it all)."""

    def __init__(self, ctx, total: int, what: str, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        log = getattr(ctx, "log", None)
        self._log = None if getattr(ctx, "show_progress", False) or not callable(log) else log
        self._step = getattr(ctx, "step", "")
        self._total = total
        self._what = what
        self._interval = progress_interval() if interval is None else interval
        self._clock = clock
        self._started = self._last = clock()

    def update(self, done: int, **numbers: float) -> None:
        """``done`` of the total are finished; ``numbers`` (loss, lr) go on the line."""
        if self._log is None:
            return
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._last = now
        elapsed = now - self._started
        parts = [f"{self._what} {done}/{self._total} ({100 * done / max(self._total, 1):.0f}%)",
                 f"{_duration(elapsed)} elapsed"]
        if 0 < done < self._total:
            parts.append(f"ETA {_duration(elapsed / done * (self._total - done))}")
        parts += [f"{name} {value:.4g}" for name, value in numbers.items()]
        self._log(f"{self._step}: {', '.join(parts)}")


class Bar:
    """What ``ctx.progress`` returns: tqdm's ``update`` / ``set_postfix`` / context
    manager, driving the tqdm bar (terminal) and :class:`ProgressLines` (logs)."""

    def __init__(self, ctx, total: int, desc: str, unit: str, show: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=f"{ctx.step}: {desc}", unit=unit, leave=False, disable=not show,
                         dynamic_ncols=True)
        self._lines = ProgressLines(ctx, total, desc)
        self._done = 0
        self._numbers: dict[str, float] = {}

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        self._done += n
        self._lines.update(self._done, **self._numbers)

    def set_postfix(self, **numbers) -> None:
        """Numbers shown with the progress (loss, lr): formatted on the bar and the line."""
        self._numbers = {k: float(v) for k, v in numbers.items() if isinstance(v, (int, float))}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in self._numbers.items()}, refresh=False)

    def set_postfix_str(self, text: str) -> None:
        """What is being worked on (shown on the bar only)."""
        self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
