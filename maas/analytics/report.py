"""What the API and the CLI show: adoption per group and the forecast of one industry (or of
the whole platform), as response schemas, for a viewer who sees all tenants (admins, the
local CLI) or one tenant and its departments (maintainers)."""

from __future__ import annotations

from datetime import date

import numpy as np
from pydantic import BaseModel
from sqlalchemy import Engine, select

from maas.analytics import adoption
from maas.auth.principal import Principal
from maas.db.tables import Tenant
from maas.errors import InvalidRequest, NotFound

CONFIDENCE = 0.90


class GroupPublic(BaseModel):
    group: str
    potential: float | None
    potential_source: str | None
    retention: float | None
    retention_cohort: int
    periods: list[adoption.PeriodFigures]


class AdoptionPublic(BaseModel):
    group_by: str
    period: str
    min_requests: int
    retention_after: int
    data: list[GroupPublic]


class BacktestPublic(BaseModel):
    origins: int
    mape: float
    """Percent, on cumulative adopters."""
    rmse: float


class CandidatePublic(BaseModel):
    model: str
    params: dict[str, float] | None
    intervals: dict[str, tuple[float, float]] | None
    """From the fit's covariance (HC3), at ``confidence``."""
    aic: float | None
    backtest: BacktestPublic | None
    why_not: str | None
    warnings: list[str]


class LandmarkPublic(BaseModel):
    periods_from_launch: float | None
    period: str | None


class PointPublic(BaseModel):
    period: str
    new_adopters: float
    adopted: float
    low: float
    """Of ``adopted``: the prediction interval at ``confidence``."""
    high: float
    penetration: float | None


class ObservedPublic(BaseModel):
    period: str
    new_adopters: float
    adopted: float
    fitted: float
    """Adopters by then as the chosen curve has it (its increments, accumulated)."""
    penetration: float | None


class ForecastPublic(BaseModel):
    group: str
    source: str
    """``usage records``, or the publisher of an imported series."""
    measure: str
    """``adopters`` (organisations), or ``share`` (0 to 1) for an imported share series."""
    period: str
    min_requests: int
    confidence: float
    potential: float | None
    """Penetration's denominator: the operator's figure, else the chosen curve's m."""
    potential_source: str | None
    potential_estimated: bool
    """The potential is the chosen curve's m, not a figure the operator set."""
    observed: list[ObservedPublic]
    candidates: list[CandidatePublic]
    chosen: str
    params: dict[str, float]
    intervals_covariance: dict[str, tuple[float, float]]
    intervals_bootstrap: dict[str, tuple[float, float]]
    landmarks: dict[str, LandmarkPublic]
    """``peak``: new adoption's highest; ``half`` and ``ninety``: 50% and 90% of m."""
    forecast: list[PointPublic]
    notes: list[str]


def visible_tenants(engine: Engine, viewer: Principal | None) -> set[str] | None:
    """The tenants a viewer's figures cover: all (None) for admins and the local CLI, else
    the viewer's tenant and its departments."""
    if viewer is None or viewer.is_admin:
        return None
    with engine.connect() as connection:
        rows = connection.execute(
            select(Tenant.name).where(
                (Tenant.id == viewer.tenant_id) | (Tenant.parent_id == viewer.tenant_id)
            )
        )
        return {name for (name,) in rows}


def adoption_report(
    engine: Engine,
    viewer: Principal | None,
    *,
    group_by: str = "industry",
    period: str = "month",
    min_requests: int = 1,
    retention_after: int = 1,
    since: date | None = None,
    until: date | None = None,
) -> AdoptionPublic:
    groups = _groups(engine, viewer, group_by, period, min_requests, retention_after, since, until)
    return AdoptionPublic(
        group_by=group_by,
        period=period,
        min_requests=min_requests,
        retention_after=retention_after,
        data=[
            GroupPublic(
                group=g.group,
                potential=g.potential,
                potential_source=g.potential_source,
                retention=g.retention,
                retention_cohort=g.retention_cohort,
                periods=g.periods,
            )
            for g in groups
        ],
    )


def _groups(engine, viewer, group_by, period, min_requests, retention_after, since, until):
    """Adoption per group; ``since`` only hides the periods before it: who adopted when is
    worked out over the whole history, so an early adopter never becomes new again."""
    rows = adoption.activity(engine, period, until=until, tenants=visible_tenants(engine, viewer))
    groups = adoption.measure(
        rows,
        group_by,
        period,
        min_requests=min_requests,
        retention_after=retention_after,
        organisation_of=adoption.organisations(engine),
        market=adoption.potentials(engine),
    )
    if since is not None:
        first = adoption.period_label(adoption.period_number(since, period), period)
        for group in groups:
            group.periods = [p for p in group.periods if p.period >= first]
    return groups


