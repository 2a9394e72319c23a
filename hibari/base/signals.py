"""Ctrl-C before a training loop has taken SIGINT over.

`hibari.cli.main` installs an `InterruptRecorder` as the SIGINT handler: it raises
KeyboardInterrupt (the command exits 130) and remembers that it did. A KeyboardInterrupt raised
while Python runs a finalizer (`__del__`) or a library callback is only printed, never
propagated; the training loop's own handler (`hibari.train.loop.StopSignal`) checks the record
when it takes over, so an interrupt that was swallowed on its way still stops the run before
its first step instead of being lost.
"""
from __future__ import annotations


class InterruptRecorder:
    """A SIGINT handler: remember the interrupt, then raise KeyboardInterrupt."""

    def __init__(self):
        self.received = False

    def __call__(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt
