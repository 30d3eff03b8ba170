"""`nemo-tst demo` at its reduced CI size: real data, trainer and checkpoints, both runs."""

import json
import math

from nemo_tst.cli import main


def test_demo_ci_size_runs_baseline_and_tst(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "ci", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final held-out loss" in printed and "TST - baseline" in printed

    summary = json.loads((out / "summary.json").read_text())
    base, tst = summary["runs"]["baseline"], summary["runs"]["tst"]
    assert math.isfinite(base["final_valid_loss"]) and math.isfinite(tst["final_valid_loss"])
    assert base["bag_size"] == 1 and tst["bag_size"] == 4
    assert tst["phase1_iters"] == round(0.3 * summary["iterations"])
    # Equal steps, L and batch; phase 1 reads s times the text per step.
    n1, N = tst["phase1_iters"], summary["iterations"]
    per_step = summary["seq_length"] * summary["global_batch_size"]
    assert base["text_tokens"] == N * per_step
    assert tst["text_tokens"] == n1 * 4 * per_step + (N - n1) * per_step
    assert (out / "loss_curves.png").stat().st_size > 10_000

    # The same command again resumes: both runs are complete, nothing is retrained.
    assert main(["demo", "--size", "ci", "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"]["tst"]["final_valid_loss"] == tst["final_valid_loss"]
