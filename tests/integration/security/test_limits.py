"""Per-key limits: exact under concurrency, OpenAI's headers, budgets that survive a restart."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient

from maas.api.app import build_app
from maas.api.deps import CurrentKey, InferenceKey
from maas.api.governance import meter
from maas.auth.principal import Limits, Role
from maas.auth.store import KeySpec
from tests.fixtures import make_gguf
from tests.integration.conftest import bearer

# Routes that exist only in these tests: one slow, one that spends tokens.
probe = APIRouter(prefix="/v1/probe")


@probe.get("/slow")
async def slow(key: CurrentKey) -> dict:
    await asyncio.sleep(0.5)
    return {}


@probe.get("/tokens")
def tokens(key: InferenceKey, request: Request, n: int = 10) -> dict:
    meter(request, prompt_tokens=n // 2, completion_tokens=n - n // 2)
    return {}


@probe.get("/priced")
def priced_tokens(key: InferenceKey, request: Request, n: int = 10) -> dict:
    """Tokens of the model "priced", as a chat completion would meter them."""
    model = request.app.state.registry.resolve("priced")
    meter(request, model=model, prompt_tokens=n // 2, completion_tokens=n - n // 2)
    return {}


def app_with_probe(settings):
    app = build_app(settings)
    app.include_router(probe)
    return app


@pytest.fixture
def probe_client(settings):
    with TestClient(app_with_probe(settings)) as client:
        yield client


def key_with(client, **limits) -> str:
    spec = KeySpec(name="limited", role=Role.user, limits=Limits(**limits))
    return client.app.state.keys.create(spec, None)[1]


def fire(client, key: str, path: str, count: int) -> list[httpx.Response]:
    """``count`` requests at once, on the event loop, through the ASGI app."""

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers=bearer(key), timeout=60
        ) as http:
            return await asyncio.gather(*(http.get(path) for _ in range(count)))

    return asyncio.run(run())


@pytest.mark.parametrize("limit", [1, 7, 50])
def test_requests_per_minute_is_exact_under_200_concurrent_requests(probe_client, limit):
    key = key_with(probe_client, requests_per_minute=limit)
    responses = fire(probe_client, key, "/v1/models", 200)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == limit
    assert statuses.count(429) == 200 - limit


def test_concurrency_is_exact_under_200_concurrent_requests(probe_client):
    key = key_with(probe_client, max_concurrent=5)
    statuses = [r.status_code for r in fire(probe_client, key, "/v1/probe/slow", 200)]
    assert statuses.count(200) == 5 and statuses.count(429) == 195
    # every slot was given back
    assert [r.status_code for r in fire(probe_client, key, "/v1/probe/slow", 5)] == [200] * 5


def test_429_carries_retry_after_and_openai_ratelimit_headers(probe_client):
    key = key_with(probe_client, requests_per_minute=2, tokens_per_minute=1000)
    first = probe_client.get("/v1/models", headers=bearer(key))
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-tokens"] == "1000"
    probe_client.get("/v1/models", headers=bearer(key))
    refused = probe_client.get("/v1/models", headers=bearer(key))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "1000"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


def test_tokens_per_minute(probe_client):
    key = key_with(probe_client, tokens_per_minute=25)
    for _ in range(3):  # 10 tokens each: 30 > 25 after the third
        assert probe_client.get("/v1/probe/tokens?n=10", headers=bearer(key)).status_code == 200
    refused = probe_client.get("/v1/probe/tokens?n=10", headers=bearer(key))
    assert refused.status_code == 429 and "tokens per minute" in refused.text
    # requests that spend no tokens are not held back by the token limit
    assert probe_client.get("/v1/models", headers=bearer(key)).status_code == 200


def test_an_exhausted_budget_is_insufficient_quota(probe_client):
    key = key_with(probe_client, monthly_token_budget=30)
    for _ in range(3):
        assert probe_client.get("/v1/probe/tokens?n=10", headers=bearer(key)).status_code == 200
    refused = probe_client.get("/v1/probe/tokens?n=10", headers=bearer(key))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert "renews on" in error["message"]
    assert int(refused.headers["retry-after"]) > 0


def test_budget_survives_a_restart(settings):
    with TestClient(app_with_probe(settings)) as client:
        key = key_with(client, monthly_token_budget=25)
        for _ in range(2):
            assert client.get("/v1/probe/tokens?n=10", headers=bearer(key)).status_code == 200
    with TestClient(app_with_probe(settings)) as client:  # a new process would do the same
        assert client.get("/v1/probe/tokens?n=10", headers=bearer(key)).status_code == 200
        refused = client.get("/v1/probe/tokens?n=10", headers=bearer(key))
        assert (
            refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        )


def test_limits_are_per_key(probe_client):
    a = key_with(probe_client, requests_per_minute=1)
    b = key_with(probe_client, requests_per_minute=1)
    assert probe_client.get("/v1/models", headers=bearer(a)).status_code == 200
    assert probe_client.get("/v1/models", headers=bearer(a)).status_code == 429
    assert probe_client.get("/v1/models", headers=bearer(b)).status_code == 200


mixed = APIRouter(prefix="/v1/mixed")


@mixed.get("/both")
def both(first: CurrentKey, second: InferenceKey) -> dict:
    return {}


def test_a_route_with_two_key_dependencies_takes_one_concurrency_slot(settings):
    app = build_app(settings)
    app.include_router(mixed)
    with TestClient(app) as client:
        key = key_with(client, max_concurrent=1)
        for _ in range(4):  # each request gives its one slot back
            assert client.get("/v1/mixed/both", headers=bearer(key)).status_code == 200


def test_minted_keys_share_their_creators_budget(probe_client):
    from maas.auth.principal import Limits, Role

    maintainer = probe_client.app.state.keys.create(
        KeySpec(name="m", role=Role.maintainer, limits=Limits(monthly_token_budget=30)), None
    )[1]
    minted = []
    for _ in range(3):  # three keys each allowed 30 tokens, but 30 in all
        response = probe_client.post(
            "/api/v1/keys",
            json={"name": "child", "role": "user", "monthly_token_budget": 30},
            headers=bearer(maintainer),
        )
        minted.append(response.json()["key"])
    for key in minted:
        assert probe_client.get("/v1/probe/tokens?n=10", headers=bearer(key)).status_code == 200
    refused = probe_client.get("/v1/probe/tokens?n=10", headers=bearer(minted[0]))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert "monthly budget" in refused.json()["error"]["message"]


def test_revoking_a_key_revokes_the_keys_it_made(probe_client):
    from maas.auth.principal import Role

    parent = probe_client.app.state.keys.create(KeySpec(name="p", role=Role.maintainer), None)[1]
    child = probe_client.post(
        "/api/v1/keys", json={"name": "c", "role": "user"}, headers=bearer(parent)
    ).json()["key"]
    admin = probe_client.app.state.keys.create(KeySpec(name="a", role=Role.admin), None)[1]
    assert probe_client.get("/v1/models", headers=bearer(child)).status_code == 200  # cached
    assert (
        probe_client.delete(f"/api/v1/keys/{parent[5:17]}", headers=bearer(admin)).status_code
        == 200
    )
    assert probe_client.get("/v1/models", headers=bearer(child)).status_code == 401


@pytest.fixture
def priced(probe_client, tmp_path):
    """A model "priced" at 1 per 1K prompt tokens, 2 per 1K completion tokens and 0.01 a
    request: the probe's 10 tokens (5 + 5) cost 0.025."""
    probe_client.app.state.registry.import_model(make_gguf(tmp_path / "m.gguf"), "priced")
    admin = probe_client.app.state.keys.create(KeySpec(name="a", role=Role.admin), None)[1]
    price = {"currency": "EUR", "prompt_per_1k": 1, "completion_per_1k": 2, "per_request": 0.01}
    set_price = probe_client.put(
        "/api/v1/analytics/prices/priced", json=price, headers=bearer(admin)
    )
    assert set_price.status_code == 200, set_price.text
    return probe_client


