"""Usage records: one per request, written off the request path, never lost on shutdown."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text

from maas.auth.store import KeySpec
from maas.db import make_engine, upgrade
from maas.db.tables import UsageRecord
from maas.messages import UsageEvent
from maas.metering.recorder import UsageRecorder
from maas.metering.usage import aggregate
from tests.fixtures import wide_console
from tests.integration.conftest import bearer
from tests.integration.security.test_limits import app_with_probe


def count_records(settings) -> int:
    engine = create_engine(settings.database_url)
    with engine.connect() as connection:
        total = connection.execute(select(func.count()).select_from(UsageRecord)).scalar_one()
    engine.dispose()
    return total


def test_every_request_is_recorded_and_nothing_is_lost_on_shutdown(settings):
    with TestClient(app_with_probe(settings)) as client:
        key = client.app.state.keys.create(KeySpec(name="u"), None)[1]
        for _ in range(120):
            client.get("/v1/probe/tokens?n=3", headers=bearer(key))
        client.get("/v1/models/nope", headers=bearer(key))  # a 404 is metered too
        client.get("/v1/models", headers=bearer("maas-aaaaaaaaaaaa_wrong"))  # no key: not metered
    # the app has shut down: everything queued was written
    assert count_records(settings) == 121


def test_a_record_has_what_analytics_needs(world):
    world.client.get("/v2/models/acme-model:2", headers=world.as_("user"))
    world.client.get("/v2/models/acme-model", headers=world.as_("user"))
    world.client.app.state.recorder.flush()
    engine = world.client.app.state.registry.engine
    with engine.connect() as connection:
        row = connection.execute(select(UsageRecord).order_by(UsageRecord.id.desc())).first()
    assert row.key_id == world.key_ids["user"]
    assert (row.tenant, row.industry) == ("acme", "retail")
    assert row.endpoint == "GET /v2/models/{model}"
    assert row.status == 200 and row.latency_ms > 0
    assert row.day == datetime.now(UTC).date().isoformat()


def test_usage_aggregates_by_every_group(world):
    for role in ("user", "user", "globex"):
        world.client.get("/v1/models", headers=world.as_(role))
    world.client.app.state.recorder.flush()
    engine = world.client.app.state.registry.engine
    rows = aggregate(engine, ["industry", "tenant", "key", "endpoint", "day"])
    by_tenant = {row.group["tenant"]: row for row in rows}
    assert by_tenant["acme"].requests == 2 and by_tenant["acme"].group["industry"] == "retail"
    assert by_tenant["globex"].requests == 1 and by_tenant["globex"].group["industry"] == "energy"
    response = world.client.get(
        "/api/v1/usage?group_by=industry&group_by=model", headers=world.as_("admin")
    )
    assert response.status_code == 200
    assert {row["group"]["industry"] for row in response.json()["data"]} >= {"retail", "energy"}
    bad = world.client.get("/api/v1/usage?group_by=colour", headers=world.as_("admin"))
    assert bad.status_code == 400 and "cannot group usage by colour" in bad.text


def test_a_database_outage_at_shutdown_spills_records_and_they_come_back(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    upgrade(engine)
    recorder = UsageRecorder(engine, tmp_path, flush_seconds=60)
    recorder.start()
    now = datetime.now(UTC)
    for i in range(5):
        recorder.record(
            UsageEvent(
                at=now,
                key_id="k",
                tenant="t",
                industry="other",
                model="m",
                version=1,
                endpoint="GET /x",
                status=200,
                latency_ms=1.0,
                prompt_tokens=i,
            )
        )
    with engine.begin() as connection:  # the table disappears under the writer
        connection.execute(text("ALTER TABLE usage_records RENAME TO usage_records_away"))
    recorder.close()
    spills = list(tmp_path.glob("usage-unsaved-*.jsonl"))
    assert len(spills) == 1 and len(spills[0].read_text().splitlines()) == 5
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE usage_records_away RENAME TO usage_records"))
    again = UsageRecorder(engine, tmp_path)
    again.start()
    again.close()
    assert not list(tmp_path.glob("usage-unsaved-*.jsonl"))
    assert sum(r.prompt_tokens for r in aggregate(engine, ["key"])) == 0 + 1 + 2 + 3 + 4


def test_metering_does_not_fail_requests_when_the_database_is_busy(world, monkeypatch):
    recorder = world.client.app.state.recorder

    def broken(batch):
        raise RuntimeError("database down")

    monkeypatch.setattr(recorder, "_write", broken)
    assert world.client.get("/v1/models", headers=world.as_("user")).status_code == 200
    assert len(recorder._pending) >= 1  # kept for the next try
    monkeypatch.undo()
    recorder.flush()
    assert not recorder._pending


def test_cli_usage_table(world, capsys, monkeypatch):
    import sys

    from maas.cli import main

    world.client.get("/v1/models", headers=world.as_("user"))
    world.client.app.state.recorder.flush()
    monkeypatch.setenv("MAAS_HOME", str(world.client.app.state.settings.home))
    wide_console(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["maas", "usage", "--by", "tenant,industry"])
    try:
        main()
    except SystemExit as done:
        assert done.code in (0, None)
    out = capsys.readouterr().out
    assert "acme" in out and "retail" in out


def test_a_damaged_spill_file_never_stops_a_start_and_good_lines_still_count(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    upgrade(engine)
    event = UsageEvent(
        at=datetime.now(UTC),
        key_id="k",
        tenant="t",
        industry="other",
        model=None,
        version=None,
        endpoint="GET /x",
        status=200,
        latency_ms=1.0,
        prompt_tokens=7,
    )
    import json

    good = json.dumps(event.to_row(), default=str)
    (tmp_path / "usage-unsaved-1-1.jsonl").write_text(good + "\n" + good[:20] + "\n")
    recorder = UsageRecorder(engine, tmp_path)
    recorder.start()  # must not raise
    recorder.close()
    assert sum(r.prompt_tokens for r in aggregate(engine, ["key"])) == 7
    assert not list(tmp_path.glob("usage-unsaved-*.jsonl"))
