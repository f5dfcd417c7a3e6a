"""Many small least-squares fits at once: the bootstrap's refits of one curve to ``B``
series, as one Levenberg-Marquardt iteration over all of them.

scipy has no batched solver, and calling ``least_squares`` 200 times costs about a
millisecond each in Python overhead for a 3-parameter curve; here each iteration is a few
numpy calls on [B, n] arrays (the curves broadcast over parameter vectors), so a bootstrap
takes tens of milliseconds. Each series keeps its own damping; a step is taken where it
lowers that series' sum of squares, and parameters are kept within the curve's bounds.
Series that have not converged after ``ITERATIONS`` are reported, and the caller refits
them with scipy.
"""

from __future__ import annotations

import numpy as np

from maas.analytics.curves import Curve

ITERATIONS = 200
TOLERANCE = 1e-8
"""Relative change of the sum of squares below which a series has converged."""


def refit(
    curve: Curve,
    series: np.ndarray,
    start: np.ndarray,
    free: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``curve``'s free parameters to each row of ``series`` [B, n], from ``start`` (all
    parameters). Returns the parameters [B, P] and which rows converged [B]."""
    draws, periods = series.shape
    t = np.arange(1.0, periods + 1)
    theta = np.repeat(start[None].astype(float), draws, axis=0)
    index = np.flatnonzero(free)
    damping = np.full(draws, 1e-3)
    cost = _cost(curve, t, theta, series)
    done = ~np.isfinite(cost)
    for _ in range(ITERATIONS):
        rows = np.flatnonzero(~done)  # only the series still moving
        if not rows.size:
            break
        here, target = theta[rows], series[rows]
        jacobian = _jacobian(curve, t, here, index)  # [b, n, k]
        residual = _increments(curve, t, here) - target
        normal = np.einsum("bni,bnj->bij", jacobian, jacobian)
        gradient = np.einsum("bni,bn->bi", jacobian, residual)
        diagonal = np.einsum("bii->bi", normal) + 1e-12
        damped = normal + (damping[rows, None] * diagonal)[:, :, None] * np.eye(len(index))
        try:
            step = np.linalg.solve(damped, -gradient[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break
        trial = here.copy()
        trial[:, index] = np.clip(here[:, index] + step, low[index], high[index])
        trial_cost = _cost(curve, t, trial, target)
        better = np.isfinite(trial_cost) & (trial_cost < cost[rows])
        change = np.where(better, (cost[rows] - trial_cost) / np.maximum(cost[rows], 1e-12), 0)
        theta[rows[better]] = trial[better]
        cost[rows[better]] = trial_cost[better]
        damping[rows] = np.where(better, damping[rows] / 3, damping[rows] * 4)
        # converged: a step that barely helps, or no step that helps at all (a minimum)
        done[rows] = (better & (change < TOLERANCE)) | (damping[rows] > 1e8)
    return theta, done & np.isfinite(cost)


def _increments(curve: Curve, t: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return curve.increments(t, theta.T[:, :, None])


def _cost(curve, t, theta, series) -> np.ndarray:
    return np.sum((_increments(curve, t, theta) - series) ** 2, axis=1)


def _jacobian(curve, t, theta, index) -> np.ndarray:
    """Forward differences of the increments in each free parameter: [B, n, k]."""
    base = _increments(curve, t, theta)
    columns = []
    for i in index:
        step = 1.5e-8 * np.maximum(np.abs(theta[:, i]), 1e-6)
        moved = theta.copy()
        moved[:, i] += step
        columns.append((_increments(curve, t, moved) - base) / step[:, None])
    return np.stack(columns, axis=2)
