"""/api/v1/analytics over HTTP on a year of synthetic usage: adoption per group, a forecast
with its intervals, market potentials, a maintainer's view of its own subtree, and errors in
the API's shape."""

from __future__ import annotations

import pytest

from maas.analytics import demo_usage
from maas.auth.principal import Role
from tests.integration.conftest import bearer


@pytest.fixture
def usage(app_client):
    engine = app_client.app.state.registry.engine
    written = demo_usage.fill(engine, industries=4, scale=0.3, seed=1)
    assert written > 1000
    return engine


def priced(app_client, admin, folder, **price) -> None:
    """The demo usage's chat model registered (a tiny stand-in) and given ``price``."""
    from tests.fixtures import make_tiny_llama

    app_client.app.state.registry.import_model(make_tiny_llama(folder), "smollm2-135m-instruct")
    put = app_client.put(
        "/api/v1/analytics/prices/smollm2-135m-instruct", json=price, headers=admin
    )
    assert put.status_code == 200, put.text


def test_adoption_per_industry_and_week(app_client, make_key, usage):
    admin = bearer(make_key(Role.admin))
    answer = app_client.get(
        "/api/v1/analytics/adoption",
        params={"group_by": "industry", "period": "week", "min_requests": 2},
        headers=admin,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    groups = {g["group"]: g for g in body["data"]}
    assert set(groups) == {"finance", "healthcare", "manufacturing", "retail"}
    retail = groups["retail"]
    assert retail["potential"] > 0 and retail["potential_source"] == "demo: a survey"
    last = retail["periods"][-1]
    assert last["penetration"] == pytest.approx(last["adopted"] / retail["potential"])
    assert groups["finance"]["potential"] is None
    assert demo_usage.WEEKS - 3 <= len(retail["periods"]) <= demo_usage.WEEKS
    adopted = [p["adopted"] for p in retail["periods"]]
    assert adopted == sorted(adopted) and adopted[-1] > 5
    assert set(last["tasks"]) <= {"unknown"}  # the demo's model names are not registered
    assert 0 < retail["retention"] <= 1


def test_a_forecast_with_a_shock_has_intervals_and_landmarks(app_client, make_key, usage):
    admin = bearer(make_key(Role.admin))
    weeks = app_client.get(
        "/api/v1/analytics/adoption", params={"period": "week"}, headers=admin
    ).json()["data"][0]["periods"]
    shock = weeks[demo_usage.CAMPAIGN[1]]["period"]
    answer = app_client.get(
        "/api/v1/analytics/forecast",
        params={"industry": "finance", "period": "week", "horizon": 12, "shock_at": shock},
        headers=admin,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    names = [c["model"] for c in body["candidates"]]
    assert names == ["bass", "generalized-bass", "logistic", "gompertz"]
    assert body["chosen"] in names and len(body["forecast"]) == 12
    assert set(body["intervals_covariance"]) == set(body["params"])
    assert set(body["intervals_bootstrap"]) == set(body["params"])
    for point in body["forecast"]:
        assert point["low"] <= point["adopted"] <= point["high"]
    assert body["observed"][-1]["adopted"] <= body["forecast"][0]["adopted"]
    assert set(body["landmarks"]) == {"peak", "half", "ninety"}
    assert any(n.startswith(f"{body['chosen']} chosen") for n in body["notes"])


def test_a_maintainer_sees_its_organisation_and_departments_only(app_client, make_key, usage):
    own = bearer(make_key(Role.maintainer, tenant="finance-000"))
    answer = app_client.get(
        "/api/v1/analytics/adoption", params={"group_by": "tenant"}, headers=own
    )
    assert answer.status_code == 200, answer.text
    seen = {g["group"] for g in answer.json()["data"]}
    assert seen and seen <= {"finance-000", "finance-000-analytics"}
    user = bearer(make_key(Role.user, tenant="finance-000"))
    assert app_client.get("/api/v1/analytics/adoption", headers=user).status_code == 403
    other = app_client.get("/api/v1/analytics/forecast", params={"industry": "retail"}, headers=own)
    assert other.status_code == 404


def test_potentials_are_set_by_admins_and_shown_as_penetration(app_client, make_key, usage):
    admin = bearer(make_key(Role.admin))
    put = app_client.put(
        "/api/v1/analytics/potentials/finance",
        json={"potential": 400, "source": "national register"},
        headers=admin,
    )
    assert put.status_code == 200, put.text
    listed = app_client.get("/api/v1/analytics/potentials", headers=admin).json()["data"]
    assert {"industry": "finance", "potential": 400.0, "source": "national register"}.items() <= {
        k: v for k, v in next(p for p in listed if p["industry"] == "finance").items()
    }.items()
    groups = app_client.get("/api/v1/analytics/adoption", headers=admin).json()["data"]
    finance = next(g for g in groups if g["group"] == "finance")
    assert finance["periods"][-1]["penetration"] == pytest.approx(
        finance["periods"][-1]["adopted"] / 400
    )


@pytest.mark.parametrize(
    ("method", "path", "params", "body", "status", "param"),
    [
        ("GET", "forecast", {"industry": "energy"}, None, 404, "industry"),
        ("GET", "forecast", {"industry": "finance", "shock_at": "1999-01"}, None, 400,
         "shock_at"),
        ("GET", "forecast", {"horizon": 0}, None, 400, "horizon"),
        ("GET", "adoption", {"group_by": "country"}, None, 400, "group_by"),
        ("GET", "adoption", {"period": "day"}, None, 400, "period"),
        ("PUT", "potentials/atlantis", None, {"potential": 3}, 400, "industry"),
        ("PUT", "potentials/retail", None, {"potential": -3}, 400, "potential"),
    ],
)  # fmt: skip
def test_bad_requests_get_errors_in_the_api_shape(
    app_client, make_key, usage, method, path, params, body, status, param
):
    admin = bearer(make_key(Role.admin))
    answer = app_client.request(
        method, f"/api/v1/analytics/{path}", params=params, json=body, headers=admin
    )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def test_prices_and_costs_over_http(app_client, make_key, usage, tmp_path):
    from tests.fixtures import make_tiny_llama

    admin = bearer(make_key(Role.admin))
    registry = app_client.app.state.registry
    priced(app_client, admin, tmp_path / "tiny", prompt_per_1k=0.5, completion_per_1k=1.5,
           currency="EUR")  # fmt: skip
    assert app_client.get("/api/v1/analytics/prices", headers=admin).json()["count"] == 1
    answer = app_client.get(
        "/api/v1/analytics/costs", params={"group_by": "industry"}, headers=admin
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["currency"] == "EUR" and body["unpriced_requests"] > 0  # the other demo models
    assert all(row["cost"] > 0 for row in body["data"])
    total = sum(row["prompt_tokens"] for row in body["data"])
    assert total > 0
    missing = app_client.put(
        "/api/v1/analytics/prices/nope", json={"prompt_per_1k": 1}, headers=admin
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    registry.import_model(make_tiny_llama(tmp_path / "tiny2"), "all-minilm-l6-v2")
    other = app_client.put(
        "/api/v1/analytics/prices/all-minilm-l6-v2",
        json={"prompt_per_1k": 1, "currency": "USD"},
        headers=admin,
    )
    assert other.status_code == 400 and "prices are in EUR" in other.text


def test_costs_per_day_over_http(app_client, make_key, usage, tmp_path):
    admin = bearer(make_key(Role.admin))
    priced(app_client, admin, tmp_path / "tiny", prompt_per_1k=0.5, completion_per_1k=1.5)

    def costs(**params) -> list[dict]:
        answer = app_client.get("/api/v1/analytics/costs", params=params, headers=admin)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]

    per_day = costs(group_by="day", since="2026-01-05", until="2026-01-18")
    days = [row["group"] for row in per_day]
    assert days == sorted(days) and days[0] >= "2026-01-05" and days[-1] <= "2026-01-18"
    assert 10 <= len(days) <= 14
    per_model = costs(group_by="model", since="2026-01-05", until="2026-01-18")
    assert sum(row["cost"] for row in per_day) == pytest.approx(
        sum(row["cost"] for row in per_model)
    )
    assert sum(row["cost"] for row in per_day) > 0


def test_published_series_are_uploaded_listed_and_forecast(app_client, make_key):
    from tests.unit.analytics.test_series import GOOD

    admin = bearer(make_key(Role.admin))
    csv = {"content-type": "text/csv"}
    sent = app_client.post(
        "/api/v1/analytics/series", content=GOOD.encode(), headers={**admin, **csv}
    )
    assert sent.status_code == 201, sent.text
    assert {(s["industry"], s["source"], len(s["periods"])) for s in sent.json()["data"]} == {
        ("retail", "Survey of firms", 9),
        ("banking", "Bank register", 2),
    }
    maintainer = bearer(make_key(Role.maintainer))
    listed = app_client.get(
        "/api/v1/analytics/series", params={"industry": "retail"}, headers=maintainer
    ).json()
    assert listed["count"] == 1 and listed["data"][0]["values"][-1] == 0.5
    forecast = app_client.get(
        "/api/v1/analytics/forecast",
        params={"industry": "retail", "source": "Survey of firms", "horizon": 3},
        headers=maintainer,
    )
    assert forecast.status_code == 200 and forecast.json()["source"] == "Survey of firms"


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b"period,industry,share,source\n2024,retail,12,s\n", "text/csv", "line 2: share 12"),
        (b"\xff\xfe\x00bad", "text/csv", "the CSV is not UTF-8 text"),
        (b'{"period": 2024}', "application/json", "send the CSV as text/csv"),
        (
            b"period,industry,share,source\n2024,retail,0.1," + b"x" * 200_000 + b"\n",
            "text/csv",
            "line 2: field larger than field limit",
        ),
        (b"period,industry,share,source\n2024,retail,0.1,a\x00b\n", "text/csv", "printable"),
    ],
)
def test_a_bad_series_upload_is_a_400_naming_the_problem_and_stores_nothing(
    app_client, make_key, body, content_type, says
):
    admin = bearer(make_key(Role.admin))
    sent = app_client.post(
        "/api/v1/analytics/series", content=body, headers={**admin, "content-type": content_type}
    )
    assert sent.status_code == 400, sent.text
    assert says in sent.json()["error"]["message"]
    assert app_client.get("/api/v1/analytics/series", headers=admin).json()["count"] == 0


