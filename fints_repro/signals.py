"""A run stopped from outside: SIGTERM (SLURM's ``scancel``, a time limit, preemption, a
container stop) or SIGINT (Ctrl-C).

Inside ``stop_on_signals`` either signal raises :class:`Interrupted` in the main thread,
at once: the batch in flight is abandoned, everything finished before it is already on
disk (each generated batch is appended and flushed as it completes; adapters, vectors and
pairs are saved whole or not at all), and the exception unwinds the run through its
``finally`` blocks, which unload adapters and close the tracker (marked preempted). The
entry point then writes ``INTERRUPTED`` into the run dir and exits with
``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), the shell's convention for a
process stopped by a signal. The same command resumes the run.

``Interrupted`` is a ``BaseException`` (like ``KeyboardInterrupt``), so no
``except Exception`` on the way, a library's included, can swallow it. While the run
unwinds, further SIGTERM / SIGINT are logged and ignored, so that the cleanup completes;
SIGKILL still ends the process at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The run received SIGTERM or SIGINT (``signum``)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` inside the block (main thread only;
    elsewhere signals cannot be caught and the block runs as it is). The handlers that
    were installed before are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum: int, frame) -> None:
        nonlocal stopping
        name = signal.Signals(signum).name
        if stopping:
            log.warning("%s received again: the run is already stopping (SIGKILL ends it at once)",
                        name)
            return
        stopping = True
        log.warning("%s received: stopping; what was finished is on disk, and the same command "
                    "resumes the run", name)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
