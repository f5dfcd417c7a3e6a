"""The console's pages and views over HTTP: shells hold no data, each view shows what its
API routes would show the same key, and everything it prints is escaped. (Which role gets
which status is in tests/integration/security/test_routes.py; the browser flows are in
tests/e2e/test_console.py.)"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from html import unescape

import pytest
from sqlalchemy import insert

from maas.analytics import costs, demo_usage
from maas.db.tables import UsageRecord
from maas.messages import UsageEvent
from tests.integration.conftest import bearer

CHART = re.compile(r"<canvas id=\"(?P<id>[\w-]+)\" data-chart='(?P<json>[^']*)'")


def charts(html: str) -> dict[str, dict]:
    return {m["id"]: json.loads(unescape(m["json"])) for m in CHART.finditer(html)}


def view(world, name: str, role: str, **params) -> str:
    response = world.client.get(f"/ui/views/{name}", headers=world.as_(role), params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    return response.text


def test_a_page_is_a_shell_that_holds_no_data_and_runs_no_inline_script(world):
    response = world.client.get("/ui/models")
    assert response.status_code == 200
    html = response.text
    assert 'data-page="models"' in html
    assert "acme-model" not in html and "shared-model" not in html
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts and all("src=" in tag for tag in scripts)
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["cache-control"] == "no-store"
    # the script and the chart library come from maas itself
    assert world.client.get("/ui/static/console.js").status_code == 200
    library = world.client.get("/ui/static/vendor/chart.umd.min.js")
    assert library.status_code == 200, "make install puts Chart.js there (maas/console)"


def test_an_unknown_page_is_a_404_in_the_api_error_shape(world):
    response = world.client.get("/ui/nothing-here")
    assert response.status_code == 404
    assert "its pages: models, jobs" in response.json()["error"]["message"]


def test_a_key_in_the_url_is_refused_by_a_view_too(world):
    key = world.keys["admin"]
    response = world.client.get(f"/ui/views/nav?key={key}")
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("role", "pages"),
    [
        ("user", ["usage", "chat"]),
        ("maintainer", ["models", "jobs", "usage", "adoption", "chat"]),
        ("admin", ["models", "jobs", "usage", "adoption", "access", "chat"]),
    ],
)
def test_the_menu_lists_the_pages_the_keys_role_may_open(world, role, pages):
    html = view(world, "nav", role)
    assert re.findall(r'data-page="(\w+)"', html) == pages
    assert f'data-role="{role}"' in html


def test_models_show_versions_aliases_and_only_what_the_key_may_see(world):
    html = view(world, "models", "maintainer")
    assert 'data-model="acme-model"' in html and 'data-model="shared-model"' in html
    assert "globex-model" not in html
    row = html[html.index('data-model="acme-model"') :].split("</tr>")[0]
    assert "<li>1: gguf" in row and "<li>2: gguf" in row
    assert "staging → 1" in row
    assert "globex-model" in view(world, "models", "admin")


def test_what_a_view_prints_is_escaped(world):
    registry = world.client.app.state.registry
    registry.import_model(world.gguf, "shown", description="<script>alert('x')</script>")
    html = view(world, "models", "maintainer")
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html


def test_jobs_show_progress_and_refresh_while_one_is_queued_or_running(world):
    html = view(world, "jobs", "maintainer")
    assert f'data-job="{world.job_id}"' in html
    assert 'data-status="queued"' in html
    assert 'data-refresh="2000"' in html
    assert '<progress max="1" value="0.0">' in html
    jobs = world.client.app.state.jobs
    for job in jobs.list(None):
        jobs.cancel(job.id, None)
    assert "data-refresh" not in view(world, "jobs", "admin")


@pytest.fixture
def usage(world):
    """Two industries' demo organisations, their year of usage ending today."""
    engine = world.client.app.state.registry.engine
    start = datetime.now(UTC).date() - timedelta(days=364)
    assert demo_usage.fill(engine, start=start, industries=2, scale=0.05) > 0
    return world


def test_usage_charts_count_every_day_tenant_and_model(usage):
    html = view(usage, "usage", "admin", days=30)
    drawn = charts(html)
    daily = drawn["chart-daily"]["data"]
    assert len(daily["labels"]) == 30
    assert daily["labels"][-1] == datetime.now(UTC).date().isoformat()
    requests, tokens = (d["data"] for d in daily["datasets"])
    stored = usage.client.get(
        "/api/v1/usage",
        params={"group_by": "day", "since": daily["labels"][0]},
        headers=usage.as_("admin"),
    ).json()["data"]
    stored = {row["group"]["day"]: row for row in stored}
    # today's differ by the requests of this test (each is metered too)
    for day, count, total in list(zip(daily["labels"], requests, tokens, strict=True))[:-1]:
        assert count == (stored[day]["requests"] if day in stored else 0), day
        assert total == (stored[day]["total_tokens"] if day in stored else 0), day
    assert sum(requests[:-1]) > 0
    tenants = drawn["chart-tenants"]
    assert len(tenants["data"]["labels"]) == 15  # the busiest; the title says of how many
    assert "busiest of" in tenants["options"]["plugins"]["title"]["text"]
    bars = tenants["data"]["datasets"][0]["data"]
    assert bars == sorted(bars, reverse=True)
    assert 'id="costs"' in html or "No priced usage" in html


def test_a_user_sees_its_own_usage_and_no_costs(usage):
    html = view(usage, "usage", "user")
    assert sum(charts(html)["chart-daily"]["data"]["datasets"][0]["data"]) == 0
    assert "Costs per tenant" not in html


