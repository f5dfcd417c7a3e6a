"""What an LLM deployment does when it is full, when its engine dies, and what readiness says
meanwhile: fast 503s with Retry-After, an explicit error kind, and a restart in the
background that needs no request to trigger it."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from maas.api.app import build_app
from maas.auth.bootstrap import ensure_admin_key
from maas.errors import Unavailable
from maas.registry import open_registry
from tests.conftest import suite_settings
from tests.integration.conftest import bearer

pytestmark = pytest.mark.timeout(240)

GREEDY = {"temperature": 0, "ignore_eos": True}


def wait_until(check, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


class Served:
    """An app serving the tiny Llama as ``chat``, pinned or not, with an admin key."""

    def __init__(self, home, model_sources, *, pinned: bool, **fields) -> None:
        pins = {"pin_models": ["chat"]} if pinned else {}
        settings = suite_settings(home, inference_threads=1, **pins, **fields)
        registry = open_registry(settings)
        registry.import_model(model_sources / "llama", "chat")
        registry.close()
        self.client = TestClient(build_app(settings))
        self.client.__enter__()
        self.client.headers.update(bearer(ensure_admin_key(settings, self.client.app.state.keys)))

    @property
    def pool(self):
        return self.client.app.state.serving.pool

    def deployment(self):
        return next((d for d in self.pool.deployments() if d.record.name == "chat"), None)

    def complete(self, **fields):
        body = {"model": "chat", "prompt": "the cat", "max_tokens": 4, **GREEDY, **fields}
        return self.client.post("/v1/completions", json=body)

    def ready(self) -> int:
        return self.client.get("/v2/health/ready").status_code

    def model_ready(self) -> int:
        return self.client.get("/v2/models/chat/ready").status_code

    def close(self) -> None:
        self.client.__exit__(None, None, None)


@pytest.fixture
def served(tmp_path, model_sources):
    made: list[Served] = []

    def make(**fields) -> Served:
        made.append(Served(tmp_path / f"home{len(made)}", model_sources, **fields))
        return made[-1]

    yield make
    for app in made:
        app.close()


def test_a_full_llm_queue_answers_503_with_retry_after_at_once(served, monkeypatch):
    app = served(
        pinned=False, llm_engine_process=False, llm_max_sequences=1, llm_max_waiting_sequences=1
    )
    assert app.complete().status_code == 200  # loaded
    engine = app.deployment().engine.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.02) or step())
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(app.complete, max_tokens=100) for _ in range(2)]
        assert wait_until(lambda: app.deployment().sequences == 2, 10)  # one runs, one waits
        started = time.monotonic()
        response = app.complete()
        took = time.monotonic() - started
        stream = app.client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        assert [r.result().status_code for r in running] == [200, 200]
    assert response.status_code == 503, response.text
    assert took < 0.5, f"the 503 took {took:.2f}s"
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert (
        error["code"] == "service_unavailable"
        and "MAAS_LLM_MAX_WAITING_SEQUENCES" in error["message"]
    )
    assert stream.status_code == 503, "a stream is refused before it starts, not inside it"
    assert app.complete().status_code == 200  # room again


def _stop_engine_process(app: Served) -> int:
    process = app.deployment().engine._process
    os.kill(process.pid, signal.SIGSTOP)  # the request below waits on it
    return process.pid


def test_a_dead_engine_fails_its_requests_with_503_and_restarts_in_the_background(served):
    app = served(pinned=True)
    assert wait_until(lambda: app.ready() == 200), "the pinned model never loaded"
    assert app.model_ready() == 200
    pid = _stop_engine_process(app)
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(app.complete, max_tokens=50)
        body = {"model": "chat", "prompt": "the cat", "max_tokens": 50, "stream": True, **GREEDY}
        streamed = pool.submit(app.client.post, "/v1/completions", json=body)
        assert wait_until(lambda: app.deployment().sequences == 2, 10)
        os.kill(pid, signal.SIGKILL)
        plain, streamed = plain.result(), streamed.result()
    assert plain.status_code == 503, plain.text
    assert plain.json()["error"]["code"] == "service_unavailable"
    [event] = [
        json.loads(line.removeprefix("data: "))
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert event["error"]["code"] == "service_unavailable", event
    # not ready at once, then back without any request to the model
    assert app.model_ready() == 400 and app.ready() == 503
    assert "pinned models are loading: chat:1" in app.client.get("/v2/health/ready").text
    assert wait_until(lambda: app.ready() == 200), "the engine was not restarted"
    assert app.model_ready() == 200
    assert app.deployment().engine._process.pid != pid
    assert app.complete().status_code == 200


def test_a_model_whose_restart_fails_backs_off_with_503_and_retry_after(served, monkeypatch):
    app = served(pinned=False)
    assert app.complete().status_code == 200
    pool = app.pool
    failures = []

    async def failing_load(record):
        failures.append(time.monotonic())
        raise Unavailable("the model failed to load: boom")

    real_load = pool._load
    monkeypatch.setattr(pool, "_load", failing_load)
    os.kill(app.deployment().engine._process.pid, signal.SIGKILL)
    assert wait_until(lambda: len(failures) >= 1, 10)
    response = app.complete()
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1 and "next attempt" in response.text
    assert wait_until(lambda: len(failures) >= 2, 10), "no second attempt after the back-off"
    assert failures[1] - failures[0] >= 0.9
    monkeypatch.setattr(pool, "_load", real_load)
    assert wait_until(lambda: app.model_ready() == 200, 30), "never came back"


def test_readiness_is_503_never_500_when_the_database_does_not_answer(served, monkeypatch):
    app = served(pinned=False, llm_engine_process=False)
    assert app.ready() == 200

    def broken_ping():
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(app.client.app.state.registry, "ping", broken_ping)
    response = app.client.get("/v2/health/ready")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "reason": "the database does not answer"}
    assert app.client.get("/v2/health/live").status_code == 200


def test_while_draining_ready_is_503_and_new_requests_get_503_with_retry_after(served):
    app = served(pinned=False, llm_engine_process=False)
    assert app.complete().status_code == 200
    app.client.app.state.drain.start()
    assert app.ready() == 503
    assert "shutting down" in app.client.get("/v2/health/ready").json()["reason"]
    assert app.client.get("/v2/health/live").status_code == 200
    response = app.complete()
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "service_unavailable"
    v2 = app.client.get("/v2/models/chat")
    assert v2.status_code == 503 and set(v2.json()) == {"error"}  # the v2 error shape