def test_penetration_is_of_the_set_potential_or_else_of_the_fitted_m(app_client, make_key, usage):
    admin = bearer(make_key(Role.admin))

    def forecast(industry: str) -> dict:
        answer = app_client.get(
            "/api/v1/analytics/forecast", params={"industry": industry}, headers=admin
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    finance = forecast("finance")  # no potential set: the chosen curve's m is the potential
    assert finance["potential_estimated"] is True
    assert finance["potential"] == pytest.approx(finance["params"]["m"])
    assert finance["potential_source"] == f"estimated: the {finance['chosen']} fit's m"
    for point in finance["observed"] + finance["forecast"]:
        assert point["penetration"] == pytest.approx(point["adopted"] / finance["params"]["m"])
    retail = forecast("retail")  # the demo sets retail's potential: it stays the denominator
    set_potential = next(
        g for g in app_client.get("/api/v1/analytics/adoption", headers=admin).json()["data"]
        if g["group"] == "retail"
    )["potential"]  # fmt: skip
    assert retail["potential_estimated"] is False
    assert retail["potential"] == set_potential and retail["potential_source"] == "demo: a survey"
    last = retail["observed"][-1]
    assert last["penetration"] == pytest.approx(last["adopted"] / set_potential)


def test_a_maintainer_is_charged_for_its_organisation_only(app_client, make_key, usage, tmp_path):
    admin = bearer(make_key(Role.admin))
    priced(app_client, admin, tmp_path / "tiny", prompt_per_1k=0.5, completion_per_1k=1.5)

    def costs(headers) -> dict[str, float]:
        answer = app_client.get(
            "/api/v1/analytics/costs", params={"group_by": "tenant"}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        return {row["group"]: row["cost"] for row in answer.json()["data"]}

    everyone = costs(admin)
    own = costs(bearer(make_key(Role.maintainer, tenant="finance-000")))
    assert own and set(own) <= {"finance-000", "finance-000-analytics"}
    assert len(everyone) > len(own)
    assert own == {tenant: everyone[tenant] for tenant in own}
    user = bearer(make_key(Role.user, tenant="finance-000"))
    assert app_client.get("/api/v1/analytics/costs", headers=user).status_code == 403