def forecast_report(
    engine: Engine,
    viewer: Principal | None,
    industry: str,
    *,
    horizon: int = 12,
    period: str = "month",
    min_requests: int = 1,
    shock_at: str | None = None,
    draws: int = 200,
    source: str | None = None,
) -> ForecastPublic:
    """The forecast of ``industry``'s adopters (``platform``: every tenant), or of the series
    ``source`` published for it (``maas analytics import``). A usage series too young for its
    own Bass fit takes p and q from the pooled fit of every industry."""
    if not 1 <= horizon <= 120:
        raise InvalidRequest("horizon is 1 to 120 periods", param="horizon")
    if source is not None:
        return _forecast_imported(engine, industry, source, horizon, shock_at, draws)
    if viewer is not None and not viewer.is_admin:
        # a maintainer sees one organisation: its forecast is of that organisation's tenants
        # (itself and its departments) adopting
        if industry not in ("platform", viewer.industry):
            raise NotFound(f"no adoption recorded in {industry!r}", param="industry")
        found = _groups(engine, viewer, "organisation", period, min_requests, 1, None, None)
        if not found:
            raise NotFound(f"no adoption recorded in {industry!r}", param="industry")
        return _forecast(found[0], _Pooling({}), horizon, period, min_requests, shock_at, draws)
    industries = {
        g.group: g for g in _groups(engine, viewer, "industry", period, min_requests, 1, None, None)
    }
    if industry == "platform":
        found = _groups(engine, viewer, "platform", period, min_requests, 1, None, None)
        target = found[0] if found else None
    else:
        target = industries.get(industry)
    if target is None:
        raise NotFound(f"no adoption recorded in {industry!r}", param="industry")
    pooling = _Pooling(industries)
    return _forecast(target, pooling, horizon, period, min_requests, shock_at, draws)


def forecast_industries(
    engine: Engine,
    viewer: Principal | None,
    *,
    horizon: int = 12,
    period: str = "month",
    min_requests: int = 1,
    draws: int = 200,
) -> dict[str, ForecastPublic | str]:
    """Every industry's forecast (or why it has none), from one read of the usage records
    and one pooled fit."""
    if not 1 <= horizon <= 120:
        raise InvalidRequest("horizon is 1 to 120 periods", param="horizon")
    industries = {
        g.group: g for g in _groups(engine, viewer, "industry", period, min_requests, 1, None, None)
    }
    pooling = _Pooling(industries)
    results: dict[str, ForecastPublic | str] = {}
    for name, group in industries.items():
        try:
            results[name] = _forecast(group, pooling, horizon, period, min_requests, None, draws)
        except InvalidRequest as error:
            results[name] = error.message
    return results


def _forecast_imported(engine, industry, source, horizon, shock_at, draws) -> ForecastPublic:
    """An imported series' forecast: its cumulative figures as new adopters per period."""
    from maas.analytics import forecast, series

    found = [s for s in series.load(engine, industry) if s.source == source]
    if not found:
        raise NotFound(f"no series of {industry!r} from {source!r}", param="source")
    imported = found[0]
    unit = series._kind(imported.periods[0])
    cumulative = np.array(imported.values, dtype=float)
    increments = np.diff(cumulative, prepend=0.0)
    target = adoption.GroupAdoption(
        group=industry,
        potential=None,
        potential_source=None,
        periods=[
            adoption.PeriodFigures(
                period=label,
                active=0,
                adopted=float(total),
                new_adopters=float(new),
                requests=0,
                tokens=0,
                models=0,
                depth=None,
                penetration=None,
                tasks={},
            )  # fmt: skip
            for label, total, new in zip(imported.periods, cumulative, increments, strict=True)
        ],
        retention=None,
        retention_cohort=0,
    )
    options = {"shock_at": _shock_period(shock_at, imported.periods), "draws": draws}
    if imported.measure == "share":
        options["ceiling"] = 1.0  # a share saturates at most at everyone
    try:
        outlook = forecast.outlook(increments, horizon, **options)
    except forecast.CannotFit as error:
        raise InvalidRequest(f"cannot forecast {industry}: {error}", param="source") from None
    return _forecast_public(
        target, outlook, imported.periods, unit, 0, source=source, measure=imported.measure
    )


def _forecast(target, pooling, horizon, period, min_requests, shock_at, draws) -> ForecastPublic:
    from maas.analytics import forecast

    labels = [p.period for p in target.periods]
    observed = np.array([p.new_adopters for p in target.periods], dtype=float)
    options = {
        "potential": target.potential,
        "shock_at": _shock_period(shock_at, labels),
        "draws": draws,
    }
    try:
        try:
            outlook = forecast.outlook(observed, horizon, **options)
        except forecast.CannotFit:
            outlook = None
        if _wants_pooled(outlook, observed) and pooling.p_and_q() is not None:
            outlook = forecast.outlook(observed, horizon, pooled=pooling.p_and_q(), **options)
        if outlook is None:  # say why, curve by curve
            outlook = forecast.outlook(observed, horizon, **options)
    except forecast.CannotFit as error:
        raise InvalidRequest(f"cannot forecast {target.group}: {error}", param="industry") from None
    return _forecast_public(target, outlook, labels, period, min_requests)


