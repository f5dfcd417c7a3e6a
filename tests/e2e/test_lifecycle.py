"""A real `maas serve` process from start to stop: it is live before its pinned models are
loaded and ready once they are; a SIGTERM drains it (not ready, new requests 503, running
streams finish) and it exits with status 0; the drain has a timeout, and a second SIGTERM
ends it at once."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from maas.config import Settings
from maas.registry import demo, open_registry
from tests.e2e.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SMOLLM2 = demo.DEMO_MODELS[0]


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None


def _stream_completion(server: Server, max_tokens: int, into: dict) -> None:
    body = {
        "model": SMOLLM2.name,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    lines = into.setdefault("lines", [])
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=120
    ) as response:
        into["status"] = response.status_code
        for line in response.iter_lines():
            if line:
                lines.append(line)


def test_live_before_ready_then_sigterm_drains_a_running_stream_and_exits_0(tmp_path):
    home = tmp_path / "home"
    registry = open_registry(Settings(home=home))
    try:
        registry.import_model(demo.locate(SMOLLM2), SMOLLM2.name, task="chat")
    finally:
        registry.close()
    # a drain long enough for the stream on a busy machine; eager steps: the pinned load and
    # the drain are the subject (test_readme.py starts `make serve`'s defaults, compiled)
    env = {"MAAS_PIN_MODELS": SMOLLM2.name, "MAAS_SHUTDOWN_TIMEOUT": "300"}
    server = Server(home, env={**env, "MAAS_LLM_COMPILE": "false"})
    try:
        # live answers while the pinned model loads, and ready says why it is not ready
        _until(
            lambda: (r := _get(f"{server.url}/v2/health/live")) and r.status_code == 200, 60, "live"
        )
        ready = _get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503, ready.text
        assert ready.json()["reason"] == f"pinned models are loading: {SMOLLM2.name}:1"
        server.wait_ready(timeout=240)

        stream: dict = {}
        reader = threading.Thread(target=_stream_completion, args=(server, 120, stream))
        reader.start()
        _until(lambda: len(stream.get("lines", [])) >= 3, 60, "the stream's first tokens")
        server.process.send_signal(signal.SIGTERM)

        drained = _until(
            lambda: (r := _get(f"{server.url}/v2/health/ready")) and r.status_code == 503 and r,
            5,
            "ready turning 503",
        )
        assert drained.json()["reason"] == "the server is shutting down"
        refused = httpx.get(
            f"{server.url}/v1/models",
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=5,
        )
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert reader.is_alive(), "the stream should still be running while the server drains"

        reader.join(timeout=120)
        assert stream["status"] == 200 and stream["lines"][-1] == "data: [DONE]"
        usage = json.loads(stream["lines"][-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 120, "the stream was cut short"
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
    log = server.log.read_text()
    assert "draining 1 running request(s)" in log
    assert "Traceback" not in log


def _slow_upload(server: Server, seconds: float, into: dict) -> None:
    """An upload that keeps sending for ``seconds``: a request that stays in flight."""

    def body():
        end = time.monotonic() + seconds
        into["sending"] = True
        while time.monotonic() < end:
            yield b"GGUF" + bytes(1020)
            time.sleep(0.05)

    try:
        response = httpx.post(
            f"{server.url}/api/v1/models/m/versions/upload?filename=m.gguf",
            content=body(),
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=120,
        )
        into["status"] = response.status_code
    except httpx.TransportError as err:
        into["error"] = err


@pytest.mark.parametrize("how", ["timeout", "second signal"])
def test_the_drain_ends_at_its_timeout_or_at_a_second_sigterm(tmp_path, how):
    timeout = 2 if how == "timeout" else 60
    server = Server(tmp_path / "home", env={"MAAS_SHUTDOWN_TIMEOUT": str(timeout)})
    try:
        server.wait_ready()
        upload: dict = {}
        sender = threading.Thread(target=_slow_upload, args=(server, 60, upload))
        sender.start()
        _until(lambda: upload.get("sending"), 10, "the upload")
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert server.process.poll() is None, "the server stopped without draining"
        signalled = time.monotonic()
        if how == "second signal":
            server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=30)
        took = time.monotonic() - signalled
        assert code == 0
        assert took < (4 if how == "second signal" else timeout + 4), f"took {took:.1f}s"
        sender.join(timeout=30)
        assert "status" not in upload or upload["status"] != 201
    finally:
        server.stop()
    log = server.log.read_text()
    if how == "timeout":
        assert "cut off at the shutdown timeout" in log
    assert "Traceback" not in log
