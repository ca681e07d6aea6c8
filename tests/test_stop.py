"""Stop signals: the first asks for a safe stop, a second Ctrl-C exits at once; exit codes are fixed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from miles.stop import EXIT_INTERRUPTED, EXIT_PREEMPTED, GracefulStop, StopRequested


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_first_signal_only_requests_a_stop(sig: signal.Signals) -> None:
    previous = signal.getsignal(sig)
    with GracefulStop() as stop:
        assert not stop.requested
        signal.raise_signal(sig)  # the handler runs here, in the main thread
        assert stop.requested and stop.signum == sig and stop.signal_name == sig.name
    assert signal.getsignal(sig) is previous  # handlers restored


def test_stop_requested_carries_the_documented_exit_code() -> None:
    assert StopRequested(signal.SIGTERM, "x").exit_code == EXIT_PREEMPTED == 75
    assert StopRequested(signal.SIGUSR1, "x").exit_code == EXIT_PREEMPTED
    assert StopRequested(signal.SIGINT, "x").exit_code == EXIT_INTERRUPTED == 130


def test_a_second_ctrl_c_exits_at_once_without_a_traceback() -> None:
    script = textwrap.dedent(
        """
        import os, signal, time
        from miles.stop import GracefulStop
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            print("first:", stop.signal_name, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("still running", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert proc.stdout == "first: SIGINT\n"
    assert "second interrupt, exiting now" in proc.stderr and "Traceback" not in proc.stderr
