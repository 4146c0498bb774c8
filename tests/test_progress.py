"""Progress in a job log is whole lines, a few seconds apart; on a terminal it is tqdm's bar."""
from __future__ import annotations

import io

from lorabake import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_log_file_gets_one_line_every_interval_and_one_at_the_end(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    log = io.StringIO()
    with progress.progress(100, "train demo", unit="step", file=log) as reporter:
        assert isinstance(reporter, progress.LineProgress)
        for step in range(100):
            clock.now += 0.5  # two steps a second: a line every 10 steps
            reporter.set_postfix(loss=f"{1 / (step + 1):.3f}")
            reporter.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0] == "train demo: 10/100 step (10%), 2.00 step/s, 0:45 left, loss=0.100"
    assert lines[-1] == "train demo: 100/100 step (100%), 2.00 step/s, loss=0.010"


def test_a_terminal_gets_tqdm():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    reporter = progress.progress(3, "samples", file=Terminal())
    assert type(reporter).__name__ == "tqdm"
    reporter.close()
