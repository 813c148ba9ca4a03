"""Progress a person sees during long work: a tqdm bar on a terminal; where no one watches a terminal (CI
logs, a service's journal, a pipe) one plain line every ``PROGRESS_EVERY_S`` seconds (default 30; the
environment variable PROVENANCE_GUARD_PROGRESS_S changes it) or at each further tenth of the work, and a
last line with the time it took. A step that cannot count its work (one FAISS training call) gets a
heartbeat: the elapsed time and, when the caller can estimate it, the time expected.

Everything here writes to stderr, never stdout (which carries `check --json`).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO
from collections.abc import Iterator

ENV_EVERY = "PROVENANCE_GUARD_PROGRESS_S"
PROGRESS_EVERY_S = 30.0


def every_s() -> float:
    try:
        value = float(os.environ.get(ENV_EVERY, PROGRESS_EVERY_S))
    except ValueError:
        return PROGRESS_EVERY_S
    return value if value > 0 else PROGRESS_EVERY_S


def duration(seconds: float) -> str:
    """3 s, 1m10s, 2h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _interactive(file: IO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """The part of tqdm's interface the package uses (update, close, n, total), as plain log lines."""

    def __init__(self, total: int | None, desc: str, unit: str, file: IO, every: float | None = None):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n = 0
        self.every = every_s() if every is None else every
        self.started = self._last = time.monotonic()
        self._tenth = 0
        self._closed = False

    def _say(self, text: str) -> None:
        try:
            print(f"{self.desc}: {text}", file=self.file, flush=True)
        except (OSError, ValueError):  # a closed pipe must not stop the work
            pass

    def _units(self, n: int) -> str:
        unit = self.unit
        return unit + "s" if n != 1 and unit and not unit.endswith("s") else unit

    def _status(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.total:
            done = self.n / self.total
            eta = f", about {duration(elapsed * (1 - done) / done)} left" if 0 < done < 1 else ""
            return f"{self.n:,}/{self.total:,} {self._units(self.total)} ({done:.0%}) in {duration(elapsed)}{eta}"
        return f"{self.n:,} {self._units(self.n)} in {duration(elapsed)}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        tenth = int(10 * self.n / self.total) if self.total else 0
        if now - self._last >= self.every or (tenth > self._tenth and self.n < (self.total or 0)):
            self._last, self._tenth = now, max(tenth, self._tenth)
            self._say(self._status())

    def set_postfix_str(self, text: str) -> None:  # tqdm's; a line carries the count only
        pass

    def clear(self) -> None:  # tqdm's: lines need no clearing before other output
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._say(f"done, {self.n:,} {self._units(self.n)} in {duration(time.monotonic() - self.started)}")

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "item", enabled: bool = True,
             file: IO | None = None, leave: bool = True):
    """A progress bar of total units: tqdm on a terminal, LineProgress elsewhere, a silent tqdm when not
    enabled."""
    from tqdm import tqdm

    file = file or sys.stderr
    if enabled and not _interactive(file):
        return LineProgress(total, desc, unit, file)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, file=file,
                dynamic_ncols=True, leave=leave)


@contextmanager
def heartbeat(desc: str, expected_s: float | None = None, enabled: bool = True,
              file: IO | None = None) -> Iterator[None]:
    """Reports a step that cannot count its work while it runs: on a terminal a bar of elapsed seconds
    (against expected_s when given), elsewhere a line every ``every_s()`` seconds, and the time it took."""
    if not enabled:
        yield
        return
    file = file or sys.stderr
    stop = threading.Event()
    started = time.monotonic()
    expect = f" (about {duration(expected_s)} expected)" if expected_s else ""
    if _interactive(file):
        from tqdm import tqdm

        total = max(1, int(expected_s)) if expected_s else None
        bar = tqdm(total=total, desc=desc, unit="s", file=file, dynamic_ncols=True,
                   bar_format="{desc}: {bar}| {elapsed} of about {total}s" if total else "{desc}: {elapsed}")

        def tick() -> None:
            while not stop.wait(0.5):
                seconds = int(time.monotonic() - started)
                bar.n = min(seconds, total - 1) if total else seconds
                bar.refresh()
    else:
        bar = None
        line = LineProgress(None, desc, "", file)
        line._say(f"started{expect}")

        def tick() -> None:
            while not stop.wait(line.every):
                line._say(f"{duration(time.monotonic() - started)} elapsed{expect}")

    thread = threading.Thread(target=tick, name="provenance-guard-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if bar is not None:
            bar.n = bar.total or int(time.monotonic() - started)
            bar.refresh()
            bar.close()
        else:
            line._say(f"done in {duration(time.monotonic() - started)}")
