"""Costs (maas/analytics/costs.py): the arithmetic of a price table over hand-built usage,
version prices over model prices, savings from a cheaper child version, cost per UTC day (on
SQLite and PostgreSQL), and refusals."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import insert

from maas.analytics import costs
from maas.auth.store import TenantStore
from maas.db import make_engine, upgrade
from maas.db.tables import Model, UsageRecord
from maas.errors import InvalidRequest, NotFound
from maas.messages import UsageEvent

# (tenant, model, version, prompt tokens, completion tokens, items, status)
RECORDS = [
    ("acme", "chat", 1, 1000, 500, 0, 200),
    ("acme", "chat", 2, 2000, 1000, 0, 200),  # the int8 child of chat:1
    ("acme-sales", "chat", 2, 1000, 0, 0, 200),
    ("acme", "chat", 1, 9000, 9000, 0, 500),  # failed: never charged
    ("globex", "vision", 1, 0, 0, 3, 200),
    ("globex", "free", 1, 10, 10, 0, 200),  # no price
]
PARENTS = {("chat", 1): None, ("chat", 2): ("chat", 1), ("vision", 1): None}


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'costs.db'}")
    upgrade(engine)
    tenants = TenantStore(engine)
    tenants.create("acme", "retail")
    tenants.create("acme-sales", None, parent="acme")
    tenants.create("globex", "finance")
    now = datetime.now(UTC)
    industry = {"acme": "retail", "acme-sales": "retail", "globex": "finance"}
    with engine.begin() as connection:
        connection.execute(
            insert(Model),
            [
                {"name": n, "task": "chat", "created_at": now, "updated_at": now}
                for n in ("chat", "vision", "free")
            ],
        )
        connection.execute(
            insert(UsageRecord),
            [
                {
                    "at": now, "day": "2026-11-02", "key_id": "k", "tenant": tenant,
                    "industry": industry[tenant], "model": model, "version": version,
                    "endpoint": "POST /v1/x", "prompt_tokens": prompt,
                    "completion_tokens": completion, "items": items, "latency_ms": 1.0,
                    "status": status,
                }
                for tenant, model, version, prompt, completion, items, status in RECORDS
            ],
        )  # fmt: skip
    costs.set_price(engine, "chat", prompt_per_1k=0.5, completion_per_1k=1.5)
    costs.set_price(engine, "chat", version=2, prompt_per_1k=0.2, completion_per_1k=0.6)
    costs.set_price(engine, "vision", per_request=0.01, per_item=0.002)
    yield engine
    engine.dispose()


def test_cost_per_tenant_with_version_prices_and_savings(engine):
    result = costs.costs(engine, PARENTS, group_by="tenant")
    by = {row.group: row for row in result.data}
    # acme: chat:1 at 0.5/1.5 (0.5 + 0.75) and chat:2 at 0.2/0.6 (0.4 + 0.6)
    assert by["acme"].cost == pytest.approx(1.25 + 1.0)
    # what chat:2's usage would have cost at chat:1's price, minus its cost
    assert by["acme"].saved == pytest.approx((1.0 + 1.5) - 1.0)
    assert by["acme"].requests == 2 and by["acme"].prompt_tokens == 3000  # the 500 is not
    assert by["acme-sales"].cost == pytest.approx(0.2)
    assert by["acme-sales"].saved == pytest.approx(0.5 - 0.2)
    assert by["globex"].cost == pytest.approx(0.01 + 3 * 0.002)  # "free" is unpriced
    assert result.unpriced_requests == 1 and result.currency == "USD"
    assert [row.group for row in result.data] == ["acme", "acme-sales", "globex"]  # by cost


def test_cost_per_organisation_industry_and_model(engine):
    from maas.analytics import adoption

    organisations = costs.costs(
        engine, PARENTS, group_by="organisation", organisation_of=adoption.organisations(engine)
    )
    acme = next(row for row in organisations.data if row.group == "acme")
    assert acme.cost == pytest.approx(2.25 + 0.2) and acme.requests == 3
    industries = {r.group: r.cost for r in costs.costs(engine, PARENTS, group_by="industry").data}
    assert industries == {"retail": pytest.approx(2.45), "finance": pytest.approx(0.016)}
    models = {r.group: r.saved for r in costs.costs(engine, PARENTS, group_by="model").data}
    assert models["chat"] == pytest.approx(1.5 + 0.3) and models["vision"] == 0
    mine = costs.costs(engine, PARENTS, group_by="tenant", tenants={"globex"})
    assert [row.group for row in mine.data] == ["globex"]


# (UTC time, tenant, model, version, prompt tokens, completion tokens, status)
DAILY = [
    (datetime(2026, 11, 1, 23, 59, tzinfo=UTC), "acme", "chat", 1, 1000, 0, 200),
    (datetime(2026, 11, 2, 0, 0, tzinfo=UTC), "acme", "chat", 1, 2000, 1000, 200),
    (datetime(2026, 11, 2, 18, 0, tzinfo=UTC), "globex", "chat", 2, 1000, 1000, 200),
    (datetime(2026, 11, 2, 19, 0, tzinfo=UTC), "globex", "chat", 1, 9000, 9000, 500),
    (datetime(2026, 11, 4, 8, 0, tzinfo=UTC), "acme", "chat", 2, 0, 1000, 200),
]


@pytest.fixture
def daily(database):
    """Chat priced 0.5 / 1.5 (version 2: 0.2 / 0.6) per 1K tokens, used on three UTC days."""
    engine = database
    now = datetime.now(UTC)
    rows = [
        UsageEvent(at, "k", tenant, "retail", model, version, "POST /v1/chat/completions",
                   status, 1.0, prompt, completion).to_row()
        for at, tenant, model, version, prompt, completion, status in DAILY
    ]  # fmt: skip
    with engine.begin() as connection:
        connection.execute(
            insert(Model), [{"name": "chat", "task": "chat", "created_at": now, "updated_at": now}]
        )
        connection.execute(insert(UsageRecord), rows)
    costs.set_price(engine, "chat", prompt_per_1k=0.5, completion_per_1k=1.5)
    costs.set_price(engine, "chat", version=2, prompt_per_1k=0.2, completion_per_1k=0.6)
    return engine


def test_cost_per_day_groups_records_by_utc_day_in_date_order(daily):
    result = costs.costs(daily, PARENTS, group_by="day")
    assert [row.group for row in result.data] == ["2026-11-01", "2026-11-02", "2026-11-04"]
    first, second, fourth = result.data
    assert first.cost == pytest.approx(0.5) and first.requests == 1
    # acme's chat:1 (1.0 + 1.5) and globex's chat:2 (0.2 + 0.6); the failed one is free
    assert second.cost == pytest.approx(2.5 + 0.8) and second.requests == 2
    assert second.saved == pytest.approx((0.5 + 1.5) - 0.8)
    assert second.prompt_tokens == 3000 and second.completion_tokens == 2000
    assert fourth.cost == pytest.approx(0.6) and fourth.saved == pytest.approx(1.5 - 0.6)
    window = costs.costs(daily, PARENTS, group_by="day", since=date(2026, 11, 2), tenants={"acme"})
    assert [(row.group, row.cost) for row in window.data] == [
        ("2026-11-02", pytest.approx(2.5)),
        ("2026-11-04", pytest.approx(0.6)),
    ]


def test_the_registry_lineage_gives_each_version_its_parent(tmp_path):
    from maas.config import Settings
    from maas.registry import open_registry
    from maas.registry.rows import Made
    from tests.fixtures import make_tiny_llama

    registry = open_registry(Settings(home=tmp_path / "home"))
    try:
        folder = make_tiny_llama(tmp_path / "tiny")
        registry.import_model(folder, "tiny")
        registry.import_model(folder, "tiny", made=Made({}, {"steps": []}, ("tiny", 1)))
        assert costs.lineage(registry) == {("tiny", 1): None, ("tiny", 2): ("tiny", 1)}
    finally:
        registry.close()


@pytest.mark.parametrize(
    ("change", "error", "says"),
    [
        ({"model": "nope"}, NotFound, "model 'nope' not found"),
        ({"prompt_per_1k": -1}, InvalidRequest, "prompt_per_1k is a price of at least 0"),
        ({"prompt_per_1k": 0}, InvalidRequest, "at least one price above 0"),
        ({"currency": "usd"}, InvalidRequest, "3-letter code"),
        ({"currency": "EUR"}, InvalidRequest, "prices are in USD"),
        ({"version": 0}, InvalidRequest, "version is a number from 1 up"),
    ],
)
def test_bad_prices_are_refused(engine, change, error, says):
    arguments = {"model": "chat", "prompt_per_1k": 1.0, **change}
    with pytest.raises(error, match=says):
        costs.set_price(engine, arguments.pop("model"), **arguments)


def test_the_only_price_may_change_currency(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'one.db'}")
    upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            insert(Model), [{"name": "chat", "task": "chat", "created_at": now, "updated_at": now}]
        )
    costs.set_price(engine, "chat", prompt_per_1k=1.0)
    assert costs.set_price(engine, "chat", prompt_per_1k=0.9, currency="EUR").currency == "EUR"
    engine.dispose()


def test_the_price_book_prices_from_memory_and_reloads_on_a_thread(engine):
    costs.set_price(engine, "chat", prompt_per_1k=1.0, completion_per_1k=3.0)
    now = [0.0]
    book = costs.PriceBook(engine, ttl=10.0, clock=lambda: now[0])
    book.load()
    assert book.cost("chat", 1, 1000, 1000, 0) == pytest.approx(1.0 + 3.0)
    assert book.cost("free", 1, 10, 10, 0) is None  # unpriced
    assert book.currency() == "USD"
    costs.set_price(engine, "free", per_request=0.5)
    assert book.cost("free", 1, 10, 10, 0) is None  # the table in memory, not yet stale
    now[0] = 11.0
    book.cost("free", 1, 10, 10, 0)  # stale: reloads on a thread
    for _ in range(200):
        if book.cost("free", 1, 10, 10, 0) is not None:
            break
        time.sleep(0.01)
    assert book.cost("free", 1, 10, 10, 0) == pytest.approx(0.5)
