"""Adoption measures, from the usage records the server writes.

Definitions (docs/analytics.md gives the same):

- a **request** counts when it is an inference request (it names a model) answered with a
  status below 400;
- a tenant is **active** in a period (a week from Monday, or a calendar month, in UTC) when
  it made at least ``min_requests`` such requests in it; it has **adopted** from its first
  active period on. Who adopts depends on the grouping: for the platform, an industry or a
  model, the **organisations** (a department's requests count for its organisation, so an
  industry's adopters compare with its number of organisations); within an organisation,
  and tenant by tenant, each **tenant** (the organisation itself and each department).
  Grouped by model, an organisation adopts a model with ``min_requests`` requests to it;
- **new adopters** of a period are those whose first active period it is; **penetration**
  is adopters over the group's market potential (set by the operator per industry);
- **depth** is requests per active tenant; **retention after N periods** is the share of
  adopters active again N periods after the period they adopted in, over every cohort old
  enough to tell;
- **task share** is each task's share of the group's requests (the task of the model asked).

One SQL aggregation reads the records (requests and tokens per tenant, model and period), so
a million records never become a million Python objects; the rest is numpy arithmetic over
those sums (an adopter-by-period matrix of requests, and counts by group and period).
Periods run from the first period with any request on the platform (its launch, as the
forecasts count time) to the last, with zeros where nothing happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
from pydantic import BaseModel
from sqlalchemy import Date, Engine, Integer, Select, cast, func, literal, select
from sqlalchemy.sql.elements import ColumnElement

from maas.db.tables import MarketPotential, Model, Tenant, UsageRecord
from maas.errors import InvalidRequest

PERIODS = ("week", "month")
GROUPS = ("platform", "industry", "organisation", "tenant", "model")
"""``organisation``: an organisation with its departments (each a tenant adopting);
``tenant``: each tenant alone (an organisation or a department)."""
MONDAY = date(1970, 1, 5)


@dataclass(frozen=True)
class Activity:
    """Successful inference requests per tenant, model and period, as columns."""

    tenant: list[str]
    industry: list[str]
    model: list[str]
    period: np.ndarray
    """Weeks since 1970-01-05 or months since year 0 (``period_label`` names them)."""
    requests: np.ndarray
    tokens: np.ndarray
    tasks: dict[str, str]
    """Each model's task (``unknown`` for a model no longer registered)."""

    def __len__(self) -> int:
        return len(self.tenant)


class PeriodFigures(BaseModel):
    """One group's figures in one period (also what the API returns for it)."""

    period: str
    active: int
    adopted: int | float
    """Organisations or tenants (a share, 0 to 1, for an imported share series)."""
    new_adopters: int | float
    requests: int
    tokens: int
    models: int
    depth: float | None
    """Requests per active adopter (None when none was active)."""
    penetration: float | None
    tasks: dict[str, float]


@dataclass
class GroupAdoption:
    group: str
    potential: float | None
    potential_source: str | None
    periods: list[PeriodFigures]
    retention: float | None
    """Share of adopters active again ``retention_after`` periods after adopting."""
    retention_cohort: int
    """Adopters old enough to count in ``retention``."""
    adopters: list[str] = field(default_factory=list)


def period_label(period: int, unit: str) -> str:
    """The name of period number ``period``: weeks since 1970-01-05, months since year 0, or
    (for imported series) a year."""
    if unit == "year":
        return f"{period:04d}"
    if unit == "week":
        year, week, _ = (MONDAY + timedelta(weeks=period)).isocalendar()
        return f"{year}-W{week:02d}"
    return f"{period // 12:04d}-{period % 12 + 1:02d}"


def period_number(day: date, unit: str) -> int:
    """The number of the week or month ``day`` falls in (``period_label`` names it)."""
    if unit == "week":
        return (day - MONDAY).days // 7
    return day.year * 12 + day.month - 1


def _period_column(engine: Engine, unit: str) -> ColumnElement:
    """The record's period as an integer, in SQL (portable: ``day`` is YYYY-MM-DD text)."""
    if unit == "month":
        year = cast(func.substr(UsageRecord.day, 1, 4), Integer)
        return year * 12 + cast(func.substr(UsageRecord.day, 6, 2), Integer) - 1
    if engine.dialect.name == "sqlite":
        days = func.julianday(UsageRecord.day) - func.julianday(literal(MONDAY.isoformat()))
        return cast(days / 7, Integer)
    days = cast(UsageRecord.day, Date) - cast(literal(MONDAY.isoformat()), Date)
    return cast(days, Integer) // 7  # PostgreSQL: a date minus a date is whole days


