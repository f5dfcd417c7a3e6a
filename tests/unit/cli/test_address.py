"""The CLI finds the server running on its MAAS_HOME, whatever port it was started on."""

from __future__ import annotations

import json
import subprocess
import sys

from maas.cli import address
from maas.cli.remote import ServerClient
from maas.config import Settings


def test_the_cli_uses_the_address_the_running_server_recorded(settings, monkeypatch):
    monkeypatch.setenv("MAAS_API_KEY", "maas-aaaaaaaaaaaa_x")
    assert ServerClient().url == "http://127.0.0.1:8000"
    address.record(settings.model_copy(update={"port": 9123}))
    assert ServerClient().url == "http://127.0.0.1:9123"
    monkeypatch.setenv("MAAS_URL", "http://elsewhere:1")
    assert ServerClient().url == "http://elsewhere:1"  # an explicit URL wins
    monkeypatch.delenv("MAAS_URL")
    address.forget(settings)
    assert ServerClient().url == "http://127.0.0.1:8000"


def test_a_server_that_died_without_cleaning_up_is_ignored(settings, monkeypatch):
    monkeypatch.setenv("MAAS_API_KEY", "maas-aaaaaaaaaaaa_x")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    settings.home.mkdir(parents=True, exist_ok=True)
    entry = {"url": "http://127.0.0.1:9555", "pid": int(gone.stdout)}
    (settings.home / address.SERVER_FILE).write_text(json.dumps(entry))
    assert address.recorded_url(settings) is None
    assert ServerClient().url == "http://127.0.0.1:8000"


def test_a_server_bound_to_every_interface_is_reached_on_loopback():
    assert address.url_of("0.0.0.0", 9000) == "http://127.0.0.1:9000"
    assert address.url_of("::", 9000) == "http://[::1]:9000"
    assert address.url_of("10.0.0.5", 80) == "http://10.0.0.5:80"


def test_forget_leaves_another_servers_record(settings):
    address.record(settings)
    path = settings.home / address.SERVER_FILE
    entry = json.loads(path.read_text()) | {"pid": 1}
    path.write_text(json.dumps(entry))
    address.forget(Settings(home=settings.home))
    assert path.exists()
