"""Ctrl-C, SIGTERM and SIGHUP during training: finish the current step, save a checkpoint, return.

The loop asks :class:`StopRequest` after every window (all processes vote, so they stop together); the
command line then exits with ``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP: the
terminal or SSH session closed; a run started under ``nohup`` ignores SIGHUP, and so it stays). While a checkpoint is
written, signals wait for the write to end (:meth:`StopRequest.deferred`): a second Ctrl-C pressed while the
first one's checkpoint is written leaves that checkpoint whole, and the run resumable from it.
"""

import os
import signal
import threading
from contextlib import contextmanager

from tqdm import tqdm

# The signals that ask a run to stop with a checkpoint (SIGHUP: not on Windows).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _stop_signals() -> tuple:
    """:data:`STOP_SIGNALS` less a SIGHUP the process was told to ignore (``nohup``): it keeps running."""
    return tuple(number for number in STOP_SIGNALS
                 if not (number == getattr(signal, "SIGHUP", None) and signal.getsignal(number) is signal.SIG_IGN))


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun every process gets the signal; one of them says so
        return
    try:
        tqdm.write(text)
    except OSError:  # after SIGHUP the terminal may be gone: the checkpoint matters, not the message
        pass


class StopRequest:
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP: finish the current step, save a checkpoint, return. A second Ctrl-C
    interrupts at once (``KeyboardInterrupt``), or, during a checkpoint's write, once it is written
    (:meth:`deferred`)."""

    def __init__(self):
        self.requested = False
        self.signal_number = None  # which signal asked: the exit status is 128 + it (130 Ctrl-C, 143 SIGTERM)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_number = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        at_once = "Ctrl-C again" if signum == signal.SIGINT else "Ctrl-C (SIGINT)"  # SIGTERM again: the same
        _say(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
             f"({at_once} to stop at once)")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {number: signal.getsignal(number) for number in _stop_signals()}
        for number in previous:
            signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    @contextmanager
    def deferred(self, stopping: bool):
        """Within the ``with`` (a checkpoint being written), the stop signals wait for its end.

        A signal arriving inside is then handled as if it came at the end: the first asks to stop, as ever; a
        second Ctrl-C stops at once (``KeyboardInterrupt``), unless ``stopping``: the checkpoint is the stop's
        own, and the run returns right after it anyway, with the usual exit status.
        """
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        arrived = []

        def wait(signum, frame) -> None:
            arrived.append(signum)
            _say(f"\n{signal.Signals(signum).name}: waiting for the checkpoint being written to be complete")

        previous = {number: signal.getsignal(number) for number in _stop_signals()}
        for number in previous:
            signal.signal(number, wait)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        for signum in [] if stopping else arrived:  # (only once the write succeeded: an error stays the error)
            handler = signal.getsignal(signum)  # the first one's handler installs the second one's
            if callable(handler):
                handler(signum, None)
