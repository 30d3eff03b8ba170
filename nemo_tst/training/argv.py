"""What the driver changes in a run's arguments before it launches a phase: the one place
arguments are removed or replaced. The arguments themselves come from the user or from a
recipe (`TSTRecipe.megatron_args()`); these functions only set what nemo-tst manages.

Options follow argparse's rules: `--opt V` or `--opt=V`, and the last one given wins.
"""

from pathlib import Path
from typing import Optional

from nemo_tst.core import run_dir

__all__ = ["MANAGED_BY_PHASE", "last_value", "phase_argv", "with_data_tokenizer", "without_options"]

MANAGED_BY_PHASE = ("--save", "--load", "--tst-phase", "--exit-interval", "--tst-phase1-checkpoint")
"""The options `phase_argv` sets for each phase, whatever the run's arguments say."""


def without_options(argv: list[str], *options: str) -> list[str]:
    """argv minus the given options and their single values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in options:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def last_value(argv: list[str], option: str) -> Optional[str]:
    """The value of the last `option` in argv (`--opt V` or `--opt=V`, argparse's rule), or None."""
    found = None
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(option + "="):
            found = a.split("=", 1)[1]
    return found


def phase_argv(argv: list[str], phase: int, save: Path, phase1_iters: int) -> list[str]:
    """The per-rank arguments of one phase (`python -m nemo_tst.training.pretrain ...`): the
    run's arguments with --save/--load/--tst-phase/--exit-interval set for the phase.

    Phase 1 saves to and resumes from SAVE/phase1 and exits at n1. Phase 2 saves to
    SAVE/phase2 and resumes from it; the first time (nothing there yet) each rank starts
    from SAVE/phase1 instead (`--tst-phase1-checkpoint`, see `driver.resolve_phase_start`; at
    s = 1, from iteration 0 when SAVE/phase1 is empty). The arguments do not depend on what is
    on disk, so a scheduler can submit both phases at once.
    """
    p1_dir, p2_dir = run_dir.phase_dir(save, 1), run_dir.phase_dir(save, 2)
    base = without_options(argv, *MANAGED_BY_PHASE)
    if phase == 1:
        return base + ["--tst-phase", "1", "--save", str(p1_dir), "--load", str(p1_dir),
                       "--exit-interval", str(phase1_iters)]
    return base + ["--tst-phase", "2", "--save", str(p2_dir), "--load", str(p2_dir),
                   "--tst-phase1-checkpoint", str(p1_dir)]


def with_data_tokenizer(argv: list[str], vocab_size: int, *, has_vocab_size: bool) -> list[str]:
    """argv for a run without --tokenizer-type whose vocabulary comes from --tst-tokenizer:
    Megatron's NullTokenizer (the data is already tokenized; Megatron only needs the size),
    and --vocab-size `vocab_size` unless the run gives its own."""
    argv = [*argv, "--tokenizer-type", "NullTokenizer"]
    return argv if has_vocab_size else [*argv, "--vocab-size", str(vocab_size)]
