"""Progress that shows where it is read: a tqdm bar on a terminal, plain log lines anywhere else.

tqdm's bar is one line redrawn with carriage returns; in a log file, a CI job or a pipe it is either
disabled (`disable=None`) or a smear of partial lines. `progress(...)` returns the bar when stderr is a
terminal and otherwise a `LineProgress` with the same small interface (`update`, `set_postfix_str`,
`set_postfix`, `close`) that prints whole lines: one every `interval` seconds and one at the end
(`interval=0`: one per update, e.g. per finished cell of a comparison).

A leaf utility below the layers (stdlib + tqdm): the CLI, the trainer and the evaluation use it.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60):02d} s"


class LineProgress:
    """`desc: n/total unit [postfix], elapsed, ETA` lines on `file`, at most one per `interval` seconds
    (plus the last one, when the total is reached or at close)."""

    def __init__(self, total: int | None, desc: str, unit: str = "step", *, initial: int = 0,
                 interval: float = 10.0, file: TextIO | None = None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.file, self.clock = interval, file, clock
        self.postfix = ""
        self._start = self._last = clock()
        self._initial = initial
        self._printed_at = None          # n of the last line printed

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if (self.total is not None and self.n >= self.total) or now - self._last >= self.interval:
            self._line(now)

    def close(self) -> None:
        if self._printed_at != self.n and self.n != self._initial:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        elapsed = now - self._start
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        text = f"{self.desc}: {count} {self.unit}{'' if (self.total or self.n) == 1 else 's'}"
        if self.postfix:
            text += f" [{self.postfix}]"
        text += f", {_seconds(elapsed)}"
        done = self.n - self._initial
        if self.total is not None and 0 < done and self.n < self.total:
            text += f", ETA {_seconds(elapsed / done * (self.total - self.n))}"
        print(text, file=self.file or sys.stderr, flush=True)
        self._last, self._printed_at = now, self.n


def progress(total: int | None, desc: str, unit: str = "step", *, leave: bool = True, initial: int = 0,
             interval: float = 10.0, lines: bool = True, file: TextIO | None = None, **tqdm_kwargs):
    """A tqdm bar when `file` (default stderr) is a terminal; else a `LineProgress` (or, with lines=False,
    a silent one: for inner bars whose lines would only repeat what an outer progress says)."""
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, initial=initial, file=stream, **tqdm_kwargs)
    return LineProgress(total, desc, unit, initial=initial, interval=interval, file=stream) if lines else _Silent()


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...
    def set_postfix(self, refresh: bool = True, **kw) -> None: ...
    def close(self) -> None: ...
