"""Progress that shows without a terminal: plain lines to a log function (stderr, a log file,
CI) about every `every` seconds, with the rate and ETA, and one closing line.

    progress = Progress("pairwise", total, log, " judging prompts")
    for chunk in chunks:
        ...
        progress.advance(len(chunk))          # or progress.update(done_so_far)
    seconds = progress.finish()
"""
from __future__ import annotations

import time
from typing import Callable

EVERY_S = 10.0


class Progress:
    """'<phase>: done/total<unit> (rate/s, ETA s)' at most every `every` seconds while work
    remains; `finish` logs '<phase>: done/total<unit> in S s' and returns S."""

    def __init__(self, phase: str, total: int, log: Callable[[str], None], unit: str = "",
                 every: float = EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.phase, self.total, self.log, self.unit, self.every = phase, total, log, unit, every
        self.clock = clock
        self.done = 0
        self.start = self.last = clock()

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            speed = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / speed if speed else float("inf")
            self.log(f"{self.phase}: {self.done}/{self.total}{self.unit} ({speed:.2g}/s, "
                     f"ETA {eta:.0f} s)")

    def finish(self) -> float:
        seconds = self.clock() - self.start
        self.log(f"{self.phase}: {self.done}/{self.total}{self.unit} in {seconds:.1f} s")
        return seconds
