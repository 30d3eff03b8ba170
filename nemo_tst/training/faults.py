"""Deterministic crash injection for the fault tests (and for anyone rehearsing a preemption).

`NEMO_TST_KILL_AT=<iteration>` makes the training process send itself SIGKILL as it starts that
iteration (1-based, counted over the whole run), `NEMO_TST_KILL_SIGNAL=TERM` sends SIGTERM
instead. Unset (always, outside tests), this is one environment lookup per step. A real
preemption can land anywhere; a kill at a chosen iteration makes "rerun the same command and
finish with the uninterrupted run's losses" testable without racing a fast CPU loop.

`NEMO_TST_KILL_IN_SAVE_AT=<iteration>` kills the process in the middle of that iteration's
checkpoint save (see `install_save_fault`); `NEMO_TST_NAN_AT=<iteration>` makes that
iteration's loss NaN, as a diverging run would.
"""

import os
import signal

__all__ = ["install_save_fault", "maybe_kill", "maybe_poison"]


def maybe_kill(iteration: int) -> None:
    """Kill this process if the environment asks for it at `iteration` (1-based)."""
    at = os.environ.get("NEMO_TST_KILL_AT")
    if at is None or int(at) != iteration:
        return
    if os.environ.get("NEMO_TST_KILL_SIGNAL") == "TERM":
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer may handle this one
        return
    _die()


def _die() -> None:
    """SIGKILL this rank and its helper processes (e.g. checkpoint writers), as a preemption
    does: the whole process group when this process leads it (torchrun starts each rank in
    its own session), else only this process."""
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def install_save_fault() -> None:
    """`NEMO_TST_KILL_IN_SAVE_AT=<iteration>`: SIGKILL once that iteration's checkpoint files
    are written but before Megatron records the checkpoint as the latest, i.e. a save cut short.

    Wraps `megatron.core.dist_checkpointing.save` (Megatron's save_checkpoint looks it up at
    call time and writes `latest_checkpointed_iteration.txt` after it returns). Call before
    training; without the variable nothing is wrapped.
    """
    at = os.environ.get("NEMO_TST_KILL_IN_SAVE_AT")
    if at is None:
        return
    from megatron.core import dist_checkpointing

    original = dist_checkpointing.save
    marker = f"iter_{int(at):07d}"

    def save_then_die(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        result = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if str(checkpoint_dir).rstrip("/").endswith(marker):
            _die()
        return result

    save_then_die.__wrapped__ = original
    dist_checkpointing.save = save_then_die


def maybe_poison(output, iteration: int):
    """`output` times NaN if the environment asks for a non-finite loss at `iteration`."""
    at = os.environ.get("NEMO_TST_NAN_AT")
    if at is None or int(at) != iteration:
        return output
    return output * float("nan")
