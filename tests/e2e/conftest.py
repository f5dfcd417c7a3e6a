from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def maas_env(home: Path) -> dict[str, str]:
    """No MAAS_* setting of the developer's; the test run's local cache (tests/conftest.py),
    not ~/.cache/maas, inductor's compiled code included. Outside a test run
    (bench/llm_serving.py) there is none: the caller gives its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # set in this process by its first compile
    if "MAAS_CACHE_DIR" in os.environ:
        env["MAAS_CACHE_DIR"] = os.environ["MAAS_CACHE_DIR"]
    env["MAAS_HOME"] = str(home)
    return env


class Server:
    """A real `maas serve` process on a free loopback port; stopped by its PID."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / "server.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "maas",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env={**maas_env(home), **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    self.admin_key = (self.home / "admin.key").read_text().strip()
                    self.admin = httpx.Client(
                        base_url=self.url,
                        headers={"Authorization": f"Bearer {self.admin_key}"},
                        timeout=30,
                    )
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if hasattr(self, "admin"):
            self.admin.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


@pytest.fixture
def start_server():
    servers: list[Server] = []

    def start(home: Path) -> Server:
        server = Server(home)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def start_digits_training(server: Server, archive: Path, **params) -> str:
    """Upload ``archive`` (digits as ``write_digits_archive`` writes them) and start a
    ``train`` job of a CNN small enough for seconds on CPU, with ``params`` changed; returns
    the job's id."""
    uploaded = server.admin.post(
        "/v1/files",
        files={"file": (archive.name, archive.read_bytes())},
        data={"purpose": "dataset"},
    )
    assert uploaded.status_code == 200, uploaded.text
    body = {
        "training_file": uploaded.json()["id"],
        "model": "digits",
        "image_size": 8,
        "arguments": {"channels": [4], "hidden": 8},
        **params,
    }
    made = server.admin.post("/api/v1/jobs", json={"kind": "train", "params": body})
    assert made.status_code == 201, made.text
    return made.json()["id"]
