"""Deterministic crash injection for the fault tests (and for anyone rehearsing a preemption).

`NEMO_TST_KILL_AT=<iteration>` makes the training process send itself SIGKILL as it starts that
iteration (1-based, counted over the whole run), `NEMO_TST_KILL_SIGNAL=TERM` sends SIGTERM
instead. Unset (always, outside tests), this is one environment lookup per step. A real
preemption can land anywhere; a kill at a chosen iteration makes "rerun the same command and
finish with the uninterrupted run's losses" testable without racing a fast CPU loop.
"""

import os
import signal

__all__ = ["maybe_kill"]


def maybe_kill(iteration: int) -> None:
    """Kill this process if the environment asks for it at `iteration` (1-based)."""
    at = os.environ.get("NEMO_TST_KILL_AT")
    if at is None or int(at) != iteration:
        return
    sig = signal.SIGTERM if os.environ.get("NEMO_TST_KILL_SIGNAL") == "TERM" else signal.SIGKILL
    os.kill(os.getpid(), sig)
