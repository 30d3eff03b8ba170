"""Seed statistics (nemo_tst.demo.stats) on synthetic numbers, against textbook values and a
plain computation in the test."""

import math
import statistics

import pytest

from nemo_tst.demo.stats import (
    iso_loss_steps,
    mean_interval,
    paired_difference,
    speedup_interval,
    student_t_quantile,
    verdict,
)

# Student's t quantiles t(0.975, df) from the standard tables.
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 29: 2.0452}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantiles_match_the_tables(df):
    assert student_t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-3)


def test_paired_difference_is_the_mean_of_per_seed_differences_with_its_t_interval():
    tst, base = [3.10, 3.05, 3.12], [3.15, 3.12, 3.13]
    d = [t - b for t, b in zip(tst, base)]  # -0.05, -0.07, -0.01
    got = paired_difference(tst, base)
    half = T_975[2] * statistics.stdev(d) / math.sqrt(3)
    assert got.mean == pytest.approx(statistics.mean(d))
    assert got.sd == pytest.approx(statistics.stdev(d))
    assert (got.low, got.high) == (pytest.approx(got.mean - half, abs=1e-6), pytest.approx(got.mean + half, abs=1e-6))
    assert got.n == 3
    # -0.0433 +- 4.30 * 0.0306 / 1.73: the interval [-0.119, 0.033] contains 0.
    assert verdict(got) == "no measurable difference"


def test_a_consistent_gain_is_tst_ahead_and_a_consistent_loss_tst_behind():
    assert verdict(paired_difference([3.00, 3.01, 3.02], [3.05, 3.06, 3.07])) == "TST ahead"
    assert verdict(paired_difference([3.10, 3.11, 3.12], [3.05, 3.06, 3.07])) == "TST behind"


def test_an_interval_needs_two_seeds_and_paired_lists():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        mean_interval([0.1])
    with pytest.raises(ValueError, match="paired seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_iso_loss_steps_interpolate_within_the_family_only():
    family = [(1000, 3.20), (1250, 3.10), (1500, 3.04)]
    assert iso_loss_steps(family, 3.15) == pytest.approx(1125)
    assert iso_loss_steps(family, 3.07) == pytest.approx(1375)
    assert iso_loss_steps(family, 3.30) is None  # worse than the shortest baseline
    assert iso_loss_steps(family, 3.00) is None  # better than the longest


def test_speedup_interval_over_seeds_counts_the_seeds_outside_their_family():
    families = [[(1000, 3.20), (1500, 3.00)], [(1000, 3.22), (1500, 3.02)], [(1000, 3.18), (1500, 2.98)]]
    tst = [3.10, 3.07, 3.30]  # seed 3's TST is above its shortest baseline: no speedup
    got, outside = speedup_interval(families, tst, 1000)
    per_seed = [1250 / 1000, 1375 / 1000]
    assert outside == 1
    assert got.n == 2 and got.mean == pytest.approx(statistics.mean(per_seed))
    assert got.low == pytest.approx(got.mean - T_975[1] * statistics.stdev(per_seed) / math.sqrt(2), abs=1e-5)
