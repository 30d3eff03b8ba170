"""Seed statistics of a TST-vs-baseline comparison.

A seed sets both the initial weights and the data order, and TST and its baseline share each
seed, so the comparison is paired. With losses of n seeds,

    d_i      = loss_TST(seed i) - loss_baseline(seed i)
    mean     = sum(d_i) / n
    sd       = sqrt(sum((d_i - mean)^2) / (n - 1))
    interval = mean -/+ t(0.975, n - 1) * sd / sqrt(n)          (95%, Student's t)

The iso-loss speedup of seed i is n*_i / N: the steps n*_i that seed i's family of baseline
lengths (final loss against steps, linear between neighbouring lengths) needs to reach its TST
run's final loss, over TST's N steps; its interval is formed the same way.

A difference counts only when its whole interval lies on one side of zero; otherwise the
verdict is "no measurable difference".
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Interval", "iso_loss_steps", "mean_interval", "paired_difference", "speedup_interval",
           "student_t_quantile", "verdict"]

NO_DIFFERENCE = "no measurable difference"


def _student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom: 1/2 plus the density integrated
    from 0 to x (Simpson's rule, 2,000 intervals; the density is smooth, the error is far below
    the digits an interval prints)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    steps, h = 2000, x / 2000
    total = density(0.0) + density(x)
    total += sum((4 if k % 2 else 2) * density(k * h) for k in range(1, steps))
    return 0.5 + total * h / 3


def student_t_quantile(p: float, df: int) -> float:
    """The x with P(T <= x) = p, for 1/2 <= p < 1 (bisection on the CDF)."""
    if not (0.5 <= p < 1) or df < 1:
        raise ValueError(f"student_t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while _student_t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its sample standard deviation and confidence interval."""

    mean: float
    sd: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def describe(self, fmt: str = "+.4f", unit: str = "") -> str:
        return (f"{self.mean:{fmt}}{unit} (sd {self.sd:.4f}, {self.confidence:.0%} interval "
                f"[{self.low:{fmt}}, {self.high:{fmt}}]{unit}, {self.n} seeds)")


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of `values` (one per seed) with its Student's t interval; needs two or more."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n < 2:
        raise ValueError(f"an interval over seeds needs at least 2 seeds, got {n}: give --seeds 3")
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, sd, mean - half, mean + half, n, confidence)


def paired_difference(tst: Sequence[float], baseline: Sequence[float],
                      confidence: float = 0.95) -> Interval:
    """TST's final loss minus its own seed's baseline's, over seeds (`tst[i]` and `baseline[i]`
    trained with the same seed)."""
    if len(tst) != len(baseline):
        raise ValueError(f"paired seeds: {len(tst)} TST losses against {len(baseline)} baseline losses")
    return mean_interval([t - b for t, b in zip(tst, baseline)], confidence)


def verdict(difference: Interval) -> str:
    """What a TST-minus-baseline interval says: ahead or behind only when it excludes zero."""
    if difference.high < 0:
        return "TST ahead"
    if difference.low > 0:
        return "TST behind"
    return NO_DIFFERENCE


def iso_loss_steps(baselines: Sequence[tuple[int, float]], target: float) -> Optional[float]:
    """The steps a baseline needs to reach `target`, linear between the final losses of a
    family of baseline lengths [(steps, final loss), ...]; None when `target` lies outside the
    family's losses."""
    points = sorted(baselines)
    for (s0, f0), (s1, f1) in zip(points, points[1:]):
        if f0 != f1 and min(f0, f1) <= target <= max(f0, f1):
            return s0 + (f0 - target) / (f0 - f1) * (s1 - s0)
    return None


def speedup_interval(families: Sequence[Sequence[tuple[int, float]]], tst: Sequence[float],
                     steps: int, confidence: float = 0.95) -> tuple[Optional[Interval], int]:
    """The iso-loss speedup over seeds: seed i's baseline family `families[i]` against its TST
    final loss `tst[i]` after `steps` steps. Returns (interval or None, seeds outside their
    family's range); the interval covers the seeds inside it, when there are two or more."""
    speedups = []
    for family, loss in zip(families, tst):
        needed = iso_loss_steps(family, loss)
        if needed is not None:
            speedups.append(needed / steps)
    outside = len(tst) - len(speedups)
    return (mean_interval(speedups, confidence) if len(speedups) >= 2 else None), outside