def test_a_budget_in_currency_is_spent_at_the_price_table(priced):
    key = key_with(priced, monthly_cost_budget=0.06)
    for _ in range(3):  # 0, 0.025, 0.05 spent before each: under 0.06
        assert priced.get("/v1/probe/priced", headers=bearer(key)).status_code == 200
    refused = priced.get("/v1/probe/priced", headers=bearer(key))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert "monthly budget of 0.06 EUR is spent" in error["message"]
    # an unpriced route's tokens cost nothing, whatever their number
    other = key_with(priced, monthly_cost_budget=0.01)
    for _ in range(3):
        assert priced.get("/v1/probe/tokens?n=1000", headers=bearer(other)).status_code == 200


def test_a_budget_in_currency_survives_a_restart(settings, tmp_path):
    with TestClient(app_with_probe(settings)) as client:
        client.app.state.registry.import_model(make_gguf(tmp_path / "m.gguf"), "priced")
        from maas.analytics import costs

        # as `maas prices set` would, beside the server, which reads it within 10 s
        costs.set_price(client.app.state.registry.engine, "priced", per_request=1.0)
        client.app.state.prices.load()
        key = key_with(client, monthly_cost_budget=2.5)
        for _ in range(2):
            assert client.get("/v1/probe/priced", headers=bearer(key)).status_code == 200
        # a price raised later does not change what the month's requests cost
        costs.set_price(client.app.state.registry.engine, "priced", per_request=100.0)
    with TestClient(app_with_probe(settings)) as client:  # 2.0 of 2.5 spent, from the records
        assert client.get("/v1/probe/priced", headers=bearer(key)).status_code == 200
        refused = client.get("/v1/probe/priced", headers=bearer(key))
        assert refused.status_code == 429 and "2.50 USD" in refused.json()["error"]["message"]


def test_a_key_cannot_mint_a_key_without_its_budget_in_currency(priced):
    maintainer = priced.app.state.keys.create(
        KeySpec(name="m", role=Role.maintainer, limits=Limits(monthly_cost_budget=1.0)), None
    )[1]
    for body in ({}, {"monthly_cost_budget": 2.0}):
        refused = priced.post(
            "/api/v1/keys", json={"name": "c", "role": "user", **body}, headers=bearer(maintainer)
        )
        assert refused.status_code == 403
        assert "monthly_cost_budget must be set and at most 1.0" in refused.text
    made = priced.post(
        "/api/v1/keys",
        json={"name": "c", "role": "user", "monthly_cost_budget": 0.5},
        headers=bearer(maintainer),
    )
    assert made.status_code == 201 and made.json()["monthly_cost_budget"] == 0.5
