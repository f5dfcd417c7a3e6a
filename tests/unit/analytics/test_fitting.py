"""Diffusion fits (maas/analytics/fitting.py, curves.py) on series simulated from known
parameters: the fit recovers them, its 90% intervals cover them about 90% of the time, its
prediction intervals cover what comes next, and a series that cannot be fitted says why."""

from __future__ import annotations

import numpy as np
import pytest

from maas.analytics import curves, fitting
from maas.analytics.fitting import CannotFit

BASS = curves.Bass()
TRUTH = np.array([0.03, 0.38, 1000.0])  # p, q, m: new adoption peaks near period 6


def _simulated(truth, periods: int, rng) -> np.ndarray:
    """New adopters per period: the curve's increments with Poisson noise (counts)."""
    clean = BASS.increments(np.arange(1.0, periods + 1), np.asarray(truth))
    return rng.poisson(clean).astype(float)


def test_bass_fits_recover_p_q_m_and_their_intervals_cover_the_truth_about_90_percent():
    """Both kinds of interval: the fit's covariance (HC3) and the wild bootstrap."""
    rng = np.random.default_rng(7)
    covered = {"covariance": np.zeros(3), "bootstrap": np.zeros(3)}
    errors = []
    for draw in range(200):
        fit = fitting.fit(_simulated(TRUTH, 24, rng), BASS)
        boot = fitting.bootstrap(fit, draws=200, seed=draw)
        for kind, intervals in (
            ("covariance", fit.intervals(0.90)),
            ("bootstrap", boot.intervals(fit, 0.90)),
        ):
            bounds = np.array([intervals[name] for name in "pqm"])
            covered[kind] += (bounds[:, 0] <= TRUTH) & (bounds[:, 1] >= TRUTH)
        errors.append(np.abs(fit.theta / TRUTH - 1))
    for kind, hits in covered.items():
        coverage = hits / 200
        assert np.all((coverage >= 0.85) & (coverage <= 0.95)), (kind, coverage)
    assert np.all(np.median(errors, axis=0) < 0.10), np.median(errors, axis=0)


def test_a_larger_market_is_recovered_within_10_percent_every_time():
    rng = np.random.default_rng(3)
    for _ in range(20):
        fit = fitting.fit(_simulated([0.02, 0.45, 20_000], 24, rng), BASS)
        assert np.all(np.abs(fit.theta / [0.02, 0.45, 20_000] - 1) < 0.10), fit.params


def test_bootstrap_intervals_agree_with_the_covariance_and_contain_the_estimate():
    fit = fitting.fit(_simulated(TRUTH, 24, np.random.default_rng(5)), BASS)
    boot = fitting.bootstrap(fit, draws=200, seed=1)
    assert len(boot.thetas) >= 190
    from_covariance, from_bootstrap = fit.intervals(), boot.intervals(fit)
    for name, value in fit.params.items():
        low, high = from_bootstrap[name]
        assert low < value < high
        width = from_covariance[name][1] - from_covariance[name][0]
        assert 0.5 < (high - low) / width < 2.0, (name, from_covariance, from_bootstrap)


def test_prediction_intervals_cover_the_adopters_that_came_next():
    rng = np.random.default_rng(11)
    hits = 0
    for draw in range(40):
        series = _simulated(TRUTH, 18, rng)
        fit = fitting.fit(series[:14], BASS)
        outlook = fitting.forecast(fit, 4, fitting.bootstrap(fit, draws=200, seed=draw))
        low, high = outlook.cumulative_band
        assert np.all(low <= outlook.cumulative) and np.all(outlook.cumulative <= high)
        hits += low[-1] <= series.sum() <= high[-1]
    assert 0.75 <= hits / 40 <= 1.0


def test_landmarks_are_bass_closed_forms_and_match_the_curve():
    p, q, m = TRUTH
    marks = BASS.landmarks(TRUTH)
    assert marks["peak"] == pytest.approx(np.log(q / p) / (p + q))
    assert BASS.cumulative(np.array([marks["half"]]), TRUTH)[0] == pytest.approx(0.5 * m)
    assert BASS.cumulative(np.array([marks["ninety"]]), TRUTH)[0] == pytest.approx(0.9 * m)
    grid = curves.Curve.landmarks(BASS, TRUTH)  # the generic search every other curve uses
    assert grid["peak"] == pytest.approx(marks["peak"], abs=0.06)
    assert grid["half"] == pytest.approx(marks["half"], abs=0.06)


