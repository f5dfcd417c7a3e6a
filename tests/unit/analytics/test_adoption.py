"""Adoption measures (maas/analytics/adoption.py) on a hand-built usage history whose answers
are known, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from sqlalchemy import insert

from maas.analytics import adoption
from maas.auth.store import TenantStore
from maas.db.tables import MarketPotential, Model, UsageRecord


@pytest.fixture
def engine(database):
    _history(database)
    return database


# (day, tenant, model, successful requests, failed requests); tokens are 10 a request
HISTORY = [
    ("2026-01-05", "acme", "chat", 3, 0),  # acme adopts in January (min_requests 2)
    ("2026-01-20", "acme-sales", "chat", 1, 5),  # 1 success: not active in January
    ("2026-02-02", "acme-sales", "embed", 2, 0),  # adopts in February
    ("2026-02-10", "globex", "chat", 4, 0),  # adopts in February
    ("2026-02-11", "acme", "chat", 1, 0),  # acme not active in February
    ("2026-04-01", "acme", "embed", 2, 0),  # active again in April (nothing in March)
    ("2026-04-02", "globex", "chat", 2, 0),
]
INDUSTRY = {"acme": "retail", "acme-sales": "retail", "globex": "finance"}


def _history(engine):
    tenants = TenantStore(engine)
    tenants.create("acme", "retail")
    tenants.create("acme-sales", None, parent="acme")
    tenants.create("globex", "finance")
    rows = []
    for day, tenant, model, ok, failed in HISTORY:
        for status in [200] * ok + [500] * failed:
            rows.append(
                {
                    "at": datetime.fromisoformat(day).replace(tzinfo=UTC),
                    "day": day,
                    "key_id": "k",
                    "tenant": tenant,
                    "industry": INDUSTRY[tenant],
                    "model": model,
                    "version": 1,
                    "endpoint": "POST /v1/x",
                    "prompt_tokens": 6,
                    "completion_tokens": 4,
                    "items": 0,
                    "latency_ms": 1.0,
                    "status": status,
                }
            )
    rows.append({**rows[0], "model": None, "endpoint": "GET /api/v1/models"})  # not inference
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(insert(UsageRecord), rows)
        connection.execute(
            insert(Model),
            [
                {"name": "chat", "task": "chat", "created_at": now, "updated_at": now},
                {"name": "embed", "task": "embeddings", "created_at": now, "updated_at": now},
            ],
        )
        connection.execute(
            insert(MarketPotential),
            [{"industry": "retail", "potential": 10, "source": "survey", "updated_at": now}],
        )


def _measure(engine, group_by, unit="month", **options):
    rows = adoption.activity(engine, unit)
    return {
        g.group: g
        for g in adoption.measure(
            rows,
            group_by,
            unit,
            organisation_of=adoption.organisations(engine),
            market=adoption.potentials(engine),
            **options,
        )
    }


def test_platform_adoption_month_by_month(engine):
    """Organisations adopt: acme-sales's requests count for acme."""
    platform = _measure(engine, "platform", min_requests=2)["platform"]
    months = [p.period for p in platform.periods]
    assert months == ["2026-01", "2026-02", "2026-03", "2026-04"]  # March is empty, kept
    assert [p.active for p in platform.periods] == [1, 2, 0, 2]
    assert [p.new_adopters for p in platform.periods] == [1, 1, 0, 0]
    assert [p.adopted for p in platform.periods] == [1, 2, 2, 2]
    assert [p.requests for p in platform.periods] == [4, 7, 0, 4]  # failures never count
    assert [p.tokens for p in platform.periods] == [40, 70, 0, 40]
    assert [p.models for p in platform.periods] == [1, 2, 0, 2]
    assert platform.periods[1].depth == pytest.approx((3 + 4) / 2)
    assert platform.periods[2].depth is None
    assert platform.periods[1].tasks == {"chat": pytest.approx(5 / 7), "embeddings": 2 / 7}
    assert platform.potential is None  # finance has no potential, so the platform has none
    assert platform.periods[0].penetration is None
    # retention after 1 month: acme (January -> February: yes), globex (February -> March: no)
    assert (platform.retention, platform.retention_cohort) == (0.5, 2)
    assert platform.adopters == ["acme", "globex"]


def test_min_requests_decides_who_is_active(engine):
    platform = _measure(engine, "platform", min_requests=4)["platform"]
    assert [p.active for p in platform.periods] == [1, 1, 0, 0]  # acme's 3 in February: not
    assert [p.new_adopters for p in platform.periods] == [1, 1, 0, 0]
    nobody = _measure(engine, "platform", min_requests=5)["platform"]
    assert [p.adopted for p in nobody.periods] == [0, 0, 0, 0]
    assert nobody.retention is None and nobody.periods[1].requests == 7


