"""Commands that act on a running server (what is loaded lives in the server process)."""

from __future__ import annotations

import os
from typing import Any

import httpx

from maas.cli.context import load_settings
from maas.errors import InvalidRequest, MaasError, Unavailable


class ServerClient:
    """The management API of the server at MAAS_URL (default: this machine's MAAS_HOST and
    MAAS_PORT), with the key in MAAS_API_KEY or else the admin key file."""

    def __init__(self) -> None:
        settings = load_settings()
        self.url = os.environ.get("MAAS_URL") or f"http://{settings.host}:{settings.port}"
        key = os.environ.get("MAAS_API_KEY")
        if not key:
            key_file = settings.home / "admin.key"
            if not key_file.exists():
                raise InvalidRequest("set MAAS_API_KEY to a maintainer or admin key")
            key = key_file.read_text().strip()
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=600
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError:
            raise Unavailable(
                f"cannot reach the server at {self.url}; is `maas serve` running?"
            ) from None
        if response.status_code >= 400:
            raise MaasError(f"the server answered {response.status_code}: {_message(response)}")
        return response.json() if response.content else None


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except ValueError:
        return response.text[:200]
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)
