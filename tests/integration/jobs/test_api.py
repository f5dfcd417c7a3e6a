"""/api/v1/jobs: roles, tenants, idempotency, validation, cancel, events."""

from __future__ import annotations

import pytest


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"job_plugins": ["tests.jobs_plugin"]})


@pytest.fixture
def keys(tenant_keys):
    return tenant_keys


def create(client, headers, **extra):
    body = {"kind": "count", "params": {"steps": 3}}
    return client.post("/api/v1/jobs", json=body, headers={**headers, **extra})


def test_maintainers_start_jobs_in_their_tenant_and_users_may_not(app_client, keys):
    made = create(app_client, keys["acme"])
    assert made.status_code == 201, made.text
    job = made.json()
    assert job["status"] == "queued" and job["tenant"] == "acme" and job["kind"] == "count"
    assert job["params"] == {"steps": 3, "step_seconds": 0.1, "model": "counted"}  # defaults
    assert "lease_owner" not in job
    denied = create(app_client, keys["acme-user"])
    assert denied.status_code == 403
    assert app_client.get("/api/v1/jobs", headers=keys["acme-user"]).status_code == 403
    assert app_client.post("/api/v1/jobs", json={"kind": "count"}).status_code == 401


def test_another_tenant_s_job_is_not_found(app_client, keys):
    job_id = create(app_client, keys["acme"]).json()["id"]
    for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/events"):
        assert app_client.get(path, headers=keys["globex"]).status_code == 404
        assert app_client.get(path, headers=keys["acme"]).status_code == 200
        assert app_client.get(path, headers=keys["admin"]).status_code == 200
    cancel = app_client.post(f"/api/v1/jobs/{job_id}/cancel", headers=keys["globex"])
    assert cancel.status_code == 404
    assert app_client.get("/api/v1/jobs", headers=keys["globex"]).json()["data"] == []
    listed = app_client.get("/api/v1/jobs", headers=keys["acme"]).json()
    assert [j["id"] for j in listed["data"]] == [job_id] and not listed["has_more"]


def test_an_idempotency_key_returns_the_same_job(app_client, keys):
    first = create(app_client, keys["acme"], **{"Idempotency-Key": "train-42"})
    again = create(app_client, keys["acme"], **{"Idempotency-Key": "train-42"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = app_client.post(
        "/api/v1/jobs",
        json={"kind": "count", "params": {"steps": 4}},
        headers={**keys["acme"], "Idempotency-Key": "train-42"},
    )
    assert other.status_code == 409
    assert len(app_client.get("/api/v1/jobs", headers=keys["acme"]).json()["data"]) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"kind": "nope"}, "kind"),
        ({"kind": "count", "params": {"steps": 0}}, "params.steps"),
        ({"kind": "count", "params": {"steps": "many"}}, "params.steps"),
    ],
)
def test_bad_jobs_are_refused_before_they_are_queued(app_client, keys, body, param):
    answer = app_client.post("/api/v1/jobs", json=body, headers=keys["acme"])
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param
    assert app_client.get("/api/v1/jobs", headers=keys["acme"]).json()["data"] == []


def test_cancel_a_queued_job_and_read_its_events(app_client, keys):
    job_id = create(app_client, keys["acme"]).json()["id"]
    cancelled = app_client.post(f"/api/v1/jobs/{job_id}/cancel", headers=keys["acme"])
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    events = app_client.get(f"/api/v1/jobs/{job_id}/events", headers=keys["acme"]).json()
    assert [e["message"] for e in events["data"]] == ["created (count)", "cancelled before it ran"]
    later = app_client.get(
        f"/api/v1/jobs/{job_id}/events",
        params={"after": events["data"][0]["id"]},
        headers=keys["acme"],
    ).json()
    assert [e["message"] for e in later["data"]] == ["cancelled before it ran"]
    assert app_client.get("/api/v1/jobs/job-missing", headers=keys["acme"]).status_code == 404