def test_industries_departments_and_models(engine):
    industries = _measure(engine, "industry", min_requests=2)
    assert set(industries) == {"retail", "finance"}
    assert [p.adopted for p in industries["retail"].periods] == [1, 1, 1, 1]
    assert industries["retail"].periods[-1].penetration == pytest.approx(0.1)
    assert industries["retail"].potential_source == "survey"
    assert industries["finance"].potential is None
    assert industries["finance"].periods[-1].penetration is None
    organisations = _measure(engine, "organisation", min_requests=2)
    assert set(organisations) == {"acme", "globex"}  # acme-sales counts within acme
    assert organisations["acme"].adopters == ["acme", "acme-sales"]  # each tenant adopts
    assert [p.adopted for p in organisations["acme"].periods] == [1, 2, 2, 2]
    tenants = _measure(engine, "tenant", min_requests=2)
    assert set(tenants) == {"acme", "acme-sales", "globex"}
    assert [p.active for p in tenants["acme"].periods] == [1, 0, 0, 1]
    models = _measure(engine, "model", min_requests=2)
    assert [p.adopted for p in models["embed"].periods] == [0, 1, 1, 1]
    assert [p.active for p in models["embed"].periods] == [0, 1, 0, 1]
    assert [p.adopted for p in models["chat"].periods] == [1, 2, 2, 2]


def test_retention_counts_cohorts_old_enough(engine):
    platform = _measure(engine, "platform", min_requests=2, retention_after=2)["platform"]
    # acme: January -> March inactive; globex: February -> April active
    assert platform.retention == pytest.approx(1 / 2) and platform.retention_cohort == 2
    later = _measure(engine, "platform", min_requests=2, retention_after=3)["platform"]
    assert (later.retention, later.retention_cohort) == (1.0, 1)  # only acme is old enough


def test_weeks_are_iso_weeks_from_the_first_request(engine):
    platform = _measure(engine, "platform", unit="week", min_requests=2)["platform"]
    assert platform.periods[0].period == "2026-W02"  # Monday 5 January 2026
    assert platform.periods[-1].period == "2026-W14"  # 1 and 2 April
    assert len(platform.periods) == 13
    assert sum(p.new_adopters for p in platform.periods) == 2


def test_a_window_and_a_tenant_subtree_narrow_the_records(engine):
    rows = adoption.activity(engine, "month", since=date(2026, 2, 1), tenants={"globex"})
    assert set(zip(rows.tenant, rows.period % 12 + 1, rows.requests, strict=True)) == {
        ("globex", 2, 4),
        ("globex", 4, 2),
    }


def _rows(engine):
    return adoption.activity(engine, "month")


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda e: adoption.activity(e, "day"), "period is one of week, month"),
        (lambda e: adoption.measure(_rows(e), "industry", "year"), "period is one of"),
        (lambda e: adoption.measure(_rows(e), "country", "month"), "group_by is one of"),
        (lambda e: adoption.measure(_rows(e), "industry", "month", min_requests=0), "least 1"),
    ],
)
def test_bad_options_are_refused(engine, call, says):
    from maas.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=says):
        call(engine)


def test_a_window_hides_periods_but_early_adopters_stay_early(engine):
    from maas.analytics import report

    result = report.adoption_report(
        engine, None, group_by="platform", min_requests=2, since=date(2026, 2, 1)
    )
    periods = result.data[0].periods
    assert [p.period for p in periods] == ["2026-02", "2026-03", "2026-04"]
    assert [p.new_adopters for p in periods] == [1, 0, 0]  # acme adopted in January
    assert [p.adopted for p in periods] == [2, 2, 2]


def test_a_maintainer_forecasts_its_own_organisation(engine):
    """acme's maintainer sees acme and acme-sales: its forecast is of those two tenants
    adopting, which two periods cannot fit; another industry is not found."""
    from maas.analytics import report
    from maas.auth.principal import Limits, Principal, Role
    from maas.errors import InvalidRequest, NotFound

    tenant_id = TenantStore(engine).get_id("acme")
    viewer = Principal("k", "k", tenant_id, "acme", "retail", Role.maintainer, None, None, Limits())
    with pytest.raises(InvalidRequest, match="cannot forecast acme: bass: .*the series has 4"):
        report.forecast_report(engine, viewer, "platform", min_requests=2)
    with pytest.raises(NotFound):
        report.forecast_report(engine, viewer, "finance")


def test_departments_belong_to_an_organisation_in_its_industry(engine):
    from maas.errors import InvalidRequest, NotFound

    tenants = TenantStore(engine)
    department = tenants.create("acme-legal", None, parent="acme")
    assert department.industry == "retail"  # its organisation's
    assert department.parent == "acme"
    with pytest.raises(InvalidRequest, match="'acme-sales' is a department") as nested:
        tenants.create("acme-sales-east", None, parent="acme-sales")
    assert nested.value.param == "parent"
    with pytest.raises(InvalidRequest, match=r"organisation's industry \(retail\)") as other:
        tenants.create("acme-bank", "finance", parent="acme")
    assert other.value.param == "industry"
    with pytest.raises(NotFound, match="'initech' not found"):
        tenants.create("initech-it", None, parent="initech")
    with pytest.raises(InvalidRequest, match="an organisation needs an industry"):
        tenants.create("initech", None)
    assert {t.name for t in tenants.list(None)} == {"acme", "acme-sales", "acme-legal", "globex"}
