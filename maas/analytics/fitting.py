"""Fitting a diffusion curve to an adoption series, with its uncertainty.

The fit is non-linear least squares on the new adopters of each period (Srinivasan and Mason
1986): the residuals are the series' increments minus the curve's, which are closer to
independent than cumulative counts are. ``scipy.optimize.least_squares`` (trust-region
reflective, within bounds) starts from several points and keeps the best.

Uncertainty, at ``CONFIDENCE``:

- **parameter intervals from the fit's covariance**: estimate +- Student's t quantile x
  standard error, the covariance HC3's sandwich (MacKinnon and White 1985), which stays
  honest when the noise grows with the level, as counts' does: on 200 simulated Poisson
  series its 90% intervals covered p, q and m 89 to 92% of the time, against 79 to 81% for
  the textbook ``s^2 (J^T J)^-1``;
- **parameter intervals from a wild bootstrap**: the fitted increments plus each period's
  leverage-scaled residual with a random sign, refitted ``draws`` times; the percentiles of
  the refits;
- **prediction intervals** of the forecast from the same bootstrap: each refit's future
  increments plus noise drawn from the fit's Pearson residuals (residual over the square
  root of the fitted increment) scaled by the square root of the future increment, new
  adopters never below zero, accumulated; the percentiles of those paths.

A series that cannot be fitted raises ``CannotFit`` saying why (too short, nobody adopted,
adoption in too few periods, falling cumulative counts, or a market potential the series
cannot pin down); the fit never fails with anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from maas.analytics import batched
from maas.analytics.curves import Curve

CONFIDENCE = 0.90
SCIPY_REFITS = 10
"""Bootstrap refits the batched solver leaves unconverged that scipy retries; the rest are
left out (the outlook's notes say how many were used)."""
MIN_ADOPTING_PERIODS = 3
"""A curve needs a rise: at least this many periods with new adopters."""


class CannotFit(ValueError):
    """The series cannot be fitted by this curve; the message says why."""


@dataclass
class Fit:
    curve: Curve
    theta: np.ndarray
    """Every parameter of the curve, in ``curve.names`` order (m included when it was fixed)."""
    free: np.ndarray
    """Which parameters were fitted (m is fixed when the operator set the potential; p and q
    when they come from a pooled fit)."""
    observed: np.ndarray
    """New adopters in periods 1..n."""
    covariance: np.ndarray | None
    """Of the free parameters; None when the data do not determine them (see ``warnings``)."""
    warnings: list[str] = field(default_factory=list)
    jacobian: np.ndarray | None = None
    """Of the residuals with respect to the free parameters, at the fit."""
    ceiling: float | None = None
    """m's upper bound, when the series has one (a share's is 1)."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return _bounds(self.curve, float(self.observed.sum()), self.ceiling)

    @property
    def n(self) -> int:
        return len(self.observed)

    @property
    def k(self) -> int:
        return int(self.free.sum())

    @property
    def fitted(self) -> np.ndarray:
        return self.curve.increments(_periods(self.n), self.theta)

    @property
    def residuals(self) -> np.ndarray:
        return self.observed - self.fitted

    @property
    def rss(self) -> float:
        return float(np.sum(self.residuals**2))

    @property
    def aic(self) -> float:
        """Gaussian least squares: ``n ln(RSS / n) + 2k``."""
        return self.n * math.log(max(self.rss, 1e-12) / self.n) + 2 * self.k

    @property
    def params(self) -> dict[str, float]:
        return dict(zip(self.curve.names, map(float, self.theta), strict=True))

    def intervals(self, confidence: float = CONFIDENCE) -> dict[str, tuple[float, float]]:
        """Each fitted parameter's interval from the covariance (none if it is unknown), cut
        to the parameter's range (a symmetric interval can reach below an m that the
        adopters so far already bound)."""
        if self.covariance is None:
            return {}
        quantile = stats.t.ppf(0.5 + confidence / 2, self.n - self.k)
        errors = np.sqrt(np.diag(self.covariance))
        low, high = self.curve.bounds(float(self.observed.sum()))
        return {
            name: (float(max(v - quantile * e, lo)), float(min(v + quantile * e, hi)))
            for name, v, e, lo, hi in zip(
                (n for n, free in zip(self.curve.names, self.free, strict=True) if free),
                self.theta[self.free],
                errors,
                np.asarray(low)[self.free],
                np.asarray(high)[self.free],
                strict=True,
            )
        }


def _periods(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=float)


def check(observed: np.ndarray, curve: Curve, free: int) -> None:
    """Raise CannotFit when no fit of ``free`` of ``curve``'s parameters could mean anything."""
    needed = free + 2
    if len(observed) < needed:
        raise CannotFit(
            f"the {curve.name} model has {needed - 2} parameters to fit and needs at least "
            f"{needed} periods; the series has {len(observed)}"
        )
    if not np.all(np.isfinite(observed)):
        raise CannotFit("the series has missing or infinite values")
    falling = np.flatnonzero(observed < 0)
    if falling.size:
        raise CannotFit(
            f"cumulative adopters fall in period {falling[0] + 1}: adoption curves only "
            "rise (count adopters, not active users)"
        )
    adopting = int(np.count_nonzero(observed))
    if adopting == 0:
        raise CannotFit("nobody has adopted yet")
    if adopting < MIN_ADOPTING_PERIODS:
        raise CannotFit(
            f"new adopters came in only {adopting} period(s): a curve needs a rise over at "
            f"least {MIN_ADOPTING_PERIODS}"
        )


