"""``maas generate`` and ``maas chat``: text from a model on the running server, printed as it
is generated. They speak the server's OpenAI API, as any other client would."""

from __future__ import annotations

import re
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.markup import escape

from maas.cli.output import console, err_console
from maas.cli.remote import ServerClient
from maas.errors import InvalidRequest, MaasError

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

ModelArgument = Annotated[
    str, typer.Argument(help="NAME, NAME:V or NAME@ALIAS of a model the key may use.")
]
MaxTokensOption = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        min=1,
        help="Stop after this many tokens (left out: at the end of the answer).",
    ),
]
TemperatureOption = Annotated[
    float | None,
    typer.Option(min=0, max=2, help="Randomness; 0 takes the likeliest token every time."),
]
TopPOption = Annotated[
    float | None,
    typer.Option("--top-p", min=0, max=1, help="Sample from the likeliest tokens that make up P."),
]
SeedOption = Annotated[
    int | None, typer.Option(help="Same seed, prompt and settings: the same text.")
]
StopOption = Annotated[
    list[str] | None,
    typer.Option("--stop", help="End the text before this string; repeat for up to 4."),
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print tokens, time and finish reason on stderr.")
]

# Control characters a model's text must not send to a terminal (escape sequences could move the
# cursor, rewrite the screen or the window title); tab and newline stay.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class Reply:
    """What one streamed request gave back, so far."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    seconds: float = 0.0
    interrupted: bool = False
    """Ctrl-C stopped it before the server finished."""
    error: MaasError | None = None
    """The server refused the request, or stopped with an error part way."""


def generate(
    model: ModelArgument,
    prompt: Annotated[str, typer.Argument(help="The prompt; - reads it from stdin.")],
    chat: Annotated[
        bool,
        typer.Option(
            "--chat/--raw",
            help="--chat sends the prompt as one user message through the model's chat "
            "template (/v1/chat/completions); --raw sends it as it is (/v1/completions).",
        ),
    ] = True,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Stop after this many tokens (left out: at the end of the answer; with --raw "
            "after 16 tokens, as in the OpenAI API).",
        ),
    ] = None,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    seed: SeedOption = None,
    stop: StopOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Generate text for PROMPT with MODEL on the running server, printed as it arrives.

    Talks to the server at MAAS_URL with the key in MAAS_API_KEY.
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    body: dict[str, Any] = {"model": model, **_sampling(max_tokens, temperature, top_p, seed, stop)}
    if chat:
        path, body["messages"] = CHAT_PATH, [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = COMPLETIONS_PATH, prompt
    reply = stream_reply(ServerClient(needs="an API key"), path, body)
    _end_line(reply)
    if reply.error:
        raise reply.error
    if reply.interrupted:
        raise typer.Exit(130)
    if verbose:
        _report(reply)


def chat(
    model: ModelArgument,
    system: Annotated[
        str | None, typer.Option("--system", "-s", help="A system message that starts the chat.")
    ] = None,
    max_tokens: MaxTokensOption = None,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    seed: SeedOption = None,
    stop: StopOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Chat with MODEL on the running server; each reply streams as it is generated.

    Every turn sends the whole conversation. /reset starts a new one; /exit, Ctrl-D or Ctrl-C at
    the prompt quits; Ctrl-C during a reply stops that reply. Talks to the server at MAAS_URL
    with the key in MAAS_API_KEY.
    """
    client = ServerClient(needs="an API key")
    card = client.request("GET", f"/v1/models/{model}")
    if card.get("task", "chat") != "chat":
        raise InvalidRequest(f"{model} is not a chat model (its task is {card['task']})")
    _enable_line_editing()
    err_console.print(
        f"chat with {model}: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply",
        style="dim",
        highlight=False,
    )
    opening = [{"role": "system", "content": system}] if system else []
    body = {"model": model, **_sampling(max_tokens, temperature, top_p, seed, stop)}
    history: list[dict[str, str]] = []
    while (line := _ask()) is not None:
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            history.clear()
            err_console.print("(a new conversation)", style="dim", highlight=False)
        elif command.startswith("/") and " " not in command:
            err_console.print(f"unknown command {command}; /reset or /exit", highlight=False)
        elif command:
            history.extend(_turn(client, body, [*opening, *history], line, verbose))


def stream_reply(client: ServerClient, path: str, body: dict[str, Any]) -> Reply:
    """Stream one completion to stdout. Ctrl-C stops it: the connection closes, which stops the
    generation on the server, and the reply keeps what had arrived. So does an error."""
    reply = Reply()
    started = time.monotonic()
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with closing(client.stream(path, request)) as events:
            for event in events:
                reply.usage = event.get("usage") or reply.usage
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    _write(piece)
                    reply.text += piece
                    reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
    except KeyboardInterrupt:
        reply.interrupted = True
    except MaasError as err:
        reply.error = err
    reply.seconds = time.monotonic() - started
    return reply


def _turn(
    client: ServerClient,
    body: dict[str, Any],
    before: list[dict[str, str]],
    line: str,
    verbose: bool,
) -> list[dict[str, str]]:
    """One exchange; returns the messages to keep (none when the server failed it)."""
    asked = {"role": "user", "content": line}
    reply = stream_reply(client, CHAT_PATH, {**body, "messages": [*before, asked]})
    _end_line(reply)
    if reply.error:
        err_console.print(f"[bold red]error:[/] {escape(reply.error.message)}", highlight=False)
        return []
    if verbose and not reply.interrupted:
        _report(reply)
    if not reply.text:
        return []
    return [asked, {"role": "assistant", "content": reply.text}]


def _ask() -> str | None:
    """The next line typed, or None at the end of input (Ctrl-D) or on Ctrl-C."""
    try:
        return console.input("[bold green]>>>[/] ")
    except (EOFError, KeyboardInterrupt):
        console.print()
        return None


def _enable_line_editing() -> None:
    if sys.stdin.isatty():
        import readline  # noqa: F401 - input() gains arrow keys and history once it is loaded


def _sampling(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: list[str] | None,
) -> dict[str, Any]:
    fields = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop or None,
    }
    return {name: value for name, value in fields.items() if value is not None}


def _write(text: str) -> None:
    """Text as it arrives: unstyled, flushed at once, and without control characters on a
    terminal (a pipe gets it byte for byte)."""
    if console.is_terminal:
        text = _CONTROL.sub("", text)
    console.file.write(text)
    console.file.flush()


def _end_line(reply: Reply) -> None:
    if reply.interrupted:
        _write("\n")
        err_console.print("(stopped)", style="dim", highlight=False)
    elif reply.text and not reply.text.endswith("\n"):
        _write("\n")


def _report(reply: Reply) -> None:
    usage = reply.usage or {}
    prompt, completion = usage.get("prompt_tokens", "?"), usage.get("completion_tokens", "?")
    rate = ""
    if isinstance(completion, int) and reply.seconds > 0:
        rate = f", {completion / reply.seconds:.1f} tokens/s"
    err_console.print(
        f"{prompt} prompt + {completion} completion tokens in "
        f"{reply.seconds:.2f} s{rate}, finish reason {reply.finish_reason or '-'}",
        style="dim",
        highlight=False,
    )
