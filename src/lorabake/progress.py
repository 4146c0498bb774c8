"""Progress of long work: tqdm's bar on a terminal; in a log file, one plain line every few seconds.

tqdm redraws its bar with carriage returns, which a terminal shows as one moving line and a job log
(Snakemake's `logs/<rule>/….log`) keeps as one line thousands of characters long. Where stderr is
not a terminal, `progress` prints a whole line at most every LOG_INTERVAL seconds, and at the end.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

LOG_INTERVAL = 5.0  # seconds between two lines in a log file
T = TypeVar("T")


def progress(total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
             file: TextIO | None = None):
    """A progress reporter with tqdm's `update(n)`, `set_postfix(**values)` and `close()`."""
    file = file or sys.stderr
    if disable or file.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file, disable=disable)
    return LineProgress(total, desc, unit, initial, file)


def track(items: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterator[T]:
    """Iterate over `items`, reporting one step per item."""
    with progress(total, desc, unit) as reporter:
        for item in items:
            yield item
            reporter.update()


class LineProgress:
    """`desc: 40/80 steps (50%), 2.1 steps/s, 0:19 left, loss=0.1234`, one line at a time."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, file: TextIO,
                 interval: float = LOG_INTERVAL):
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n = self.started_at = initial
        self.start = self.last = time.monotonic()
        self.postfix, self.printed = "", None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval or self.n >= self.total:
            self._print(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self.printed != self.n:
            self._print(time.monotonic())

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _print(self, now: float) -> None:
        done, elapsed = self.n - self.started_at, max(now - self.start, 1e-9)
        rate = done / elapsed
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = (self.total - self.n) / rate if rate > 0 else math.inf
        eta = f", {_clock(left)} left" if math.isfinite(left) and self.n < self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {rate:.2f} {self.unit}/s{eta}{extra}",
              file=self.file, flush=True)
        self.last, self.printed = now, self.n


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
