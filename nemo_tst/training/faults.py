"""Deterministic crash injection for the fault tests (and for anyone rehearsing a preemption).

Each fault is installed by wrapping, and only when its environment variable is set: without
them the trainer runs the unwrapped forward step and save function (`install`).

    NEMO_TST_KILL_AT=<iteration>        SIGKILL as that training iteration starts (1-based,
                                        counted over the whole run); NEMO_TST_KILL_SIGNAL=TERM
                                        sends SIGTERM instead, which the trainer may handle
    NEMO_TST_KILL_IN_SAVE_AT=<iteration> SIGKILL in the middle of that iteration's checkpoint
                                        save, after its files are written, before Megatron
                                        records it as the latest
    NEMO_TST_NAN_AT=<iteration>         that training iteration's loss is NaN, as a diverging
                                        run's would be

A real preemption can land anywhere; a kill at a chosen iteration makes "rerun the same
command and finish with the uninterrupted run's losses" testable without racing a fast loop.
"""

import functools
import os
import signal

__all__ = ["install"]


def install(forward_step):
    """The forward step with the faults the environment asks for (itself when none), after
    wrapping Megatron's checkpoint save if NEMO_TST_KILL_IN_SAVE_AT is set. Call before
    training, on each rank."""
    if "NEMO_TST_KILL_IN_SAVE_AT" in os.environ:
        _kill_in_save(int(os.environ["NEMO_TST_KILL_IN_SAVE_AT"]))
    kill_at = os.environ.get("NEMO_TST_KILL_AT")
    nan_at = os.environ.get("NEMO_TST_NAN_AT")
    if kill_at is None and nan_at is None:
        return forward_step
    kill_at = None if kill_at is None else int(kill_at)
    nan_at = None if nan_at is None else int(nan_at)
    term = os.environ.get("NEMO_TST_KILL_SIGNAL") == "TERM"

    @functools.wraps(forward_step)
    def forward_step_with_faults(data_iterator, model, *args, **kwargs):
        from megatron.training import get_args

        iteration = getattr(get_args(), "curr_iteration", None)
        iteration = None if iteration is None or not model.training else iteration + 1
        if iteration is not None and iteration == kill_at:
            if term:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                _die()
        output, loss_func = forward_step(data_iterator, model, *args, **kwargs)
        if iteration is not None and iteration == nan_at:
            output = output * float("nan")
        return output, loss_func

    return forward_step_with_faults


def _die() -> None:
    """SIGKILL this rank and its helper processes (e.g. checkpoint writers), as a preemption
    does: the whole process group when this process leads it (torchrun starts each rank in
    its own session), else only this process."""
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_save(iteration: int) -> None:
    """SIGKILL once `iteration`'s checkpoint files are written but before Megatron records the
    checkpoint as the latest, i.e. a save cut short.

    Wraps `megatron.core.dist_checkpointing.save` (Megatron's save_checkpoint looks it up at
    call time and writes its tracker after it returns)."""
    from megatron.core import dist_checkpointing

    from nemo_tst.core.run_dir import ITERATION_DIR

    original = dist_checkpointing.save
    marker = ITERATION_DIR.format(iteration)

    def save_then_die(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        result = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if str(checkpoint_dir).rstrip("/").endswith(marker):
            _die()
        return result

    save_then_die.__wrapped__ = original
    dist_checkpointing.save = save_then_die
