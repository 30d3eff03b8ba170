"""What the demo's two runs say: the verdict sentence and the closing table.

The verdict compares the final held-out next-token losses of the baseline and the TST run,
which trained for the same steps at the same FLOPs per step.
"""

from typing import Callable, Optional

from nemo_tst.demo.progress import duration

__all__ = ["SCALE_VERDICT", "print_report", "verdict"]

SCALE_VERDICT = (
    "on this 0.8M-parameter model TST s=2 ended 0.04-0.05 nats below its baseline only from "
    "3,000 steps on (docs/benchmarks.md), and the paper's clear gains start at 270M parameters "
    "and 20k steps"
)
"""The one sentence the demo prints after a TST loss: the scale at which the measurements in
docs/benchmarks.md show a gain. One sentence, without a final full stop."""


def verdict(base_final: float, tst_final: float, reach: Optional[int], iterations: int) -> str:
    """What the two final held-out losses say, in one sentence. `reach`: the first evaluated
    step at which TST's held-out loss was at or below the baseline's final one (None: never)."""
    delta = tst_final - base_final
    if delta > 0:
        return f"TST ends ABOVE the baseline, i.e. worse after {iterations} steps; {SCALE_VERDICT}."
    if delta == 0:
        return "TST ends level with the baseline."
    where = (f"it reached the baseline's final loss ({base_final:.4f}) at step {reach} of "
             f"{iterations}" + (f", {iterations / reach:.2f}x fewer steps" if reach and reach < iterations else ""))
    return f"TST ends {-delta:.4f} nats BELOW the baseline, i.e. better; {where}."


def print_report(summary: dict, say: Callable[[str], None], *, seconds: dict, written: list) -> None:
    """The table of both runs, the difference with the verdict, the time taken (`seconds`:
    data, training, total) and the files `written`."""
    say("")
    say(f"{'run':10} {'final held-out loss':>20} {'text tokens':>14} {'wall time':>10}")
    for name, r in summary["runs"].items():
        say(f"{name:10} {r['final_valid_loss']:>20.4f} {r['text_tokens']:>14,} {r['wall_seconds']:>9.0f}s")
    say(f"TST - baseline: {summary['tst_minus_baseline']:+.4f} nats (final held-out next-token loss, "
        f"{summary['iterations']} steps each{', side by side' if summary['side_by_side'] else ''}). "
        f"{summary['verdict']}")
    say(f"total {duration(seconds['total'])} (data {duration(seconds['data'])}, training "
        f"{duration(seconds['training'])}); wrote {' and '.join(map(str, written))}")
