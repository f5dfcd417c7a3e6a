"""Choosing and forecasting (maas/analytics/forecast.py): rolling-origin backtests pick the
curve that generated a series, short series borrow p and q from the pooled fit, and the
outlook carries its intervals, landmarks and the reasons behind each choice."""

from __future__ import annotations

import numpy as np
import pytest

from maas.analytics import curves, forecast
from maas.analytics.fitting import CannotFit


def _simulated(curve, truth, periods, seed) -> np.ndarray:
    clean = curve.increments(np.arange(1.0, periods + 1), np.asarray(truth, dtype=float))
    return np.random.default_rng(seed).poisson(clean).astype(float)


def test_the_backtest_measures_errors_of_forecasts_from_each_origin():
    series = _simulated(curves.Bass(), [0.03, 0.38, 1000], 20, seed=1)
    result = forecast.backtest(series, curves.Bass(), {}, start=None)
    assert result.origins == forecast.ORIGINS
    assert 0 < result.mape < 5 and result.rmse > 0
    exact = curves.Bass().increments(np.arange(1.0, 21), np.array([0.03, 0.38, 1000]))
    assert forecast.backtest(exact, curves.Bass(), {}, start=None).rmse < 1e-3
    assert forecast.backtest(series[:5], curves.Bass(), {}, start=None) is None


@pytest.mark.parametrize(
    ("curve", "truth"),
    [(curves.Bass(), [0.03, 0.38, 2000]), (curves.Gompertz(), [0.15, 6.0, 2000])],
)
def test_the_curve_that_made_a_series_is_chosen_by_its_backtest(curve, truth):
    chosen = [
        forecast.outlook(_simulated(curve, truth, 24, seed), 6, draws=20).chosen.name
        for seed in range(5)
    ]
    assert chosen.count(curve.name) >= 4, chosen


def test_an_outlook_has_every_candidate_its_reasons_and_intervals():
    series = _simulated(curves.Bass(), [0.03, 0.38, 1000], 16, seed=2)
    outlook = forecast.outlook(series, 12, draws=50)
    assert [c.name for c in outlook.candidates] == ["bass", "logistic", "gompertz"]
    assert all(c.fit is not None and c.backtest is not None for c in outlook.candidates)
    assert "generalized-bass: not fitted" in outlook.notes[0]
    assert f"{outlook.chosen.name} chosen: lowest backtest RMSE" in outlook.notes
    low, high = outlook.forecast.cumulative_band
    assert len(outlook.forecast.periods) == 12 and np.all(low <= high)
    assert outlook.forecast.periods[0] == 17
    assert outlook.landmarks["peak"] is not None
    shocked = forecast.outlook(series, 4, shock_at=8, draws=20)
    assert "generalized-bass" in [c.name for c in shocked.candidates]
    origins = {c.backtest.origins for c in shocked.candidates if c.backtest}
    assert len(origins) == 1  # every curve judged on the same origins
    assert np.all(shocked.forecast.new >= 0)


def test_a_short_series_borrows_p_and_q_from_the_pooled_fit():
    bass = curves.Bass()
    series = {
        name: _simulated(bass, [0.02, 0.4, m], 24, seed=i)
        for i, (name, m) in enumerate([("retail", 800), ("banking", 3000), ("health", 1500)])
    }
    p, q = forecast.pooled_bass(series)
    assert p == pytest.approx(0.02, rel=0.15) and q == pytest.approx(0.4, rel=0.1)
    young = _simulated(bass, [0.02, 0.4, 5000], 6, seed=9)
    alone = forecast.outlook(young, 6, draws=20).candidates[0].fit
    outlook = forecast.outlook(young, 6, pooled=(p, q), draws=20)
    bass_fit = outlook.candidates[0].fit
    assert (bass_fit.params["p"], bass_fit.params["q"]) == (p, q)
    assert bass_fit.params["m"] == pytest.approx(5000, rel=0.2)
    assert set(bass_fit.intervals()) == {"m"}
    width = np.diff(bass_fit.intervals()["m"])[0]
    assert width < np.diff(alone.intervals()["m"])[0] / 3  # borrowed strength
    assert any("pooled fit" in note for note in outlook.notes)


def test_a_pooled_fit_needs_two_series_with_adopters():
    with pytest.raises(CannotFit, match="at least two series"):
        forecast.pooled_bass({"retail": np.ones(8), "empty": np.zeros(8)})


def test_when_no_curve_fits_the_outlook_says_why_for_each():
    with pytest.raises(CannotFit, match="bass: .*logistic: .*gompertz: "):
        forecast.outlook(np.array([0.0, 0.0, 4.0, 0.0, 0.0, 0.0]), 6)


def test_industries_too_young_for_their_own_fit_are_forecast_with_the_pooled_p_and_q(tmp_path):
    """Through the report, as the API and ``maas forecast all`` run it: every industry with
    fewer than POOL_BELOW periods since its first adopter says it borrowed p and q, all
    from the same pooled fit; industries with their own Bass fit do not."""
    from maas.analytics import demo_usage, report
    from maas.db import make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    upgrade(engine)
    demo_usage.fill(engine, industries=6, scale=0.2, seed=3)
    series = {
        g.group: [p.new_adopters for p in g.periods]
        for g in report.adoption_report(engine, None, period="month").data
    }
    results = report.forecast_industries(engine, None, period="month", horizon=6, draws=50)
    borrowed = {
        name: [n for n in result.notes if "from the pooled fit" in n]
        for name, result in results.items()
        if not isinstance(result, str)
    }
    young = {n for n, s in series.items() if np.count_nonzero(np.cumsum(s)) < forecast.POOL_BELOW}
    assert young, "the demo should have an industry too young for its own fit"
    for name in young:
        assert borrowed[name], name
        bass = next(c for c in results[name].candidates if c.model == "bass")
        assert "p" not in bass.intervals and "q" not in bass.intervals  # fixed, not fitted
    assert len({note for notes in borrowed.values() for note in notes}) == 1  # one pooled fit
    assert any(not notes for notes in borrowed.values())
    engine.dispose()