def activity(
    engine: Engine,
    unit: str,
    *,
    since: date | None = None,
    until: date | None = None,
    tenants: set[str] | None = None,
) -> Activity:
    """Successful inference requests and tokens per tenant, model and period (one query)."""
    if unit not in PERIODS:
        raise InvalidRequest(f"period is one of {', '.join(PERIODS)}", param="period")
    period = _period_column(engine, unit).label("period")
    query = select(
        UsageRecord.tenant,
        func.max(UsageRecord.industry),
        UsageRecord.model,
        period,
        func.count(),
        func.coalesce(func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens), 0),
    ).group_by(UsageRecord.tenant, UsageRecord.model, period)
    query = counted(query, since, until, tenants)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
        tasks = dict(connection.execute(select(Model.name, Model.task)).all())
    columns = list(zip(*rows, strict=True)) if rows else [()] * 6
    return Activity(
        tenant=list(columns[0]),
        industry=[industry or "other" for industry in columns[1]],
        model=list(columns[2]),
        period=np.array(columns[3], dtype=np.int64),
        requests=np.array(columns[4], dtype=np.int64),
        tokens=np.array(columns[5], dtype=np.int64),
        tasks={m: tasks.get(m, "unknown") for m in set(columns[2])},
    )


def counted(query: Select, since: date | None, until: date | None, tenants: set[str] | None):
    """``query`` over the records that count: successful inference requests of a tenant,
    within the days and tenants given."""
    query = query.where(
        UsageRecord.model.is_not(None), UsageRecord.status < 400, UsageRecord.tenant.is_not(None)
    )
    if since is not None:
        query = query.where(UsageRecord.day >= since.isoformat())
    if until is not None:
        query = query.where(UsageRecord.day <= until.isoformat())
    if tenants is not None:
        query = query.where(UsageRecord.tenant.in_(sorted(tenants)))
    return query


def organisations(engine: Engine) -> dict[str, str]:
    """Each tenant's organisation: its parent's name, or its own for an organisation."""
    with engine.connect() as connection:
        rows = connection.execute(select(Tenant.id, Tenant.name, Tenant.parent_id)).all()
    names = {tenant_id: name for tenant_id, name, _ in rows}
    return {name: names.get(parent, name) for _, name, parent in rows}