def fit(
    observed: np.ndarray,
    curve: Curve,
    *,
    fixed: dict[str, float] | None = None,
    start: np.ndarray | None = None,
    ceiling: float | None = None,
) -> Fit:
    """The least-squares fit of ``curve`` to new adopters per period. ``fixed`` holds
    parameters not to fit (m: the operator's market potential; p and q: a pooled fit's);
    ``start`` (all parameters) replaces the starting grid; ``ceiling`` bounds m (1 for a
    share)."""
    observed = np.asarray(observed, dtype=float)
    fixed = fixed or {}
    free = np.array([name not in fixed for name in curve.names])
    check(observed, curve, int(free.sum()))
    total = float(observed.sum())
    if fixed.get("m", total) < total:
        raise CannotFit(f"the potential {fixed['m']:g} is below the {total:g} who adopted already")
    if not free.any():  # a pooled p and q with the operator's m: the curve is given
        given = Fit(curve, np.array([fixed[n] for n in curve.names]), free, observed, None)
        given.warnings.append("every parameter is given (pooled p and q, the operator's m)")
        return given
    if ceiling is not None and total > ceiling:
        raise CannotFit(f"the series reaches {total:g}, above its ceiling {ceiling:g}")
    low, high = _bounds(curve, total, ceiling)
    m_index = curve.names.index("m")
    template = np.array([fixed.get(name, 0.0) for name in curve.names])
    starts = (
        [np.asarray(start, dtype=float)]
        if start is not None
        else curve.starts(total, len(observed))
    )
    best = _solve(curve, observed, free, template, low, high, starts)
    if best is None:
        raise CannotFit(f"the {curve.name} model's least squares did not converge")
    theta = _full(best.x, free, template)
    result = Fit(curve, theta, free, observed, None, ceiling=ceiling)
    result.jacobian = best.jac
    result.covariance, reason = _covariance(best.jac, result.residuals, result.k)
    if reason:
        result.warnings.append(reason)
    if free[m_index] and not _determined(result, m_index, _bounds(curve, total, None)[1][m_index]):
        raise CannotFit(
            "the series shows no slowing yet, so it cannot tell the market potential m: set "
            "the potential (maas analytics potential INDUSTRY N) or wait for more periods"
        )
    result.warnings += _edges(result, low, high)
    return result


