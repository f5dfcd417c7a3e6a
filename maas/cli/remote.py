"""Commands that act on a running server (what is loaded lives in the server process)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx

from maas.cli.address import server_url
from maas.cli.context import load_settings
from maas.errors import InvalidRequest, MaasError, Unavailable


class ServerClient:
    """The server at MAAS_URL; else the one running on this MAAS_HOME (wherever it listens);
    else MAAS_HOST and MAAS_PORT. The key is MAAS_API_KEY, or else the admin key file.
    ``needs`` names the key a command needs, for the message when there is none."""

    def __init__(self, needs: str = "a maintainer or admin key") -> None:
        settings = load_settings()
        self.url = server_url(settings)
        key = os.environ.get("MAAS_API_KEY")
        if not key:
            key_file = settings.home / "admin.key"
            if not key_file.exists():
                raise InvalidRequest(f"set MAAS_API_KEY to {needs}")
            key = key_file.read_text().strip()
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=600
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError:
            raise self._unreachable() from None
        if response.status_code >= 400:
            raise _refusal(response)
        return response.json() if response.content else None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST ``body`` and yield each server-sent event's JSON until ``data: [DONE]``.

        An error status or an error event raises MaasError. Closing the iterator closes the
        connection, which stops the work on the server."""
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _refusal(response)
                yield from _events(response, self.url)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise self._unreachable() from None
        except httpx.TransportError as err:
            raise Unavailable(
                f"lost the connection to the server at {self.url} ({type(err).__name__})"
            ) from None

    def _unreachable(self) -> Unavailable:
        return Unavailable(f"cannot reach the server at {self.url}; is `maas serve` running?")


def _events(response: httpx.Response, url: str) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise MaasError(f"the server at {url} sent an event that is not JSON") from None
        if "error" in event:
            raise MaasError(f"the server stopped: {_error_text(event['error'])}")
        yield event


def _refusal(response: httpx.Response) -> MaasError:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    text = _error_text(error) if error else response.text[:200]
    return MaasError(f"the server answered {response.status_code}: {text}")


def _error_text(error: Any) -> str:
    """The message of an OpenAI-style error (``{"message", "type", "code"}``)."""
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)
