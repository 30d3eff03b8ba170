"""benchmarks/quality.py's comparison over seeds, on synthetic final losses: each TST run is
paired with its own seed's baseline and judged by the 95% interval of the differences."""

import math
import statistics

import pytest

from tests.benchmark_scripts import load_benchmark

T_975_DF2 = 4.3027  # Student's t(0.975, 2), from the tables


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def run(bag_size, steps, final_loss):
    return {"bag_size": bag_size, "steps": steps, "final_loss": final_loss}


def by_seed(finals):
    """{seed: runs} from {seed: (baseline, baseline_x1.5, tst_s4 final losses)} at N = 1000."""
    return {seed: {"baseline": run(1, 1000, b), "baseline_x1.5": run(1, 1500, b15), "tst_s4": run(4, 1000, t)}
            for seed, (b, b15, t) in finals.items()}


def test_a_gain_every_seed_shows_is_tst_ahead_with_its_speedup(quality):
    finals = {1234: (3.20, 3.00, 3.10), 1235: (3.24, 3.04, 3.16), 1236: (3.18, 2.98, 3.06)}
    row = quality.seed_summary(by_seed(finals), 1000)["tst_s4"]
    diffs = [t - b for b, _, t in finals.values()]  # -0.10, -0.08, -0.12
    half = T_975_DF2 * statistics.stdev(diffs) / math.sqrt(3)
    assert row["seeds"] == 3 and row["verdict"] == "TST ahead"
    assert row["minus_baseline"]["mean"] == pytest.approx(-0.10)
    assert row["minus_baseline"]["high"] == pytest.approx(-0.10 + half, abs=1e-5)
    # seed by seed, steps the baseline needs for TST's loss: 1000 + (b - t) / (b - b15) * 500
    speedups = [(1000 + (b - t) / (b - b15) * 500) / 1000 for b, b15, t in finals.values()]
    assert row["iso_loss_speedup"]["mean"] == pytest.approx(statistics.mean(speedups))
    assert row["seeds_outside_baseline_range"] == 0


def test_a_difference_within_the_seed_spread_is_no_measurable_difference(quality):
    finals = {1234: (3.20, 3.00, 3.15), 1235: (3.20, 3.00, 3.26), 1236: (3.20, 3.00, 3.17)}
    row = quality.seed_summary(by_seed(finals), 1000)["tst_s4"]
    assert row["minus_baseline"]["low"] < 0 < row["minus_baseline"]["high"]
    assert row["verdict"] == "no measurable difference"
    assert row["seeds_outside_baseline_range"] == 1  # seed 1235's TST is above its baseline


def test_a_seed_with_an_unfinished_run_is_left_out_and_one_seed_gives_no_interval(quality):
    finals = {1234: (3.20, 3.00, 3.10), 1235: (3.24, 3.04, None)}
    row = quality.seed_summary(by_seed(finals), 1000)["tst_s4"]
    assert row["seeds"] == 1 and row["minus_baseline"] is None and row["verdict"] is None
