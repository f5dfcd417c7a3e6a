"""``maas generate`` and ``maas chat`` against a scripted server (httpx.MockTransport): what they
send, how they print a stream, and one clear line for every way a server can fail. The same
commands against a real server are in tests/e2e/test_cli_generate.py."""

from __future__ import annotations

import io
import json
import socket
import sys

import httpx
import pytest
from rich.console import Console

from maas.cli import generate, remote


class Events(httpx.SyncByteStream):
    """A server-sent event stream; remembers whether the client closed it."""

    def __init__(self, events: list[dict | str | Exception]) -> None:
        self.events = events
        self.closed = False

    def __iter__(self):
        for event in [*self.events, "[DONE]"]:
            if isinstance(event, Exception):
                raise event
            data = event if isinstance(event, str) else json.dumps(event)
            yield f"data: {data}\n\n".encode()

    def close(self) -> None:
        self.closed = True


class ScriptedServer:
    """Answers requests in order with ``answers``; records each request."""

    def __init__(self) -> None:
        self.answers: list[httpx.Response | Exception] = []
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]


@pytest.fixture
def server(monkeypatch) -> ScriptedServer:
    scripted = ScriptedServer()
    real = httpx.Client
    transport = httpx.MockTransport(scripted.handle)
    monkeypatch.setattr(remote.httpx, "Client", lambda **kw: real(transport=transport, **kw))
    monkeypatch.setenv("MAAS_URL", "http://maas.test")
    monkeypatch.setenv("MAAS_API_KEY", "maas-test")
    return scripted


def stream(*events: dict | str | Exception) -> httpx.Response:
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=Events(list(events))
    )


def chat_chunks(*pieces: str, finish: str = "stop") -> list[dict]:
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    usage = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5}
    return [*chunks, {"choices": [], "usage": usage}]


def refusal(status: int, message: str, code: str = "x") -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"message": message, "type": "invalid_request_error", "code": code}}
    )


def card(task: str = "chat") -> httpx.Response:
    return httpx.Response(200, json={"id": "m", "object": "model", "task": task})


def typed(monkeypatch, *lines: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))