def potentials(engine: Engine) -> dict[str, tuple[float, str]]:
    """The operator's market potential of each industry, with its source."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(MarketPotential.industry, MarketPotential.potential, MarketPotential.source)
        ).all()
    return {industry: (float(potential), source) for industry, potential, source in rows}


def measure(
    rows: Activity,
    group_by: str,
    unit: str,
    *,
    min_requests: int = 1,
    retention_after: int = 1,
    organisation_of: dict[str, str] | None = None,
    market: dict[str, tuple[float, str]] | None = None,
) -> list[GroupAdoption]:
    """The adoption figures of each group, period by period."""
    if unit not in PERIODS:
        raise InvalidRequest(f"period is one of {', '.join(PERIODS)}", param="period")
    if group_by not in GROUPS:
        raise InvalidRequest(f"group_by is one of {', '.join(GROUPS)}", param="group_by")
    if min_requests < 1 or retention_after < 1:
        raise InvalidRequest("min_requests and retention_after are at least 1")
    if not len(rows):
        return []
    groups, adopters = _keys(rows, group_by, organisation_of or {})
    group_names, group_of_row = np.unique(groups, return_inverse=True)
    adopter_names, adopter_of_row = np.unique(adopters, return_inverse=True)
    first = int(rows.period.min())
    period = rows.period - first
    shape = (len(adopter_names), int(period.max()) + 1)
    requests = np.zeros(shape, dtype=np.int64)
    np.add.at(requests, (adopter_of_row, period), rows.requests)
    active = requests >= min_requests
    ever = active.any(axis=1)
    adopted_at = np.where(ever, active.argmax(axis=1), -1)
    group_of_adopter = np.zeros(len(adopter_names), dtype=np.int64)
    group_of_adopter[adopter_of_row] = group_of_row
    figures = _Figures(rows, group_of_row, period, len(group_names), shape[1])
    market = market or {}
    industries = sorted(set(rows.industry))
    return [
        _group(
            str(name),
            figures,
            index,
            group_of_adopter == index,
            requests,
            active,
            adopted_at,
            adopter_names,
            [period_label(first + p, unit) for p in range(shape[1])],
            retention_after,
            _potential(group_by, str(name), market, industries),
        )
        for index, name in enumerate(group_names)
    ]


def _keys(rows: Activity, group_by: str, organisation_of: dict[str, str]):
    """Each row's group, and who adopts in it (see the module's definitions)."""
    organisation = [organisation_of.get(t, t) for t in rows.tenant]
    if group_by == "platform":
        return ["platform"] * len(rows), organisation
    if group_by == "industry":
        return rows.industry, organisation
    if group_by == "model":
        return rows.model, [f"{o}\x00{m}" for o, m in zip(organisation, rows.model, strict=True)]
    if group_by == "organisation":
        return organisation, rows.tenant
    return rows.tenant, rows.tenant


def _potential(group_by: str, name: str, market, industries: list[str]):
    """An industry's potential; the platform's is their sum when every industry has one."""
    if group_by == "industry" and name in market:
        return market[name]
    if group_by == "platform" and industries and all(i in market for i in industries):
        return sum(market[i][0] for i in industries), "the sum of the industries' potentials"
    return None, None


class _Figures:
    """Requests, tokens, distinct models and task counts by group and period."""

    def __init__(self, rows: Activity, group: np.ndarray, period: np.ndarray, groups, periods):
        self.requests = np.zeros((groups, periods), dtype=np.int64)
        self.tokens = np.zeros((groups, periods), dtype=np.int64)
        np.add.at(self.requests, (group, period), rows.requests)
        np.add.at(self.tokens, (group, period), rows.tokens)
        models, model = np.unique(rows.model, return_inverse=True)
        cell = group * periods + period  # distinct (cell, model) pairs, counted per cell
        pairs = np.unique(cell * len(models) + model) // len(models)
        self.models = np.bincount(pairs, minlength=groups * periods).reshape(groups, periods)
        self.task_names, task_of_model = np.unique(
            [rows.tasks[m] for m in models], return_inverse=True
        )
        self.tasks = np.zeros((groups, periods, len(self.task_names)), dtype=np.int64)
        np.add.at(self.tasks, (group, period, task_of_model[model]), rows.requests)


def _group(
    name, figures, index, members, requests, active, adopted_at, names, labels, after, potential
) -> GroupAdoption:
    size, source = potential
    periods = len(labels)
    mine_active = active[members]
    mine_adopted_at = adopted_at[members]
    new = np.bincount(mine_adopted_at[mine_adopted_at >= 0], minlength=periods)
    adopted = np.cumsum(new)
    active_count = mine_active.sum(axis=0)
    active_requests = (requests[members] * mine_active).sum(axis=0)
    period_figures = []
    for p in range(periods):
        total = int(figures.requests[index, p])
        task_counts = figures.tasks[index, p]
        period_figures.append(
            PeriodFigures(
                period=labels[p],
                active=int(active_count[p]),
                adopted=int(adopted[p]),
                new_adopters=int(new[p]),
                requests=total,
                tokens=int(figures.tokens[index, p]),
                models=int(figures.models[index, p]),
                depth=float(active_requests[p] / active_count[p]) if active_count[p] else None,
                penetration=float(adopted[p] / size) if size else None,
                tasks={
                    str(task): float(n / total)
                    for task, n in zip(figures.task_names, task_counts, strict=True)
                    if n
                },
            )
        )
    cohort = np.flatnonzero((mine_adopted_at >= 0) & (mine_adopted_at + after < periods))
    kept = mine_active[cohort, mine_adopted_at[cohort] + after].sum() if cohort.size else 0
    return GroupAdoption(
        group=name,
        potential=size,
        potential_source=source,
        periods=period_figures,
        retention=float(kept / cohort.size) if cohort.size else None,
        retention_cohort=int(cohort.size),
        adopters=sorted({str(n).split("\x00")[0] for n in names[members & (adopted_at >= 0)]}),
    )
