"""`nemo_tst.demo.report`: the verdict sentence and the closing table, against written-out text."""

from pathlib import Path

from nemo_tst.demo.report import SCALE_VERDICT, print_report, verdict


def test_verdict_sentences():
    assert verdict(3.20, 3.60, None, 1500) == (
        f"TST ends ABOVE the baseline, i.e. worse after 1500 steps; {SCALE_VERDICT}.")
    assert verdict(3.20, 3.20, 1500, 1500) == "TST ends level with the baseline."
    assert verdict(3.20, 3.10, 1200, 1500) == (
        "TST ends 0.1000 nats BELOW the baseline, i.e. better; it reached the baseline's final loss "
        "(3.2000) at step 1200 of 1500, 1.25x fewer steps.")
    # Below only at the last evaluation: no speed-up to claim.
    assert verdict(3.20, 3.15, 1500, 1500) == (
        "TST ends 0.0500 nats BELOW the baseline, i.e. better; it reached the baseline's final loss "
        "(3.2000) at step 1500 of 1500.")


def test_report_table():
    summary = {
        "iterations": 30, "side_by_side": True, "tst_minus_baseline": 0.25,
        "verdict": "TST ends ABOVE the baseline.",
        "runs": {"baseline": {"final_valid_loss": 6.5, "text_tokens": 15360, "wall_seconds": 41.6},
                 "tst": {"final_valid_loss": 6.75, "text_tokens": 29184, "wall_seconds": 64.0}},
    }
    lines = []
    print_report(summary, lines.append, seconds={"data": 4.4, "training": 65.2, "total": 125.0},
                 written=[Path("out/summary.json"), Path("out/loss_curves.png")])
    assert lines == [
        "",
        "run         final held-out loss    text tokens  wall time",
        "baseline                 6.5000         15,360        42s",
        "tst                      6.7500         29,184        64s",
        "TST - baseline: +0.2500 nats (final held-out next-token loss, 30 steps each, side by side). "
        "TST ends ABOVE the baseline.",
        "total 2m05s (data 4s, training 1m05s); wrote out/summary.json and out/loss_curves.png",
    ]
