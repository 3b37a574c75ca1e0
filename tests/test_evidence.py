"""The lift statistic and its bound on known inputs, against statsmodels/scipy where they compute the same thing."""

import numpy as np
import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from gatekeeper.evidence import (
    bonferroni_z,
    count,
    lift_lower_bound,
    newcombe_interval,
    proportion_interval,
    wilson_interval,
)

CASES = [(410, 80), (5, 3), (500, 450), (0, 0), (250, 250), (188, 175), (500, 0), (0, 500), (1, 499)]


@pytest.mark.parametrize("x,y", CASES)
def test_newcombe_matches_statsmodels(x, y):
    for alpha in (0.05, 0.01, 0.002):
        z = norm.ppf(1 - alpha / 2)
        ours = newcombe_interval(x, 500, y, 500, z)
        ref = confint_proportions_2indep(x, 500, y, 500, method="newcomb", compare="diff", alpha=alpha)
        assert ours == pytest.approx(tuple(map(float, ref)), abs=1e-12)


@pytest.mark.parametrize("x", [0, 1, 7, 250, 499, 500])
def test_wilson_matches_statsmodels(x):
    z = norm.ppf(0.975)
    assert wilson_interval(x, 500, z) == pytest.approx(proportion_confint(x, 500, alpha=0.05, method="wilson"), abs=1e-12)
    assert proportion_interval(x / 500, 500) == pytest.approx(proportion_confint(x, 500, alpha=0.05, method="wilson"), abs=1e-12)


def test_bonferroni_critical_value_matches_scipy():
    assert bonferroni_z(0.01, 12) == pytest.approx(norm.ppf(1 - 0.01 / 12))
    assert bonferroni_z(0.05, 1) == pytest.approx(1.6448536, abs=1e-6)
    with pytest.raises(ValueError):
        bonferroni_z(0.0, 3)


def test_lift_bound_on_known_inputs():
    # the demo's 4-class cut: 82 % vs 16.4 % on 500 images, 4 tests at alpha 0.01
    z = bonferroni_z(0.01, 4)
    lift, lower = lift_lower_bound(0.82, 0.164, 500, z)
    assert lift == pytest.approx(0.656)
    ref = confint_proportions_2indep(410, 500, 82, 500, method="newcomb", compare="diff", alpha=2 * 0.01 / 4)
    assert lower == pytest.approx(float(ref[0]))
    assert 0.55 < lower < 0.60
    # noise: 37.5 % vs 35.0 % (5 of 200 images) is nowhere near a 10-point margin
    lift, lower = lift_lower_bound(0.375, 0.35, 200, bonferroni_z(0.01, 12))
    assert lift == pytest.approx(0.025) and lower < 0.0


def test_count_recovers_integers_from_stored_rates():
    for k in range(0, 501, 7):
        assert count(k / 500, 500) == k
    assert count(np.float32(0.8080000281333923).item(), 500) == 404


def test_lower_bound_holds_its_level_under_the_null():
    """Monte Carlo: with equal true rates the one-sided bound exceeds 0 at most ~alpha of the time."""
    rng = np.random.default_rng(0)
    alpha, n, trials = 0.05, 500, 4000
    z = bonferroni_z(alpha, 1)
    for p in (0.05, 0.3, 0.9):
        xs, ys = rng.binomial(n, p, trials), rng.binomial(n, p, trials)
        exceed = np.mean([lift_lower_bound(x / n, y / n, n, z)[1] > 0 for x, y in zip(xs, ys, strict=True)])
        assert exceed <= alpha + 0.01, (p, exceed)
