"""SIGTERM and SIGHUP end a command like Ctrl-C does: through the same cleanup, then exit 128 + signal.

``timeout``, ``kill``, systemd and docker stop a program with SIGTERM, a closed terminal sends SIGHUP;
by default Python dies on them at once, leaving a half-written temporary output (hundreds of MB) and
its lock behind. ``signals_as_interrupts()`` turns them into ``Terminated``, a ``KeyboardInterrupt``,
so every ``finally`` and ``except BaseException`` that cleans up after Ctrl-C runs for them too
(strataprune/runtime/outputs.py removes its temporary folder, the leaderboard stops its workers, an
engine install kills its pip). Further signals during that cleanup are ignored, so it finishes; SIGKILL
still ends the process at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: the signals handled like SIGINT
HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; raised in the main thread, cleaned up like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise ``Terminated`` once in the main thread; later ones are ignored.
    (SIGINT keeps Python's handler: a second Ctrl-C still interrupts a slow cleanup.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:  # the cleanup of the first signal is running: let it finish
            return
        raised = True
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, stop) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
