"""A year of synthetic usage across industries, for trying the analytics on a fresh home
(``maas demo --usage``) and for the benchmark.

Each industry has a market of organisations that adopt the platform week by week as the
Bass model says (its own p, q and market size, drawn once from a seeded generator, with
each week's new adopters a binomial draw of those still waiting). An adopter is active in
a week with probability ``ACTIVE``; an active organisation sends a Poisson number of
requests spread over the week's days, to chat (the demo SmolLM2), embeddings (the demo
MiniLM) or an image classifier. A few organisations have departments that adopt later.
Finance gets a campaign in week 30 that doubles imitation for a while (a shock for the
generalized Bass model). The market potential of three industries is set to their market
size, as an operator who surveyed them would (``maas analytics potential``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
from sqlalchemy import Engine, insert, select

from maas.analytics import potentials
from maas.auth.principal import INDUSTRIES
from maas.auth.store import TenantStore
from maas.db.tables import Tenant, UsageRecord

WEEKS = 52
ACTIVE = 0.85
MODELS = (
    ("smollm2-135m-instruct", "POST /v1/chat/completions", 0.6),
    ("all-minilm-l6-v2", "POST /v1/embeddings", 0.3),
    ("digits-cnn", "POST /v2/models/{model_name}/infer", 0.1),
)
CAMPAIGN = ("finance", 30)
"""(industry, week): imitation doubles from that week, fading over about ten weeks."""
SURVEYED = ("retail", "healthcare", "education")
"""Industries whose market potential the demo sets, as an operator who surveyed them would
(their simulated market size)."""


@dataclass(frozen=True)
class Market:
    industry: str
    p: float
    q: float
    m: int
    requests_per_week: float


def markets(count: int, seed: int = 0) -> list[Market]:
    rng = np.random.default_rng(seed)
    return [
        Market(
            industry=INDUSTRIES[i % len(INDUSTRIES)],
            p=float(rng.uniform(0.001, 0.006)),
            q=float(rng.uniform(0.05, 0.14)),
            m=int(rng.integers(30, 200)),
            requests_per_week=float(rng.uniform(2, 12)),
        )
        for i in range(count)
    ]


def adoption_weeks(market: Market, rng: np.random.Generator) -> list[int]:
    """The week each of the market's organisations adopts (-1: not within the year)."""
    weeks = np.full(market.m, -1)
    waiting = list(range(market.m))
    adopted = 0
    for week in range(WEEKS):
        q = market.q
        if (market.industry, week) >= CAMPAIGN and market.industry == CAMPAIGN[0]:
            q *= 1 + np.exp(-(week - CAMPAIGN[1]) / 10)
        hazard = min(1.0, market.p + q * adopted / market.m)
        joining = rng.binomial(len(waiting), hazard)
        for organisation in waiting[:joining]:
            weeks[organisation] = week
        waiting = waiting[joining:]
        adopted += joining
    return weeks.tolist()


def filled(engine: Engine) -> bool:
    """Whether the demo's tenants are there already (filling twice would double them)."""
    with engine.connect() as connection:
        first = f"{INDUSTRIES[0]}-000"
        return connection.scalar(select(Tenant.id).where(Tenant.name == first)) is not None


def fill(
    engine: Engine,
    *,
    start: date = date(2025, 12, 1),
    industries: int = len(INDUSTRIES),
    scale: float = 1.0,
    seed: int = 0,
    on_industry: Callable[[], None] | None = None,
) -> int:
    """Tenants and a year of usage records from ``start``; returns the records written.
    ``scale`` multiplies the requests (the benchmark's million records)."""
    rng = np.random.default_rng(seed)
    tenants = TenantStore(engine)
    monday = start - timedelta(days=start.weekday())
    written = 0
    for market in markets(industries, seed):
        weeks = adoption_weeks(market, rng)
        names = _organisations(engine, tenants, market, weeks, rng)
        batch = []
        for name, first in names:
            for week in range(first, WEEKS):
                if rng.random() > ACTIVE:
                    continue
                count = rng.poisson(market.requests_per_week * scale)
                batch += _requests(name, market.industry, monday, week, count, rng)
            if len(batch) > 20_000:
                written += _write(engine, batch)
                batch = []
        written += _write(engine, batch)
        if market.industry in SURVEYED:
            potentials.set_potential(engine, market.industry, market.m, "demo: a survey")
        if on_industry is not None:
            on_industry()
    return written


def _organisations(engine, tenants, market, weeks, rng) -> list[tuple[str, int]]:
    """(tenant, first week) of every adopter; every third organisation has a department
    that adopts a few weeks after it."""
    with engine.connect() as connection:
        existing = set(connection.scalars(select(Tenant.name)))
    adopters = []
    for index, week in enumerate(weeks):
        name = f"{market.industry}-{index:03d}"
        if name not in existing:
            tenants.create(name, market.industry, "demo organisation")
        if week < 0:
            continue
        adopters.append((name, week))
        department_week = week + int(rng.integers(2, 10))
        if index % 3 == 0 and department_week < WEEKS:
            department = f"{name}-analytics"
            if department not in existing:
                tenants.create(department, None, "demo department", parent=name)
            adopters.append((department, department_week))
    return adopters


def _requests(tenant, industry, monday, week, count, rng) -> list[dict]:
    models = rng.choice(len(MODELS), size=count, p=[share for *_, share in MODELS])
    days = rng.integers(0, 7, size=count)
    rows = []
    for model_index, day in zip(models, days, strict=True):
        model, endpoint, _ = MODELS[model_index]
        at = datetime.combine(monday + timedelta(weeks=week, days=int(day)), datetime.min.time())
        chat = model_index == 0
        rows.append(
            {
                "at": at.replace(tzinfo=UTC, hour=int(rng.integers(7, 20))),
                "day": at.date().isoformat(),
                "key_id": None,
                "tenant": tenant,
                "industry": industry,
                "model": model,
                "version": 1,
                "endpoint": endpoint,
                "prompt_tokens": int(rng.integers(20, 400)) if model_index < 2 else 0,
                "completion_tokens": int(rng.integers(10, 200)) if chat else 0,
                "items": 0 if chat else 1,
                "latency_ms": float(rng.uniform(20, 900)),
                "status": 200 if rng.random() > 0.02 else 500,
            }
        )
    return rows


def _write(engine: Engine, rows: list[dict]) -> int:
    if rows:
        with engine.begin() as connection:
            connection.execute(insert(UsageRecord), rows)
    return len(rows)
