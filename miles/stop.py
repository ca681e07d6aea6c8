"""Exit codes of the `miles` commands, and the faults a run stops itself on.

Stopping at a safe point on a scheduler's or the user's signal is `data_dali.lifetime` (the data layer
needs it too); its names are re-exported here, so the application has one place for how a job ends.
"""

from __future__ import annotations

from data_dali.lifetime import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    STOP_SIGNALS,
    GracefulStop,
    StopRequested,
    die_with_parent,
    exit_code_for,
    ignore_stop_signals,
)

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_FAILED",
    "EXIT_PREEMPTED",
    "EXIT_INTERRUPTED",
    "STOP_SIGNALS",
    "GracefulStop",
    "NonFiniteError",
    "RunFailed",
    "StopRequested",
    "die_with_parent",
    "exit_code_for",
    "ignore_stop_signals",
]

EXIT_OK = 0
EXIT_REFUSED = 2  # bad input: config, manifest, checkpoint, data; nothing was changed
EXIT_FAILED = 3  # the run stopped itself: non-finite training, a checkpoint that could not be written


class RunFailed(RuntimeError):
    """The run stopped itself on a fault it cannot go on through; the message names what to fix."""

    exit_code = EXIT_FAILED


class NonFiniteError(RunFailed):
    """A NaN / inf loss, gradient norm, weight or score: never trained through or reported as a result."""