@pytest.fixture
def priced(world):
    """acme-model at 1.0 a request, asked by acme once two days ago and twice yesterday;
    globex-model at 5.0 a request, asked by globex once yesterday."""
    engine = world.client.app.state.registry.engine
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    # (days ago, tenant, model)
    uses = [(2, "acme", "acme-model"), (1, "acme", "acme-model"), (1, "acme", "acme-model"),
            (1, "globex", "globex-model")]  # fmt: skip
    rows = [
        UsageEvent(today - timedelta(days=ago), None, tenant, "retail", model, 1,
                   "POST /v1/chat/completions", 200, 1.0).to_row()
        for ago, tenant, model in uses
    ]  # fmt: skip
    with engine.begin() as connection:
        connection.execute(insert(UsageRecord), rows)
    costs.set_price(engine, "acme-model", per_request=1.0)
    costs.set_price(engine, "globex-model", per_request=5.0)
    return world


@pytest.mark.parametrize(
    ("role", "per_model", "yesterday"),
    [
        ("admin", {"globex-model": 5.0, "acme-model": 3.0}, 7.0),
        ("maintainer", {"acme-model": 3.0}, 2.0),
    ],
)
def test_cost_per_day_and_per_model_are_charted_for_admins_and_maintainers(
    priced, role, per_model, yesterday
):
    drawn = charts(view(priced, "usage", role, days=7))
    daily = drawn["chart-cost-daily"]["data"]
    today = datetime.now(UTC).date()
    assert daily["labels"] == [(today - timedelta(days=6 - i)).isoformat() for i in range(7)]
    assert daily["datasets"][0]["data"] == [0, 0, 0, 0, 1.0, yesterday, 0]
    assert daily["datasets"][0]["label"] == "cost (USD)"
    models = drawn["chart-cost-models"]["data"]
    assert dict(zip(models["labels"], models["datasets"][0]["data"], strict=True)) == per_model
    assert models["labels"] == list(per_model)  # costliest first


def test_a_user_gets_no_cost_charts(priced):
    drawn = charts(view(priced, "usage", "user", days=7))
    assert "chart-daily" in drawn
    assert not {"chart-cost-daily", "chart-cost-models"} & set(drawn)


def test_the_adoption_view_draws_the_forecast_with_its_band(usage):
    html = view(usage, "adoption", "admin", industry="platform", horizon=6)
    forecast = charts(html)["chart-forecast"]
    labels = forecast["data"]["labels"]
    sets = {d["label"]: d["data"] for d in forecast["data"]["datasets"]}
    observed = [y for y in sets["observed"] if y is not None]
    assert len(observed) >= 10 and observed == sorted(observed)  # a year of months
    ahead = [y for y in sets["forecast"] if y is not None]
    assert len(ahead) == 6 + 1  # joined to the last observed point
    low = next(v for k, v in sets.items() if k.endswith("low"))
    high = next(v for k, v in sets.items() if k.endswith("high"))
    for lo, mid, hi in zip(low[-6:], sets["forecast"][-6:], high[-6:], strict=True):
        assert lo <= mid <= hi
    assert len(labels) == len(sets["observed"])
    (peak,) = [v for k, v in sets.items() if k.startswith("peak of new adoption")]
    marked = [(label, y) for label, y in zip(labels, peak, strict=True) if y is not None]
    assert len(marked) == 1 and f"({marked[0][0]})" in next(k for k in sets if k[:4] == "peak")
    assert "Curve chosen by the backtest" in html and 'id="forecast-candidates"' in html
    industries = re.findall(r'<option value="([\w-]+)"', html)
    assert industries[0] == "platform" and len(industries) == 3


def test_a_maintainer_without_adopters_is_told_why_there_is_no_forecast(usage):
    html = view(usage, "adoption", "maintainer")
    assert 'id="forecast-refused"' in html
    assert "chart-forecast" not in html


def test_keys_and_tenants_list_no_secret(world):
    html = view(world, "access", "admin")
    for role, key_id in world.key_ids.items():
        assert key_id in html, role
        assert world.keys[role] not in html
    assert "<td>acme</td><td>retail</td>" in html
    own = html[html.index(f'data-key="{world.key_ids["admin"]}"') :].split("</tr>")[0]
    assert "this key" in own and "data-revoke" not in own  # no revoking itself by a click
    assert f'data-revoke="{world.key_ids["user"]}"' in html
    # a key made by this one: signed in with it, its maker's row has no revoke button either
    # (revoking the maker would revoke the key signed in)
    child = world.client.post(
        "/api/v1/keys", json={"name": "child", "role": "admin"}, headers=world.as_("admin")
    ).json()["key"]
    html = world.client.get("/ui/views/access", headers=bearer(child)).text
    maker = html[html.index(f'data-key="{world.key_ids["admin"]}"') :].split("</tr>")[0]
    assert "made this key" in maker and "data-revoke" not in maker
    assert 'data-api="/api/v1/keys"' in html and 'data-api="/api/v1/tenants"' in html


def test_the_chat_view_offers_the_chat_models_the_key_may_use(world):
    html = view(world, "chat", "user")
    offered = re.findall(r"<option>([\w-]+)</option>", html)
    assert sorted(offered) == ["acme-chat", "acme-model", "shared-model"]  # GGUFs chat too
    response = world.client.get("/ui/views/chat", headers=bearer("maas-nope"))
    assert response.status_code == 401
