"""Ctrl-C and SIGTERM during training: finish the current step, save a checkpoint, return.

The loop asks :class:`StopRequest` after every window (all processes vote, so they stop together); the
command line then exits with ``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM).
"""

import signal
import threading
from contextlib import contextmanager

from tqdm import tqdm


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, return. A second Ctrl-C
    interrupts at once (``KeyboardInterrupt``)."""

    def __init__(self):
        self.requested = False
        self.signal_number = None  # which signal asked: the exit status is 128 + it (130 Ctrl-C, 143 SIGTERM)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_number = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                   "(Ctrl-C again to stop at once)")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        for number in previous:
            signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
