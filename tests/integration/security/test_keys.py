"""API keys: minting, escalation, revocation, expiry, where keys may travel, how they are kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from maas.auth.principal import Limits, Role
from tests.integration.conftest import bearer


def create(client, key, **body):
    return client.post("/api/v1/keys", json={"name": "k", **body}, headers=bearer(key))


def test_a_new_key_is_shown_once_and_works(app_client, make_key):
    admin = make_key(Role.admin)
    response = create(app_client, admin, role="user")
    assert response.status_code == 201
    created = response.json()
    key = created["key"]
    assert key.startswith("maas-") and len(key) >= 5 + 12 + 1 + 43  # 256 random bits
    assert app_client.get("/v1/models", headers=bearer(key)).status_code == 200
    shown = app_client.get(f"/api/v1/keys/{created['key_id']}", headers=bearer(admin)).json()
    assert "key" not in shown and "secret_hash" not in shown
    listed = app_client.get("/api/v1/keys", headers=bearer(admin)).text
    assert key not in listed and key[18:] not in listed


def test_only_a_keyed_hash_is_stored(app_client, make_key):
    key = make_key(Role.user)
    engine = app_client.app.state.registry.engine
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT key_id, secret_hash FROM api_keys")).all()
    stored = " ".join(str(value) for row in rows for value in row)
    assert key not in stored and key[18:] not in stored
    import hashlib

    assert hashlib.sha256(key.encode()).hexdigest() not in stored  # keyed, not a plain hash
    db_bytes = (app_client.app.state.settings.home / "maas.db").read_bytes()
    assert key[18:].encode() not in db_bytes


ESCALATIONS = [
    ({"role": "admin"}, "cannot manage admin keys"),
    ({"role": "user", "tenant": "globex"}, "not found"),
    ({"role": "user", "tenant": "platform"}, "not found"),
]


@pytest.mark.parametrize(("body", "message"), ESCALATIONS)
def test_a_maintainer_cannot_mint_more_than_it_has(world, body, message):
    response = create(world.client, world.keys["maintainer"], **body)
    assert response.status_code in (403, 404), response.text
    assert message in response.json()["error"]["message"]


def test_a_user_cannot_mint_keys(world):
    assert create(world.client, world.keys["user"], role="user").status_code == 403


def test_restrictions_carry_over_to_minted_keys(app_client, make_key, make_tenant):
    make_tenant("acme")
    limited = make_key(
        Role.maintainer,
        tenant="acme",
        allowed_models=["a"],
        limits=Limits(requests_per_minute=10, monthly_token_budget=1000),
        expires_at=datetime.now(UTC) + timedelta(days=1),
    )
    ok = {
        "role": "user",
        "allowed_models": ["a"],
        "requests_per_minute": 5,
        "monthly_token_budget": 100,
        "expires_in_days": 0.5,
    }
    assert create(app_client, limited, **ok).status_code == 201
    refused = [
        ({**ok, "allowed_models": None}, "only use models this key may use"),
        ({**ok, "allowed_models": ["a", "b"]}, "only use models this key may use"),
        ({**ok, "requests_per_minute": None}, "requests_per_minute must be set"),
        ({**ok, "requests_per_minute": 11}, "requests_per_minute must be set and at most 10"),
        ({**ok, "monthly_token_budget": 1001}, "monthly_token_budget"),
        ({**ok, "expires_in_days": None}, "expire no later"),
        ({**ok, "expires_in_days": 2}, "expire no later"),
        ({**ok, "role": "maintainer", "tenant": "platform"}, "not found"),
    ]
    for body, message in refused:
        response = create(app_client, limited, **body)
        assert response.status_code in (403, 404), body
        assert message in response.json()["error"]["message"], body


def test_revoked_keys_are_refused(world):
    user = world.keys["user"]
    assert world.client.get("/v1/models", headers=bearer(user)).status_code == 200
    response = world.client.delete(
        f"/api/v1/keys/{world.key_ids['user']}", headers=world.as_("maintainer")
    )
    assert response.status_code == 200 and response.json()["revoked_at"]
    refused = world.client.get("/v1/models", headers=bearer(user))
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


def test_revocation_from_another_process_lands_within_the_cache_time(world):
    user = world.keys["user"]
    authenticator = world.client.app.state.authenticator
    assert world.client.get("/v1/models", headers=bearer(user)).status_code == 200
    world.client.app.state.keys.revoke(world.key_ids["user"], None)  # as the CLI does
    authenticator._cache_seconds = 0  # the cache time passing
    assert world.client.get("/v1/models", headers=bearer(user)).status_code == 401


def test_a_maintainer_cannot_revoke_an_admin_key(app_client, make_key):
    maintainer = make_key(Role.maintainer)
    admin = make_key(Role.admin)
    response = app_client.delete(f"/api/v1/keys/{admin[5:17]}", headers=bearer(maintainer))
    assert response.status_code == 403
    assert app_client.get("/v1/models", headers=bearer(admin)).status_code == 200


def test_expired_keys_are_refused(app_client, make_key):
    key = make_key(Role.user, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    response = app_client.get("/v1/models", headers=bearer(key))
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer maas-short",
        "Bearer sk-not-ours",
        "Bearer maas-AAAAAAAAAAAA_uppercase-id",
    ],
)
def test_malformed_or_unknown_keys_are_401(app_client, header):
    response = app_client.get("/v1/models", headers={"Authorization": header} if header else {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"


def test_a_right_id_with_a_wrong_secret_is_refused(app_client, make_key):
    key = make_key(Role.admin)
    forged = key[:18] + ("A" if key[18] != "A" else "B") + key[19:]
    assert app_client.get("/v1/models", headers=bearer(forged)).status_code == 401


@pytest.mark.parametrize("query", ["api_key={key}", "key={key}", "token={key}", "x={key}"])
def test_keys_in_the_query_string_are_refused(app_client, make_key, query):
    key = make_key(Role.admin)
    response = app_client.get(f"/v1/models?{query.format(key=key)}", headers=bearer(key))
    assert response.status_code == 401
    assert "in the URL are refused" in response.json()["error"]["message"]


def test_last_used_time_is_recorded(world):
    world.client.get("/v1/models", headers=world.as_("user"))
    world.client.app.state.recorder.flush()
    shown = world.client.get(
        f"/api/v1/keys/{world.key_ids['user']}", headers=world.as_("maintainer")
    ).json()
    assert shown["last_used_at"] is not None
