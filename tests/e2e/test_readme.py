"""The README's "Use" block, run as it is, against the server `make serve` starts, on a port
other than 8000: the CLI finds the server by itself, the demo chat model answers the first
question briefly and correctly with its default sampling parameters."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port
from tests.fixtures import make_tiny_llama

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    """The commands of the first shell block under "## Use", continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    use = text[text.index("## Use") :]
    block = re.search(r"```sh\n(.*?)```", use, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def make_serve_pins() -> str:
    """The models `make serve` pins (the Makefile's DEMO_PINS)."""
    makefile = (ROOT / "Makefile").read_text()
    return re.search(r"^DEMO_PINS := (.+)$", makefile, re.M).group(1).strip()


def shell_env() -> dict[str, str]:
    """A user's shell after `source .venv/bin/activate`: no MAAS_* settings of ours, but the
    test run's local cache (built kernels, measured choices), not the user's ~/.cache/maas."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # set in this process by its first compile
    env["MAAS_CACHE_DIR"] = os.environ["MAAS_CACHE_DIR"]
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    return env


def test_the_readme_use_block_runs_as_written_on_a_non_default_port(tmp_path):
    folder = tmp_path / "work"
    make_tiny_llama(folder / "my-llama")
    env = shell_env()
    demo = subprocess.run(["maas", "demo"], cwd=folder, env=env, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        ["maas", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=folder,
        env={**env, "MAAS_PIN_MODELS": make_serve_pins()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server never became ready"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        outputs = {}
        for command in readme_commands():
            if command.startswith("source "):
                continue
            stdin = "What is the capital of France?\n/exit\n" if " chat " in command else None
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=folder,
                env=env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            outputs[command] = done.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # never leave it running: stop it by its PID
            server.kill()
            code = server.wait(timeout=10)
        log.close()
    assert code == 0

    def output(starting: str) -> str:
        return next(out for command, out in outputs.items() if command.startswith(starting))

    answer = output("maas generate")
    assert "Paris" in answer and len(answer) < 400, answer  # brief and right, not rambling
    assert "Paris" in output("maas chat")
    assert "my-llama" in output("maas models list")
    assert "repetition_penalty" in output("maas models defaults")
    cards = {c["id"]: c for c in json.loads(output("curl -s $(maas url)/v1/models"))["data"]}
    assert cards["smollm2-135m-instruct"]["sampling_defaults"] == {
        "temperature": 0.0,
        "repetition_penalty": 1.1,
        "max_tokens": 256,
    }
    assert cards["my-llama@production"]["root"] == "my-llama:2"
    embedding = json.loads(output("curl -s $(maas url)/v1/embeddings"))
    assert len(embedding["data"][0]["embedding"]) == 384
    assert "smollm2-135m-instruct" in output("maas usage")