def test_a_fixed_potential_is_not_fitted():
    series = _simulated(TRUTH, 12, np.random.default_rng(2))
    fit = fitting.fit(series, BASS, fixed={"m": 1000.0})
    assert fit.params["m"] == 1000.0 and set(fit.intervals()) == {"p", "q"}
    with pytest.raises(CannotFit, match="below the"):
        fitting.fit(series, BASS, fixed={"m": series.sum() / 2})


def test_the_shock_of_a_generalized_bass_series_is_found():
    shocked = curves.ShockedBass(shock_at=8)
    truth = np.array([0.01, 0.25, 2000.0, 1.5, -0.15])
    clean = shocked.increments(np.arange(1.0, 31), truth)
    series = np.random.default_rng(4).poisson(clean).astype(float)
    fit = fitting.fit(series, shocked)
    assert fit.params["c"] == pytest.approx(1.5, rel=0.3)
    assert fit.params["m"] == pytest.approx(2000, rel=0.1)
    assert fit.aic < fitting.fit(series, BASS).aic - 10


@pytest.mark.parametrize(
    ("series", "says"),
    [
        ([5, 8, 9], "needs at least 5 periods"),
        ([0, 0, 0, 0, 0, 0], "nobody has adopted yet"),
        ([40, 0, 0, 0, 0, 0, 0], "only 1 period"),
        ([3, 9, 20, -4, 10, 8], "cumulative adopters fall in period 4"),
        ([1, 2, 4, 8, 16, 32, 64, 128, 256, 512], "shows no slowing yet"),
        ([5, 5, float("nan"), 5, 5, 5], "missing or infinite"),
    ],
)
def test_series_that_cannot_be_fitted_say_why(series, says):
    with pytest.raises(CannotFit, match=says):
        fitting.fit(np.array(series, dtype=float), BASS)


def test_no_series_makes_any_curve_fail_with_anything_but_a_reason():
    rng = np.random.default_rng(0)
    every = [curves.Bass(), curves.Logistic(), curves.Gompertz(), curves.ShockedBass(3)]
    for _ in range(15):
        series = rng.choice([0.0, 1.0, 3.0, 50.0], size=rng.integers(1, 14)) * rng.random()
        for curve in every:
            try:
                fit = fitting.fit(series, curve)
            except CannotFit as error:
                assert str(error)
            else:
                assert np.all(np.isfinite(fit.theta)) and fit.rss >= 0


@pytest.mark.parametrize(
    ("curve", "truth"),
    [
        (curves.Bass(), [0.03, 0.38, 1000.0]),
        (curves.Gompertz(), [0.15, 6.0, 2000.0]),
        (curves.Logistic(), [0.4, 8.0, 900.0]),
        (curves.ShockedBass(8), [0.01, 0.25, 2000.0, 1.5, -0.15]),
    ],
)
def test_the_batched_refits_find_what_scipy_finds(curve, truth):
    from maas.analytics import batched

    clean = curve.increments(np.arange(1.0, 31), np.array(truth))
    fit = fitting.fit(np.random.default_rng(0).poisson(clean).astype(float), curve)
    signs = np.random.default_rng(1).choice((-1.0, 1.0), size=(30, fit.n))
    series = fit.fitted + fit.residuals * signs
    low, high = (np.array(b) for b in curve.bounds(series.sum() / 30))
    thetas, converged = batched.refit(curve, series, fit.theta, fit.free, low, high)
    assert converged.all()
    expected = np.array([fitting._refit(fit, row) for row in series])
    np.testing.assert_allclose(thetas, expected, rtol=1e-4)


def test_a_forecast_never_passes_the_potential():
    series = _simulated(TRUTH, 14, np.random.default_rng(8))
    potential = series.sum() + 5  # nearly everyone has adopted, by the operator's count
    fit = fitting.fit(series, BASS, fixed={"m": potential})
    outlook = fitting.forecast(fit, 10, fitting.bootstrap(fit, draws=100))
    assert outlook.cumulative[-1] <= potential + 1e-9
    assert np.all(outlook.cumulative_band[1] <= potential + 1e-9)
    assert np.all(outlook.new >= 0) and outlook.cumulative[-1] > series.sum()
