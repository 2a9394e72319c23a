"""Progress that shows anywhere: a tqdm bar on a terminal, otherwise (a log file, CI, `nohup`, a
notebook) plain lines to a log function about every `every` seconds, with the rate and ETA, and
one closing line.

    progress = Progress("pairwise", total, log, " judging prompts")   # lines only
    bar = progress_bar("train", total, unit=" steps", exclude_first=True)  # tqdm on a tty
    for chunk in chunks:
        ...
        bar.set_postfix(loss="3.21")          # shown in the bar / appended to the lines
        bar.advance(len(chunk))               # or bar.update(done_so_far)
    seconds = bar.finish()
    for item in progress_bar("clean+filter", len(items), unit=" shards").track(items): ...

`exclude_first=True` measures the rate (and so the ETA) from the end of the first advance: a
first step that compiles does not inflate the estimate (the bar's clock starts there too).
"""
from __future__ import annotations

import sys
import time
from typing import IO, Any, Callable, Iterable, Iterator

EVERY_S = 10.0


class Progress:
    """'<phase>: done/total<unit> (rate/s, ETA s)' at most every `every` seconds while work
    remains; `finish` logs '<phase>: done/total<unit> in S s' and returns S. A postfix
    (`set_postfix(loss="3.2")`) is appended to both lines as ' loss=3.2'. With a `bar` (a tqdm),
    the bar shows the progress instead and no lines are logged. `total=None`: no ETA."""

    def __init__(self, phase: str, total: int | None, log: Callable[[str], None], unit: str = "",
                 every: float = EVERY_S, clock: Callable[[], float] = time.monotonic, *,
                 initial: int = 0, exclude_first: bool = False, bar: Any = None):
        self.phase, self.total, self.log, self.unit, self.every = phase, total, log, unit, every
        self.clock, self.bar = clock, bar
        self.done = self.base = initial  # the rate counts from `base` (done at the rate's start)
        self.t0 = self.start = self.last = clock()  # start: the rate's; t0: finish's seconds
        self.wait_first = exclude_first
        self.postfix: dict[str, str] = {}

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        now = self.clock()
        if self.wait_first:  # the first advance (compilation) is left out of the rate
            self.wait_first = False
            self.done = self.base = done
            self.start = self.last = now
            if self.bar is not None:  # tqdm's rate: (n - initial) / (time since start_t)
                bar = self.bar
                bar.n = bar.initial = done
                bar.start_t = bar.last_print_t = bar._time()  # no rate shown until the next
                bar.refresh()
            return
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        if self.bar is None and now - self.last >= self.every and \
                (self.total is None or self.done < self.total):
            self.last = now
            speed = (self.done - self.base) / max(now - self.start, 1e-9)
            if self.total is None:
                rate = f"({speed:.2g}/s)"
            else:
                eta = (self.total - self.done) / speed if speed else float("inf")
                rate = f"({speed:.2g}/s, ETA {eta:.0f} s)"
            self.log(f"{self.phase}: {self._count()} {rate}{self._postfix()}")

    def add_total(self, n: int) -> None:
        """More work than first known (e.g. the requests of another pass)."""
        self.total = (self.total or 0) + n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update({k: str(v) for k, v in values.items()})
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def track(self, items: Iterable) -> Iterator:
        """Yield `items`, advancing by one after each; `finish` when they run out."""
        for item in items:
            yield item
            self.advance(1)
        self.finish()

    def finish(self) -> float:
        seconds = self.clock() - self.t0
        if self.bar is not None:
            self.bar.close()
        else:
            self.log(f"{self.phase}: {self._count()} in {seconds:.1f} s{self._postfix()}")
        return seconds

    def _count(self) -> str:
        total = "" if self.total is None else f"/{self.total}"
        return f"{self.done}{total}{self.unit}"

    def _postfix(self) -> str:
        return "".join(f" {k}={v}" for k, v in self.postfix.items())


def progress_bar(phase: str, total: int | None, *, unit: str = "", initial: int = 0,
                 exclude_first: bool = False, stream: IO[str] | None = None,
                 log: Callable[[str], None] | None = None, every: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True,
                 tty: bool | None = None) -> Progress:
    """A `Progress` that shows as a tqdm bar when `stream` (default: stderr) is a terminal and
    as plain lines (to `log`, default: printed to `stream`) otherwise; `enabled=False` shows
    nothing (e.g. on non-main hosts). `tty` overrides the terminal check."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return Progress(phase, total, lambda line: None, unit, every, clock, initial=initial,
                        exclude_first=exclude_first)
    if tty is None:
        tty = bool(getattr(stream, "isatty", lambda: False)())
    bar = None
    if tty:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=initial, desc=phase, unit=unit.strip() or "it",
                   file=stream, dynamic_ncols=True, smoothing=0 if exclude_first else 0.3)
    if log is None:
        log = lambda line: print(line, file=stream, flush=True)  # noqa: E731
    return Progress(phase, total, log, unit, every, clock, initial=initial,
                    exclude_first=exclude_first, bar=bar)
