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


def test_data_loader_workers_leave_stop_signals_to_the_trainer_and_die_with_it() -> None:
    """The reference loader's worker init: stop signals ignored (the trainer finishes its step with the
    workers' batches), and the kernel's parent-death signal set to SIGKILL."""
    script = textwrap.dedent(
        """
        import ctypes, signal
        from data_dali.reference_loader import _worker_init
        _worker_init(0)
        stops = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        print([signal.getsignal(s) is signal.SIG_IGN for s in stops])
        value = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
        print(value.value)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["[True, True, True]", str(int(signal.SIGKILL))]
