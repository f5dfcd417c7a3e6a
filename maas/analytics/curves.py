"""Diffusion curves: how many of a market's ``m`` potential adopters have adopted by time t.

Time counts periods (weeks or months) from launch: the series' first period is t = 1 and
nobody has adopted at t = 0. Each curve gives the cumulative adopters N(t); the fit compares
its increments N(t) - N(t-1) with the new adopters of each period (``fitting.py``).

- **Bass** (Bass 1969): ``F(t) = (1 - e^{-(p+q)t}) / (1 + (q/p) e^{-(p+q)t})``, N = m F. ``p``
  is innovation (adoption from outside influence), ``q`` imitation (from earlier adopters).
  New adoption peaks at ``t* = ln(q/p) / (p+q)`` (at launch when q <= p).
- **Generalized Bass with an exponential shock** (Bass, Krishnan and Jain 1994; the ``exp``
  shock of Guseo and Mortarino's DIMORA): time runs faster by ``x(t) = 1 + c e^{b(t-a)}``
  from the shock's period ``a`` on (a price cut, a campaign: given by the analyst), so
  ``F(t) = F_bass(X(t))`` with ``X(t) = t + (c/b)(e^{b(t-a)} - 1)`` for t > a. ``c`` is the
  shock's strength (negative: a setback), ``b`` how fast it fades (at most 0: a shock
  that grows could make time run backwards).
- **Logistic**: ``N = m / (1 + e^{-k(t - t0)})``, symmetric around its midpoint t0.
- **Gompertz**: ``N = m e^{-b e^{-kt}}``, fast early growth and a long slow approach to m.

Logistic and Gompertz are not zero at t = 0. Compared on increments alone, the logistic would
be the Bass curve shifted down by a constant (Bass is a logistic anchored at zero), and the
two would always fit equally; so the first period's increment is the whole of N(1), and a
curve that puts adopters before launch pays for them there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

M_FLOOR = 0.5
"""m's lower bound, as a share of the adopters so far. Noise lets a saturated series' best m
fall a little below its total; a bound at the total itself would pin it there."""
SHOCK_CAP = 50.0
"""Bound on the shock's exponent b(t - a): beyond it the curve's time is meaningless."""


@dataclass(frozen=True)
class Curve:
    """One diffusion curve: its parameter names, bounds and starting points for the fit.

    ``cumulative`` and ``increments`` broadcast: ``theta`` may be [parameters, B, 1] for B
    parameter vectors at once (the fit's Jacobian evaluates them in one call)."""

    name: str
    names: tuple[str, ...]

    def cumulative(self, t: np.ndarray, theta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def bounds(self, total: float) -> tuple[list[float], list[float]]:
        """Lower and upper bounds of the parameters, for a series of ``total`` adopters so far."""
        raise NotImplementedError

    def starts(self, total: float, periods: int) -> list[list[float]]:
        """Points the fit starts from; it keeps the best."""
        raise NotImplementedError

    def landmarks(self, theta: np.ndarray) -> dict[str, float | None]:
        """Peak period of new adoption and the periods at which 50% and 90% of m have adopted
        (None where the curve never gets there)."""
        t = np.arange(0.0, 2000.0, 0.05)
        cumulative = self.cumulative(t, theta)
        rate = np.diff(cumulative)
        m = theta[self.names.index("m")]
        return {
            "peak": float(t[int(np.argmax(rate))]) if rate.size else None,
            "half": _first(t, cumulative >= 0.5 * m),
            "ninety": _first(t, cumulative >= 0.9 * m),
        }

    def increments(self, t: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """New adopters in each period t (from t-1 to t). Nobody has adopted at launch, so
        period 1's are all of N(1): a curve that is not zero at t = 0 (logistic, Gompertz)
        answers for its adopters before launch there, instead of hiding them."""
        before = np.where(t > 1.0, self.cumulative(t - 1.0, theta), 0.0)
        return self.cumulative(t, theta) - before


def _first(t: np.ndarray, reached: np.ndarray) -> float | None:
    index = int(np.argmax(reached))
    return float(t[index]) if reached[index] else None


def bass_fraction(x: np.ndarray, p: float, q: float) -> np.ndarray:
    decay = np.exp(-(p + q) * np.maximum(x, 0.0))
    return (1.0 - decay) / (1.0 + (q / p) * decay)


class Bass(Curve):
    def __init__(self) -> None:
        super().__init__("bass", ("p", "q", "m"))

    def cumulative(self, t, theta):
        p, q, m = theta
        return m * bass_fraction(t, p, q)

    def bounds(self, total):
        return [1e-5, 1e-4, M_FLOOR * total], [1.0, 3.0, max(total, 1.0) * 1000.0]

    def starts(self, total, periods):
        return [
            [p, q, total * share] for p in (0.005, 0.03) for q in (0.1, 0.5) for share in (1.3, 3.0)
        ]

    def landmarks(self, theta):
        p, q, _ = theta
        peak = max(0.0, math.log(q / p) / (p + q)) if q > p else 0.0
        return {"peak": peak, "half": _bass_time(p, q, 0.5), "ninety": _bass_time(p, q, 0.9)}


def _bass_time(p: float, q: float, share: float) -> float:
    """When F reaches ``share``: ``ln((1 + (q/p) share) / (1 - share)) / (p + q)``."""
    return math.log((1.0 + (q / p) * share) / (1.0 - share)) / (p + q)


class ShockedBass(Curve):
    """The Generalized Bass model with an exponential shock from period ``shock_at`` on."""

    def __init__(self, shock_at: float) -> None:
        super().__init__("generalized-bass", ("p", "q", "m", "c", "b"))
        self.shock_at = float(shock_at)

    def internal_time(self, t: np.ndarray, c, b) -> np.ndarray:
        after = np.maximum(np.asarray(t, dtype=float) - self.shock_at, 0.0)
        tiny = np.abs(b) < 1e-8  # the limit b -> 0: a constant speed-up c
        safe = np.where(tiny, 1.0, b)
        grown = np.where(tiny, after, np.expm1(np.minimum(safe * after, SHOCK_CAP)) / safe)
        return t + c * grown

    def cumulative(self, t, theta):
        p, q, m, c, b = theta
        return m * bass_fraction(self.internal_time(t, c, b), p, q)

    def bounds(self, total):
        low, high = Bass().bounds(total)
        # b <= 0: a shock fades (or stays, at 0). A growing one with c < 0 would make time
        # run backwards (x(t) < 0) and new adoption negative.
        return low + [-0.95, -2.0], high + [20.0, 0.0]

    def starts(self, total, periods):
        return [start + [c, -0.1] for start in Bass().starts(total, periods) for c in (0.5,)]


class Logistic(Curve):
    def __init__(self) -> None:
        super().__init__("logistic", ("k", "t0", "m"))

    def cumulative(self, t, theta):
        k, t0, m = theta
        return m / (1.0 + np.exp(np.clip(-k * (t - t0), -500, 500)))

    def bounds(self, total):
        return [1e-4, -50.0, M_FLOOR * total], [5.0, 2000.0, max(total, 1.0) * 1000.0]

    def starts(self, total, periods):
        return [
            [k, periods * f, total * s] for k in (0.2, 0.6) for f in (0.7, 1.5) for s in (1.3, 3.0)
        ]


class Gompertz(Curve):
    def __init__(self) -> None:
        super().__init__("gompertz", ("k", "b", "m"))

    def cumulative(self, t, theta):
        k, b, m = theta
        return m * np.exp(-b * np.exp(np.clip(-k * t, -500, 500)))

    def bounds(self, total):
        return [1e-4, 1e-3, M_FLOOR * total], [5.0, 1e4, max(total, 1.0) * 1000.0]

    def starts(self, total, periods):
        return [[k, b, total * s] for k in (0.05, 0.3) for b in (3.0, 20.0) for s in (1.3, 3.0)]


def named(name: str, shock_at: float | None = None) -> Curve:
    """The curve of that name (``generalized-bass`` needs the shock's period)."""
    if name == "generalized-bass":
        if shock_at is None:
            raise ValueError("the generalized Bass model needs the shock's period (shock_at)")
        return ShockedBass(shock_at)
    curves = {"bass": Bass, "logistic": Logistic, "gompertz": Gompertz}
    if name not in curves:
        raise ValueError(f"no curve {name!r}; use bass, generalized-bass, logistic or gompertz")
    return curves[name]()