def test_generate_streams_the_answer_and_sends_the_options(cli, server):
    server.answers = [stream(*chat_chunks("The", " capital", " is Paris."))]
    code, out, err = cli(
        "generate", "m", "Capital of France?", "--max-tokens", "5", "--temperature", "0",
        "--top-p", "0.9", "--seed", "7", "--stop", "\n\n", "--stop", "END",
    )  # fmt: skip
    assert (code, out, err) == (0, "The capital is Paris.\n", "")
    request = server.requests[0]
    assert (request.url.path, request.headers["authorization"]) == (
        "/v1/chat/completions",
        "Bearer maas-test",
    )
    assert json.loads(request.content) == {
        "model": "m",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n", "END"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_generate_raw_uses_completions_and_verbose_reports_usage(cli, server):
    pieces = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in ("a", "b")]
    last = {"choices": [{"index": 0, "text": "c\n", "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
    server.answers = [stream(*pieces, last, usage)]
    code, out, err = cli("generate", "m", "Once upon", "--raw", "-v")
    assert (code, out) == (0, "abc\n")
    assert "4 prompt + 3 completion tokens in" in err and "finish reason length" in err
    assert server.requests[0].url.path == "/v1/completions"
    body = server.bodies()[0]
    assert body["prompt"] == "Once upon" and "messages" not in body and "max_tokens" not in body


def test_generate_reads_the_prompt_from_stdin(cli, server, monkeypatch):
    typed(monkeypatch, "line one", "line two")
    server.answers = [stream(*chat_chunks("ok"))]
    assert cli("generate", "m", "-")[:2] == (0, "ok\n")
    assert server.bodies()[0]["messages"][0]["content"] == "line one\nline two\n"


FAILURES = [
    (refusal(404, "model 'nope' not found", "model_not_found"), "", "the server answered 404: "
     "model 'nope' not found"),
    (refusal(401, "invalid API key"), "", "the server answered 401: invalid API key"),
    (httpx.Response(502, text="Bad Gateway"), "", "the server answered 502: Bad Gateway"),
    (stream(*chat_chunks("Par")[:2], {"error": {"message": "engine died", "code": "x"}}),
     "Par\n", "the server stopped: engine died"),
    (stream(*chat_chunks("Par")[:2], "not json"), "Par\n",
     "the server at http://maas.test sent an event that is not JSON"),
    (stream(*chat_chunks("Par")[:2], httpx.ReadError("reset")), "Par\n",
     "lost the connection to the server at http://maas.test (ReadError)"),
    (httpx.ConnectError("refused"), "", "cannot reach the server at http://maas.test; "
     "is `maas serve` running?"),
]  # fmt: skip


@pytest.mark.parametrize(("answer", "printed", "message"), FAILURES)
def test_generate_failures_are_one_line_and_exit_1(cli, server, answer, printed, message):
    server.answers = [answer]
    code, out, err = cli("generate", "m", "hi")
    assert (code, out) == (1, printed)
    assert err == f"error: {message}\n"


def test_ctrl_c_stops_generate_with_exit_130(cli, server, monkeypatch):
    events = Events(chat_chunks("Once", " upon", " a time"))
    server.answers = [httpx.Response(200, stream=events)]
    write = generate._write

    def pressing_ctrl_c(text: str) -> None:
        if text == " upon":
            raise KeyboardInterrupt
        write(text)

    monkeypatch.setattr(generate, "_write", pressing_ctrl_c)
    assert cli("generate", "m", "a story", "-v") == (130, "Once\n", "(stopped)\n")
    assert events.closed


def test_a_server_that_is_not_running_cannot_be_reached(cli, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MAAS_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MAAS_API_KEY", "maas-test")
    for args in (("generate", "m", "hi"), ("chat", "m")):
        code, _, err = cli(*args)
        assert code == 1
        assert err.startswith(f"error: cannot reach the server at http://127.0.0.1:{port}")


def test_without_a_key_the_message_says_how_to_give_one(cli):
    code, _, err = cli("generate", "m", "hi")
    assert code == 1 and err == "error: set MAAS_API_KEY to an API key\n"


def test_bad_options_are_usage_errors(cli):
    assert cli("generate", "m", "hi", "--temperature", "3")[0] == 2
    assert cli("generate", "m", "hi", "--max-tokens", "0")[0] == 2


def test_control_characters_reach_a_pipe_but_not_a_terminal(cli, server, monkeypatch):
    server.answers = [stream(*chat_chunks("a\x1b[2J", "\rb\tc"))]
    assert cli("generate", "m", "hi")[1] == "a\x1b[2J\rb\tc\n"
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    server.answers = [stream(*chat_chunks("a\x1b[2J", "\rb\tc", "\x9b1m"))]
    assert cli("generate", "m", "hi")[1] == "a[2Jb\tc1m\n"


def test_chat_keeps_the_conversation_until_reset(cli, server, monkeypatch):
    typed(monkeypatch, "hi", "", "more", "/reset", "again")
    server.answers = [card(), *(stream(*chat_chunks(r)) for r in ("Hello!", "More.", "Again."))]
    code, out, err = cli("chat", "m", "--system", "Be brief.", "--max-tokens", "9")
    assert code == 0, err
    assert "Hello!\n" in out and "More.\n" in out and "Again.\n" in out
    assert "(a new conversation)" in err
    assert server.requests[0].url.path == "/v1/models/m"
    system = {"role": "system", "content": "Be brief."}
    assert [b["messages"] for b in server.bodies()] == [
        [system, {"role": "user", "content": "hi"}],
        [
            system,
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "more"},
        ],
        [system, {"role": "user", "content": "again"}],
    ]
    assert all(b["max_tokens"] == 9 and b["stream"] for b in server.bodies())


def test_chat_ends_at_exit_and_explains_unknown_commands(cli, server, monkeypatch):
    typed(monkeypatch, "/help", "/exit", "never sent")
    server.answers = [card()]
    code, _, err = cli("chat", "m")
    assert code == 0 and "unknown command /help; /reset or /exit" in err
    assert len(server.requests) == 1


def test_ctrl_c_stops_the_reply_closes_the_stream_and_keeps_what_arrived(cli, server, monkeypatch):
    typed(monkeypatch, "tell me", "go on")
    first = Events(chat_chunks("Once", " upon", " a time"))
    server.answers = [card(), httpx.Response(200, stream=first), stream(*chat_chunks("The end."))]
    write = generate._write

    def pressing_ctrl_c(text: str) -> None:
        if text == " upon":
            raise KeyboardInterrupt
        write(text)

    monkeypatch.setattr(generate, "_write", pressing_ctrl_c)
    code, out, err = cli("chat", "m")
    assert code == 0 and "(stopped)" in err
    assert first.closed
    assert "Once\n" in out and "The end.\n" in out
    assert server.bodies()[1]["messages"][-2:] == [
        {"role": "assistant", "content": "Once"},
        {"role": "user", "content": "go on"},
    ]


def test_a_failed_turn_is_reported_and_left_out_of_the_conversation(cli, server, monkeypatch):
    typed(monkeypatch, "a very long question", "short")
    server.answers = [
        card(),
        refusal(400, "This model's maximum context length is 256 tokens.", "context_length"),
        stream(*chat_chunks("Yes.")),
    ]
    code, out, err = cli("chat", "m")
    assert code == 0
    assert "error: the server answered 400: This model's maximum context length" in err
    assert server.bodies()[1]["messages"] == [{"role": "user", "content": "short"}]
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (refusal(404, "model 'nope' not found"), "the server answered 404: model 'nope' not found"),
        (card("embeddings"), "m is not a chat model (its task is embeddings)"),
    ],
)
def test_chat_refuses_a_model_it_cannot_chat_with_before_asking(
    cli, server, monkeypatch, answer, message
):
    typed(monkeypatch, "hi")
    server.answers = [answer]
    code, out, err = cli("chat", "m")
    assert (code, out) == (1, "")
    assert err == f"error: {message}\n"
