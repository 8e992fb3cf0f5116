"""Progress on stderr for the long commands (profile, demo, bench): a bar for counted work and a
ticking clock for work that cannot be counted (a search). On a terminal they redraw one line; in a
log (not a terminal) they print a line at each quarter and at the end, so logs stay short.

    with Bar(20, "training") as bar:
        for step in range(20):
            ...
            bar.advance(f"loss {loss:.4f}")
    with Clock("planning GPT-3 175B"):
        plan = autopar.plan(...)
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

WIDTH = 28


class Bar:
    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"progress total: found {total!r}, required an integer >= 1")
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._tty = self.stream.isatty()
        self._quarter = 0

    def advance(self, note: str = "", by: int = 1) -> None:
        self.done = min(self.total, self.done + by)
        filled = WIDTH * self.done // self.total
        line = (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:5.1f}s {note}")
        if self._tty:
            self.stream.write("\r" + line.ljust(100)[:160])
        elif 4 * self.done // self.total > self._quarter:
            self._quarter = 4 * self.done // self.total
            self.stream.write(line + "\n")
        self.stream.flush()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


class Clock:
    """Shows `label` and the seconds elapsed, redrawn every half second on a terminal."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label, self.stream = label, stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self.seconds = 0.0

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self.stream.write(f"\r{self.label} … {time.perf_counter() - self._start:5.1f}s")
            self.stream.flush()

    def __enter__(self) -> Clock:
        self._start = time.perf_counter()
        if self.stream.isatty():
            self._thread.start()
        else:
            self.stream.write(f"{self.label} …\n")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.seconds = time.perf_counter() - self._start
        outcome = "failed" if exc[0] is not None else "done"
        self.stream.write(f"\r{self.label}: {outcome} in {self.seconds:.1f}s\n")
        self.stream.flush()
