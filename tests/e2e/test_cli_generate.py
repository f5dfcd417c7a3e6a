"""``maas generate`` and ``maas chat`` against a real `maas serve` with a tiny random Llama: the
text they stream is the text the API answers, and chat sends the whole conversation."""

from __future__ import annotations

import io
import sys

import pytest

from maas.cli import generate
from maas.config import Settings
from maas.registry import open_registry
from tests.e2e.conftest import Server
from tests.fixtures import make_tiny_llama

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    registry = open_registry(Settings(home=root / "home"))
    try:
        registry.import_model(make_tiny_llama(root / "llama"), MODEL)
    finally:
        registry.close()
    # decode steps eager, as the suite's other servers that test something else
    # (tests/conftest.py suite_settings): its load took 23 s with inductor's cache cold, 3 s eagerly
    running = Server(root / "home", env={"MAAS_LLM_COMPILE": "false"})
    try:
        running.wait_ready()
        tenant = {"name": "acme", "industry": "retail"}
        assert running.admin.post("/api/v1/tenants", json=tenant).status_code == 201
        key = {"name": "cli", "tenant": "acme", "role": "user"}
        running.user_key = running.admin.post("/api/v1/keys", json=key).json()["key"]
        # loaded before the tests, so that no test's request waits for the load
        loaded = running.admin.post(f"/v2/repository/models/{MODEL}/load", timeout=240)
        assert loaded.status_code == 200, loaded.text
        yield running
    finally:
        running.stop()


@pytest.fixture
def as_user(server, monkeypatch):
    """The CLI talks to the server with a tenant's user key."""
    monkeypatch.setenv("MAAS_URL", server.url)
    monkeypatch.setenv("MAAS_API_KEY", server.user_key)
    return server


def answer(server, path: str, **body) -> str:
    response = server.admin.post(path, json={"model": MODEL, **GREEDY, **body})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def line(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def greedy_args() -> list[str]:
    return ["--temperature", "0", "--max-tokens", str(GREEDY["max_tokens"])]


def test_generate_prints_what_the_api_answers(cli, as_user):
    expected = answer(as_user, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}])
    assert expected
    code, out, err = cli("generate", MODEL, "hi", *greedy_args(), "--verbose")
    assert (code, out) == (0, line(expected)), err
    assert "completion tokens in" in err

    expected = answer(as_user, "/v1/completions", prompt="numbers like")
    code, out, _ = cli("generate", MODEL, "numbers like", "--raw", *greedy_args())
    assert (code, out) == (0, line(expected))


def test_generate_reports_server_errors_in_one_line(cli, as_user):
    code, out, err = cli("generate", "nope", "hi")
    assert (code, out) == (1, "")
    assert err == "error: the server answered 404: model 'nope' not found\n"
    code, _, err = cli("generate", MODEL, "hi", "--max-tokens", "100000")
    assert code == 1
    assert err.startswith("error: the server answered 400: This model's maximum context length")


def test_chat_sends_the_whole_conversation(cli, as_user, monkeypatch):
    first = [{"role": "user", "content": "hello"}]
    reply = answer(as_user, "/v1/chat/completions", messages=first)
    assert reply
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    expected = answer(as_user, "/v1/chat/completions", messages=second)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nmore\n/exit\n"))
    code, out, err = cli("chat", MODEL, *greedy_args())
    assert code == 0, err
    assert reply in out and expected in out
    assert out.index(reply) < out.index(expected)


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(cli, as_user, monkeypatch):
    write = generate._write
    shown: list[str] = []
    stopped = False

    def ctrl_c_at_the_second_piece(text: str) -> None:
        nonlocal stopped
        if not stopped and text.strip() and any(piece.strip() for piece in shown):
            stopped = True
            raise KeyboardInterrupt
        if not stopped:
            shown.append(text)
        write(text)

    monkeypatch.setattr(generate, "_write", ctrl_c_at_the_second_piece)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nmore\n"))
    code, out, err = cli("chat", MODEL, "--temperature", "0", "--max-tokens", "64")
    assert code == 0 and stopped and "(stopped)" in err, err
    kept = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "".join(shown)},
        {"role": "user", "content": "more"},
    ]
    expected = answer(as_user, "/v1/chat/completions", messages=kept, max_tokens=64)
    assert line(expected) in out