class _Pooling:
    """Bass's p and q from every industry's series together, fitted once when first asked;
    None when fewer than two industries have adopters."""

    def __init__(self, industries) -> None:
        self._industries = industries
        self._fitted = False
        self._p_and_q: tuple[float, float] | None = None

    def p_and_q(self) -> tuple[float, float] | None:
        from maas.analytics import forecast

        if not self._fitted:
            self._fitted = True
            series = {
                name: np.array([p.new_adopters for p in g.periods], dtype=float)
                for name, g in self._industries.items()
            }
            try:
                self._p_and_q = forecast.pooled_bass(series)
            except forecast.CannotFit:
                self._p_and_q = None
        return self._p_and_q


def _wants_pooled(outlook, observed: np.ndarray) -> bool:
    """Fewer than POOL_BELOW periods since the first adopter, or no Bass fit of its own."""
    from maas.analytics import forecast

    young = np.count_nonzero(np.cumsum(observed)) < forecast.POOL_BELOW
    return outlook is None or young or outlook.candidates[0].fit is None


def _shock_period(shock_at: str | None, labels: list[str]) -> float | None:
    if shock_at is None:
        return None
    if shock_at not in labels:
        raise InvalidRequest(
            f"shock_at {shock_at!r} is not one of the series' periods ({labels[0]} to "
            f"{labels[-1]})",
            param="shock_at",
        )
    return float(labels.index(shock_at))  # t runs from the start of the named period


def _forecast_public(
    target, outlook, labels, unit, min_requests, source="usage records", measure="adopters"
) -> ForecastPublic:
    chosen = outlook.chosen.fit
    potential, source_of_potential = target.potential, target.potential_source
    estimated = potential is None and measure == "adopters" and "m" in chosen.params
    if estimated:
        potential = chosen.params["m"]
        source_of_potential = f"estimated: the {outlook.chosen.name} fit's m"

    def share(adopted: float) -> float | None:
        return float(adopted / potential) if potential else None

    first = _period_number(labels[0], unit)

    def label(t: float | None) -> LandmarkPublic:
        if t is None:
            return LandmarkPublic(periods_from_launch=None, period=None)
        number = first + max(int(np.ceil(t)) - 1, 0)
        return LandmarkPublic(periods_from_launch=t, period=adoption.period_label(number, unit))

    adopted = np.cumsum([p.new_adopters for p in target.periods])
    result = outlook.forecast
    points = [
        PointPublic(
            period=adoption.period_label(first + int(t) - 1, unit),
            new_adopters=float(new),
            adopted=float(total),
            low=float(low),
            high=float(high),
            penetration=share(total),
        )
        for t, new, total, low, high in zip(
            result.periods, result.new, result.cumulative, *result.cumulative_band, strict=True
        )
    ]
    return ForecastPublic(
        group=target.group,
        source=source,
        measure=measure,
        period=unit,
        min_requests=min_requests,
        confidence=result.confidence,
        potential=potential,
        potential_source=source_of_potential,
        potential_estimated=estimated,
        observed=[
            ObservedPublic(
                period=p.period,
                new_adopters=p.new_adopters,
                adopted=float(a),
                fitted=float(f),
                penetration=share(a),
            )
            for p, a, f in zip(target.periods, adopted, np.cumsum(chosen.fitted), strict=True)
        ],
        candidates=[_candidate_public(c) for c in outlook.candidates],
        chosen=outlook.chosen.name,
        params=chosen.params,
        intervals_covariance=chosen.intervals(CONFIDENCE),
        intervals_bootstrap=outlook.bootstrap.intervals(chosen, CONFIDENCE),
        landmarks={name: label(t) for name, t in outlook.landmarks.items()},
        forecast=points,
        notes=outlook.notes,
    )


def _candidate_public(candidate) -> CandidatePublic:
    fit = candidate.fit
    backtest = candidate.backtest
    return CandidatePublic(
        model=candidate.name,
        params=fit.params if fit else None,
        intervals=fit.intervals(CONFIDENCE) if fit else None,
        aic=fit.aic if fit else None,
        backtest=BacktestPublic(**vars(backtest)) if backtest else None,
        why_not=candidate.why_not,
        warnings=fit.warnings if fit else [],
    )


def _period_number(label: str, unit: str) -> int:
    if unit == "year":
        return int(label)
    if unit == "month":
        year, month = label.split("-")
        return int(year) * 12 + int(month) - 1
    year, week = label.split("-W")
    monday = date.fromisocalendar(int(year), int(week), 1)
    return (monday - adoption.MONDAY).days // 7
