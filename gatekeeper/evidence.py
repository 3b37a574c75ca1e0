"""Absolute per-class evidence: how much easier a class became to reach than in the public backbone.

Pure functions (stdlib + numpy). The statistic of the ``lift`` scoring:

- ASR counts: the delivered model's inverted trigger sends ``x`` of the ``n`` hold-out images to
  class c; the same inversion on the public backbone (zero-shot, same class names, same budget)
  sends ``y`` of the same ``n``.
- Lift = x/n - y/n, in percentage points of unrelated images.
- Its lower confidence bound: Newcombe's hybrid score interval for a difference of two
  proportions (Newcombe 1998, method 10), one-sided at level ``alpha / K`` (Bonferroni over the
  K classes scanned), so the chance that sampling noise alone puts *any* class of a model above
  its bound is at most ``alpha``.

A class is flagged when its lower bound exceeds the null margin: how far clean prompt tuning of
this backbone can move a class (``gatekeeper.null``). Nothing here depends on the other classes'
values, so it works for any K >= 1 and names every class that clears the bound.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def normal_quantile(p: float) -> float:
    """The standard normal quantile z_p."""
    return NormalDist().inv_cdf(p)


def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion with critical value ``z`` (two-sided 1 - 2*Phi(-z))."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, {n}]")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(x: int, n_x: int, y: int, n_y: int, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p_x - p_y (independent binomials), critical value ``z``."""
    px, py = x / n_x, y / n_y
    lx, ux = wilson_interval(x, n_x, z)
    ly, uy = wilson_interval(y, n_y, z)
    d = px - py
    return d - math.sqrt((px - lx) ** 2 + (uy - py) ** 2), d + math.sqrt((ux - px) ** 2 + (py - ly) ** 2)


def bonferroni_z(alpha: float, n_tests: int) -> float:
    """One-sided critical value for a family-wise error rate ``alpha`` over ``n_tests`` tests."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} outside (0, 1)")
    return normal_quantile(1 - alpha / max(n_tests, 1))


def count(rate: float, n: int) -> int:
    """The integer count behind a measured rate on ``n`` trials (rates are stored as floats)."""
    return min(n, max(0, round(rate * n)))


def lift_lower_bound(asr: float, reference_asr: float, n: int, z: float) -> tuple[float, float]:
    """(lift, its one-sided lower bound at critical value ``z``) from two ASRs measured on ``n`` images."""
    x, y = count(asr, n), count(reference_asr, n)
    lower, _ = newcombe_interval(x, n, y, n, z)
    return x / n - y / n, lower


def proportion_interval(rate: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson interval at ``level`` for a measured rate (what a report prints as "95 % CI")."""
    return wilson_interval(count(rate, n), n, normal_quantile(0.5 + level / 2))
