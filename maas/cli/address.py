"""Where the running server listens, kept in its home, so that the CLI finds a server started
on any port (``PORT=9000 make serve``) without being told."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from maas.auth.bootstrap import write_secret_file
from maas.config import Settings

SERVER_FILE = "server.json"
ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def url_of(host: str, port: int) -> str:
    """The URL a client on this machine reaches the server at (loopback for 0.0.0.0)."""
    host = ANY_ADDRESS.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def server_url(settings: Settings) -> str:
    """The server the CLI talks to: MAAS_URL; else the one running on ``settings.home``,
    wherever it listens; else MAAS_HOST and MAAS_PORT."""
    return (
        os.environ.get("MAAS_URL") or recorded_url(settings) or url_of(settings.host, settings.port)
    )


def record(settings: Settings) -> None:
    """Note this process as the server of ``settings.home``."""
    entry = {"url": url_of(settings.host, settings.port), "pid": os.getpid()}
    write_secret_file(_path(settings), json.dumps(entry) + "\n")


def forget(settings: Settings) -> None:
    """Remove the note, if it is still this process's."""
    if _read(_path(settings)).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            _path(settings).unlink()


def recorded_url(settings: Settings) -> str | None:
    """The URL of the server running on ``settings.home``, if one is."""
    entry = _read(_path(settings))
    pid, url = entry.get("pid"), entry.get("url")
    if not isinstance(pid, int) or not isinstance(url, str) or not _alive(pid):
        return None  # none recorded, or a server that was killed without cleaning up
    return url


def _path(settings: Settings) -> Path:
    return settings.home / SERVER_FILE


def _read(path: Path) -> dict:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entry if isinstance(entry, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
