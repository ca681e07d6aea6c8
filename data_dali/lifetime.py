"""Process lifetime for long jobs: stop signals turned into a request polled at safe points, data workers
that ignore them and die with their parent, and the exit codes a stop ends with.

Cluster schedulers preempt with SIGTERM (SLURM, Kubernetes, spot instances) and then SIGKILL after a
grace period; SLURM's `--signal` sends SIGUSR1 ahead of a time limit. Long jobs (`miles pretrain`,
`miles prepare`) therefore turn the first such signal into a request that the job polls between units
of work (a training step, a clip), save what they have, and exit with a code a requeue script can tell
apart from a failure. A second Ctrl-C exits at once. The data layer (loaders, `miles prepare`) needs this
as much as the trainer does, so it lives here, below both; `miles.stop` adds the application's exit codes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from types import FrameType, TracebackType

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "STOP_SIGNALS",
    "GracefulStop",
    "StopRequested",
    "die_with_parent",
    "exit_code_for",
    "ignore_stop_signals",
]

EXIT_PREEMPTED = 75  # SIGTERM / SIGUSR1: state saved, `--resume` (or the same command) continues; EX_TEMPFAIL
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): state saved as for SIGTERM; 128 + SIGINT, as shells report it

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this (worker) process when its parent dies, however the parent ends;
    Linux prctl, False where unavailable. Workers blocked on inherited pipes would otherwise live on."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # prctl is variadic: pass the unsigned long arguments at their full width.
        args = (ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
        return libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), *args) == 0
    except (OSError, AttributeError):
        return False


def ignore_stop_signals() -> None:
    """In a data worker: the parent decides what a stop signal means and finishes its step with the
    worker's help. Schedulers signal every process of a job and Ctrl-C the whole process group; a
    worker that died of it would fail the parent's step (torch raises at once on a dead worker)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_code_for(signum: int) -> int:
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


class StopRequested(Exception):
    """A job stopped at a safe point on a signal; the message says what was saved and how to go on."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_code_for(signum)


class GracefulStop:
    """Within the block, SIGTERM / SIGUSR1 / SIGINT only set `requested`; the job polls it.

    A second SIGINT exits at once (code 130) without a traceback. Outside the main thread (where Python
    cannot install handlers) it does nothing. Previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            sys.stderr.write("\nmiles: second interrupt, exiting now without saving\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        if self.signum is None:
            self.signum = signum
            sys.stderr.write(
                f"\nmiles: {signal.Signals(signum).name} received: stopping at the next safe point "
                "(Ctrl-C again to exit at once)\n"
            )
            sys.stderr.flush()

    def request(self, signum: int) -> None:
        """Ask for a stop as if `signum` had arrived (another rank got it, or a test)."""
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
