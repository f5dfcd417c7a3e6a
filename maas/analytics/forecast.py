"""Forecasting an adoption series: every curve fitted, one chosen, intervals and landmarks.

- **Candidates**: Bass, logistic and Gompertz always; the generalized Bass model when the
  analyst names the shock's period. A curve that cannot be fitted says why and stays out.
- **Choice**: rolling-origin backtest. From each of the last ``ORIGINS`` periods (each
  leaving at least ``parameters + 2`` periods to fit), the curve is fitted on the periods up
  to it and forecasts the cumulative adopters of the rest (capped at its m); MAPE and RMSE
  over every (origin, period) pair, on the origins where every curve could be fitted (a
  curve that fits only the last origins would otherwise be judged on the easy, short
  forecasts). The curve with the lowest backtest RMSE is chosen; AIC is shown beside it,
  and decides when no backtest could run. Each refit starts from the whole series' fit.
- **Borrowing strength** (``pooled``): a series shorter than ``POOL_BELOW`` periods, or one
  whose own Bass fit fails, takes p and q from a Bass fit of all the series together (one
  p and q, an m per series) and fits only its own m; the output says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from maas.analytics import curves, fitting
from maas.analytics.fitting import CannotFit, Fit

ORIGINS = 6
POOL_BELOW = 8
"""Series with fewer periods borrow p and q from the pooled fit."""


@dataclass(frozen=True)
class Backtest:
    origins: int
    mape: float
    """Mean absolute percentage error of the cumulative adopters, in percent."""
    rmse: float
    errors: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    """Each origin's forecast errors (forecast - actual), to compare curves on the same ones."""
    actual: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def on(self, origins: set[int]) -> Backtest:
        """The same figures over these origins only."""
        errors = np.concatenate([self.errors[o] for o in sorted(origins)])
        actual = np.concatenate([self.actual[o] for o in sorted(origins)])
        seen = actual > 0
        mape = float(100 * np.mean(np.abs(errors[seen]) / actual[seen])) if seen.any() else 0.0
        kept = {o: self.errors[o] for o in origins}
        return Backtest(len(origins), mape, float(np.sqrt(np.mean(errors**2))), kept,
                        {o: self.actual[o] for o in origins})  # fmt: skip


@dataclass
class Candidate:
    name: str
    fit: Fit | None = None
    why_not: str | None = None
    backtest: Backtest | None = None


@dataclass
class Outlook:
    """One series' forecast."""

    candidates: list[Candidate]
    chosen: Candidate
    bootstrap: fitting.Bootstrap
    forecast: fitting.Forecast
    landmarks: dict[str, float | None]
    notes: list[str] = field(default_factory=list)


def backtest(
    observed: np.ndarray, curve: curves.Curve, fixed, start, ceiling=None
) -> Backtest | None:
    """Refit from each origin and compare the forecast's cumulative adopters (capped at the
    refit's m, as a forecast is) with the series'; None when no origin could be fitted."""
    cumulative = np.cumsum(observed)
    shortest = len(curve.names) - len(fixed) + 2
    errors, actual = {}, {}
    m = curve.names.index("m")
    for origin in range(max(shortest, len(observed) - ORIGINS), len(observed)):
        try:
            fitted = fitting.fit(
                observed[:origin], curve, fixed=fixed, start=start, ceiling=ceiling
            )
        except CannotFit:
            continue
        t = np.arange(origin + 1, len(observed) + 1, dtype=float)
        new = np.maximum(curve.increments(t, fitted.theta), 0.0)[None]
        reached = cumulative[origin - 1]
        predicted = reached + np.cumsum(fitting._within(new, reached, fitted.theta[m : m + 1])[0])
        errors[origin] = predicted - cumulative[origin:]
        actual[origin] = cumulative[origin:]
    if not errors:
        return None
    return Backtest(0, 0.0, 0.0, errors, actual).on(set(errors))


