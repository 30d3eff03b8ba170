"""What a finished (or stopped) run's log and arguments say: its loss curves and text tokens.

The held-out loss is Megatron's validation loss, next-token cross-entropy on the same held-out
samples at every evaluation, so runs of any s compare on it. A TST run's training loss is the
multi-hot loss in phase 1 and the next-token loss in phase 2; the two are kept apart.
"""

from pathlib import Path
from typing import Optional

__all__ = ["read_run", "steps_to_reach", "training_curve"]


def training_curve(log, phase1_iters: int) -> dict:
    """{"phase1": {it: multi-hot loss}, "phase2": {it: next-token loss}} from a parsed log."""
    curve = {"phase1": {}, "phase2": {}}
    for it in sorted(log.train):
        row = log.train[it]
        if it <= phase1_iters and "tst loss" in row:
            curve["phase1"][it] = row["tst loss"]
        else:
            curve["phase2"][it] = log.loss(it)
    return curve


def read_run(log_file: Path, argv: list[str]) -> dict:
    """One run from its trainer log and its `nemo-tst pretrain` arguments:

        bag_size, phase1_iters   s, and n1 (0 at s = 1: no superposition phase)
        valid                    {iteration: held-out loss} ({} without a log)
        train_loss               `training_curve`
        text_tokens              text tokens the whole run trains on
        text_tokens_at           {evaluated iteration: text tokens trained on by then}
    """
    from nemo_tst.training.arguments import plan_from_args
    from nemo_tst.training.arguments import parse_megatron_args
    from nemo_tst.training.logs import TrainingLog, parse_training_log

    plan = plan_from_args(parse_megatron_args(argv))  # the plan the run trained
    s = plan.settings.bag_size
    n1 = plan.phase1_iters if s > 1 else 0
    log = parse_training_log(log_file.read_text(errors="replace")) if log_file.is_file() else TrainingLog()
    return {
        "bag_size": s,
        "phase1_iters": n1,
        "valid": dict(log.valid),
        "train_loss": training_curve(log, n1),
        "text_tokens": plan.text_tokens_after(plan.train_iters),
        "text_tokens_at": {it: plan.text_tokens_after(it) for it in log.valid},
    }


def steps_to_reach(valid: dict[int, float], target: Optional[float]) -> Optional[int]:
    """First evaluated iteration whose held-out loss is at or below `target` (None if never)."""
    if target is None:
        return None
    return next((it for it in sorted(valid) if valid[it] <= target), None)