def _bounds(curve: Curve, total: float, ceiling: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The curve's parameter bounds for a series of ``total``, m at most ``ceiling``."""
    low, high = (np.array(b, dtype=float) for b in curve.bounds(total))
    if ceiling is not None:  # a share: m at most 1
        high[curve.names.index("m")] = ceiling
    return low, high


def _edges(result: Fit, low: np.ndarray, high: np.ndarray) -> list[str]:
    """What a reader of the fit should know: parameters at their bounds, an m below the
    adopters so far."""
    names, theta = result.curve.names, result.theta
    at_bound = [
        name
        for name, value, lo, hi, f in zip(names, theta, low, high, result.free, strict=True)
        if f and (np.isclose(value, lo, rtol=1e-6) or np.isclose(value, hi, rtol=1e-6))
    ]
    notes = []
    if at_bound:
        notes.append(
            f"{', '.join(at_bound)} at the edge of the allowed range: its interval is not reliable"
        )
    m, total = theta[names.index("m")], float(result.observed.sum())
    if m < total:
        notes.append(
            f"m ({m:.4g}) is below the {total:g} who adopted: the series has saturated, and m "
            "is the adopters so far within the noise"
        )
    return notes


def _determined(result: Fit, index: int, ceiling: float) -> bool:
    """Whether the series pins parameter ``index`` down: not at its ceiling, and its standard
    error smaller than itself (an exponential rise fits any large m equally well)."""
    value = result.theta[index]
    if np.isclose(value, ceiling, rtol=1e-6) or result.covariance is None:
        return False
    position = int(np.flatnonzero(result.free).tolist().index(index))
    return bool(np.sqrt(result.covariance[position, position]) < value)


def _full(x: np.ndarray, free: np.ndarray, template: np.ndarray) -> np.ndarray:
    """All the parameters: the fitted ``x`` where ``free``, the template's elsewhere."""
    theta = template.astype(float)
    theta[free] = x
    return theta


def _problem(curve, observed, free, template):
    """The residuals of the free parameters ``x``, and their Jacobian by forward differences
    evaluated in one broadcast call (scipy's would call the curve once per parameter)."""
    t = _periods(len(observed))

    def residuals(x):
        return curve.increments(t, _full(x, free, template)) - observed

    def jacobian(x):
        steps = 1.5e-8 * np.maximum(np.abs(x), 1e-6)
        thetas = np.repeat(_full(x, free, template)[:, None], len(x) + 1, axis=1)
        thetas[np.flatnonzero(free), np.arange(1, len(x) + 1)] += steps
        values = curve.increments(t, thetas[:, :, None])
        return ((values[1:] - values[0]) / steps[:, None]).T

    return residuals, jacobian


def _solve(curve, observed, free, template, low, high, starts):
    residuals, jacobian = _problem(curve, observed, free, template)

    best = None
    for start in starts:
        x0 = np.clip(np.asarray(start, dtype=float)[free], low[free], high[free])
        try:
            solution = optimize.least_squares(
                residuals,
                x0,
                jac=jacobian,
                bounds=(low[free], high[free]),
                x_scale="jac",
                max_nfev=300,
            )
        except (ValueError, FloatingPointError):
            continue
        if not np.all(np.isfinite(solution.x)):
            continue
        if best is not None and math.isclose(solution.cost, best.cost, rel_tol=1e-7):
            return best  # two starts found the same minimum: the rest would too, likely
        if best is None or solution.cost < best.cost:
            best = solution
    return best


def _covariance(jac: np.ndarray, residuals: np.ndarray, k: int):
    """HC3, the sandwich ``A J^T diag(e_i^2 / (1 - h_i)^2) J A`` with ``A = (J^T J)^-1`` and
    ``h`` the leverages; or None and why when J^T J is (nearly) singular."""
    if len(residuals) <= k:
        return None, "as many parameters as periods: no covariance"
    information = jac.T @ jac
    if not np.all(np.isfinite(information)) or np.linalg.cond(information) > 1e14:
        return None, "the parameters are not separately determined by this series"
    inverse = np.linalg.inv(information)
    scaled = _leveraged(jac, inverse, residuals)
    return inverse @ (jac.T * scaled**2) @ jac @ inverse, None


def _leveraged(jac: np.ndarray, inverse: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """``e_i / (1 - h_i)``: residuals scaled up where one period pulls the fit to itself."""
    leverage = np.einsum("ij,jk,ik->i", jac, inverse, jac)
    room = 1.0 - leverage
    return np.where(room > 1e-8, residuals / np.maximum(room, 1e-8), 0.0)


@dataclass(frozen=True)
class Bootstrap:
    thetas: np.ndarray
    """[draws, parameters]: the refits that converged."""
    pearson: np.ndarray
    """The fit's residuals over the square root of its fitted increments: the noise a
    forecast adds, scaled back by its own increments (count data vary with their level)."""
    asked: int
    """Refits attempted; ``len(thetas)`` of them converged and are used."""

    def intervals(self, fit: Fit, confidence: float = CONFIDENCE):
        low, high = 50 * (1 - confidence), 50 * (1 + confidence)
        return {
            name: (float(np.percentile(column, low)), float(np.percentile(column, high)))
            for name, column, free in zip(fit.curve.names, self.thetas.T, fit.free, strict=True)
            if free
        }


def bootstrap(fit: Fit, draws: int = 200, seed: int = 0) -> Bootstrap:
    """Wild bootstrap (Rademacher signs on the leverage-scaled residuals, which keeps each
    period's own noise level): ``draws`` refits, each started from the fit."""
    rng = np.random.default_rng(seed)
    pearson = fit.residuals / np.sqrt(np.maximum(fit.fitted, 1.0))
    if not fit.free.any():  # nothing was fitted: the forecast's only spread is the noise
        return Bootstrap(np.repeat(fit.theta[None], draws, axis=0), pearson - pearson.mean(), draws)
    scaled = fit.residuals
    if fit.jacobian is not None and fit.covariance is not None:
        inverse = np.linalg.inv(fit.jacobian.T @ fit.jacobian)
        scaled = _leveraged(fit.jacobian, inverse, fit.residuals)
    series = fit.fitted + scaled * rng.choice((-1.0, 1.0), size=(draws, fit.n))
    low, high = fit.bounds()
    thetas, converged = batched.refit(fit.curve, series, fit.theta, fit.free, low, high)
    kept = [theta for theta, ok in zip(thetas, converged, strict=True) if ok]
    for row in np.flatnonzero(~converged)[:SCIPY_REFITS]:  # a few the batch left: scipy
        theta = _refit(fit, series[row])
        if theta is not None:
            kept.append(theta)
    if not kept:
        raise CannotFit("no bootstrap refit converged")
    return Bootstrap(np.array(kept), pearson - pearson.mean(), draws)


def _refit(fit: Fit, series: np.ndarray) -> np.ndarray | None:
    """A bootstrap series' fit, started from ``fit``: MINPACK's Levenberg-Marquardt (twice as
    fast as the bounded solver here), or the bounded solver when it leaves the bounds."""
    low, high = fit.bounds()
    residuals, jacobian = _problem(fit.curve, series, fit.free, fit.theta)
    try:
        solution = optimize.least_squares(
            residuals, fit.theta[fit.free], jac=jacobian, method="lm", max_nfev=200
        )
        inside = np.all(solution.x >= low[fit.free]) and np.all(solution.x <= high[fit.free])
    except (ValueError, FloatingPointError):
        inside = False
    if not inside:
        solution = _solve(fit.curve, series, fit.free, fit.theta, low, high, [fit.theta])
    if solution is None or not np.all(np.isfinite(solution.x)):
        return None
    return _full(solution.x, fit.free, fit.theta)


@dataclass(frozen=True)
class Forecast:
    periods: np.ndarray
    """Period numbers n+1..n+horizon."""
    new: np.ndarray
    cumulative: np.ndarray
    """Adopters so far plus the forecast's new adopters."""
    new_band: tuple[np.ndarray, np.ndarray]
    cumulative_band: tuple[np.ndarray, np.ndarray]
    confidence: float


def forecast(
    fit: Fit, horizon: int, boot: Bootstrap, confidence: float = CONFIDENCE, seed: int = 1
) -> Forecast:
    """The next ``horizon`` periods: the fit's increments added to the adopters so far, and
    prediction intervals from the bootstrap's refits plus noise. New adopters never exceed
    what is left of the potential m (the curve's own m, or the operator's), so a forecast
    that starts from the observed total, not from the curve, never passes m."""
    rng = np.random.default_rng(seed)
    t = _periods(horizon, start=fit.n + 1)
    total = float(fit.observed.sum())
    m = fit.curve.names.index("m")
    increments = np.maximum(fit.curve.increments(t, fit.theta), 0.0)[None]
    new = _within(increments, total, fit.theta[m : m + 1])[0]
    paths = fit.curve.increments(t, boot.thetas.T[:, :, None])
    noise = rng.choice(boot.pearson, size=paths.shape) * np.sqrt(np.maximum(paths, 1.0))
    paths = _within(np.maximum(paths + noise, 0.0), total, boot.thetas[:, m])
    low, high = 50 * (1 - confidence), 50 * (1 + confidence)
    cumulative_paths = total + np.cumsum(paths, axis=1)
    return Forecast(
        periods=t,
        new=new,
        cumulative=total + np.cumsum(new),
        new_band=(np.percentile(paths, low, axis=0), np.percentile(paths, high, axis=0)),
        cumulative_band=(
            np.percentile(cumulative_paths, low, axis=0),
            np.percentile(cumulative_paths, high, axis=0),
        ),
        confidence=confidence,
    )


def _within(increments: np.ndarray, total: float, potential: np.ndarray) -> np.ndarray:
    """Each path's increments [B, h], cut so that ``total`` plus them stays at most its
    potential [B] (no new adopters once it is reached)."""
    reached = total + np.cumsum(increments, axis=1)
    cap = np.maximum(potential[:, None], total)
    return np.diff(np.minimum(reached, cap), axis=1, prepend=total)