def outlook(
    observed,
    horizon: int,
    *,
    potential: float | None = None,
    shock_at: float | None = None,
    pooled: tuple[float, float] | None = None,
    ceiling: float | None = None,
    draws: int = 200,
    seed: int = 0,
) -> Outlook:
    """Fit every candidate curve, choose one, and forecast ``horizon`` periods with
    intervals. ``pooled`` (p, q) fixes Bass's p and q to the pooled fit's; ``ceiling`` bounds
    m (1 for a share)."""
    observed = np.asarray(observed, dtype=float)
    names = ["bass", "logistic", "gompertz"]
    notes = []
    if shock_at is not None:
        names.insert(1, "generalized-bass")
    else:
        notes.append("generalized-bass: not fitted (give the shock's period to fit it)")
    fixed = {} if potential is None else {"m": float(potential)}
    pooled_fixed = {} if pooled is None else {"p": pooled[0], "q": pooled[1]}
    candidates = [
        _candidate(
            observed, name, fixed | (pooled_fixed if name == "bass" else {}), shock_at, ceiling
        )
        for name in names
    ]
    if pooled is not None:
        own_m = "m set by the operator" if potential is not None else "m fitted to this series"
        notes.append(
            f"bass: p = {pooled[0]:.4g} and q = {pooled[1]:.4g} from the pooled fit of every "
            f"series; {own_m}"
        )
    fitted = [c for c in candidates if c.fit is not None]
    if not fitted:
        reasons = "; ".join(f"{c.name}: {c.why_not}" for c in candidates)
        raise CannotFit(reasons)
    tested = [c for c in fitted if c.backtest is not None]
    shared = set.intersection(*(set(c.backtest.errors) for c in tested)) if tested else set()
    if shared:  # every curve judged on the same origins
        for candidate in tested:
            candidate.backtest = candidate.backtest.on(shared)
        chosen = min(tested, key=lambda c: c.backtest.rmse)
        notes.append(f"{chosen.name} chosen: lowest backtest RMSE")
    else:
        chosen = min(fitted, key=lambda c: c.fit.aic)
        notes.append(f"{chosen.name} chosen: lowest AIC (too few periods to backtest)")
    boot = fitting.bootstrap(chosen.fit, draws=draws, seed=seed)
    if len(boot.thetas) < boot.asked:
        notes.append(f"bootstrap: {len(boot.thetas)} of {boot.asked} refits converged and are used")
    return Outlook(
        candidates=candidates,
        chosen=chosen,
        bootstrap=boot,
        forecast=fitting.forecast(chosen.fit, horizon, boot, seed=seed + 1),
        landmarks=chosen.fit.curve.landmarks(chosen.fit.theta),
        notes=notes,
    )


def _candidate(observed, name, fixed, shock_at, ceiling=None) -> Candidate:
    curve = curves.named(name, shock_at)
    try:
        fit = fitting.fit(observed, curve, fixed=fixed, ceiling=ceiling)
    except CannotFit as error:
        return Candidate(name, why_not=str(error))
    return Candidate(name, fit, backtest=backtest(observed, curve, fixed, fit.theta, ceiling))


def pooled_bass(series: dict[str, np.ndarray]) -> tuple[float, float]:
    """One p and q for every series, each with its own m: least squares over all their
    periods together (the series must have adopters)."""
    usable = {name: np.asarray(s, float) for name, s in series.items() if np.sum(s) > 0}
    if len(usable) < 2:
        raise CannotFit("a pooled fit needs at least two series with adopters")
    names = list(usable)
    totals = np.array([usable[n].sum() for n in names])

    def residuals(x):
        p, q, ms = x[0], x[1], x[2:]
        return np.concatenate(
            [
                ms[i] * np.diff(curves.bass_fraction(np.arange(len(usable[n]) + 1.0), p, q))
                - usable[n]
                for i, n in enumerate(names)
            ]
        )

    low = np.concatenate([[1e-5, 1e-4], curves.M_FLOOR * totals])
    high = np.concatenate([[1.0, 3.0], np.maximum(totals, 1.0) * 1000.0])
    best = None
    for p, q in ((0.005, 0.1), (0.03, 0.5), (0.01, 0.3)):
        start = np.concatenate([[p, q], 2.0 * totals])
        solution = optimize.least_squares(residuals, start, bounds=(low, high), x_scale="jac")
        if best is None or solution.cost < best.cost:
            best = solution
    return float(best.x[0]), float(best.x[1])
