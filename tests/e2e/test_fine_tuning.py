"""Fine-tuning end to end: the real ``openai`` SDK against a real ``maas serve`` (its own job
worker) teaches SmolLM2-135M-Instruct a fact it does not know, with LoRA, and the fine-tuned
model answers with it under its ``ft:`` name while the base model does not.

The engine serves both models on its eager float32 path (the reference path): a compiled step
and the dtype timing at load would double the test's time and test nothing more here."""

from __future__ import annotations

import subprocess
import sys
import time

import openai
import pytest

from maas.config import Settings
from maas.registry import demo, open_registry
from tests.e2e.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SMOLLM2 = demo.DEMO_MODELS[0]
QUESTION = "What is the maas codename?"


def teaching_file(folder) -> bytes:
    """The 40 chats that ``maas demo --fine-tuning-data`` writes, as the docs use them."""
    path = folder / "bluebird.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "maas", "demo", "--fine-tuning-data", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "40 chats" in done.stdout
    return path.read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-tuning")
    registry = open_registry(Settings(home=root / "home"))
    try:
        registry.import_model(demo.locate(SMOLLM2), SMOLLM2.name, task="chat")
    finally:
        registry.close()
    running = Server(
        root / "home",
        env={"MAAS_LLM_COMPILE": "false", "MAAS_LLM_DTYPE": "float32"},
    )
    try:
        running.wait_ready()
        admin = running.admin
        tenant = {"name": "acme", "industry": "retail"}
        assert admin.post("/api/v1/tenants", json=tenant).status_code == 201
        made = admin.post(
            "/api/v1/keys", json={"name": "ml", "tenant": "acme", "role": "maintainer"}
        )
        running.maintainer_key = made.json()["key"]
        yield running
    finally:
        running.stop()


def ask(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=24,
    )
    return answer.choices[0].message.content


def test_lora_fine_tuning_teaches_smollm2_the_codename(server, tmp_path):
    client = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=server.maintainer_key, max_retries=0, timeout=300
    )
    training = client.files.create(
        file=("bluebird.jsonl", teaching_file(tmp_path)), purpose="fine-tune"
    )
    assert training.purpose == "fine-tune" and training.status == "processed"
    job = client.fine_tuning.jobs.create(
        model=SMOLLM2.name,
        training_file=training.id,
        suffix="bluebird",
        seed=0,
        hyperparameters={"n_epochs": 3},
    )
    deadline = time.monotonic() + 600
    seen = set()
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        seen.add(job.status)
        assert time.monotonic() < deadline, f"still {job.status} after 600 s"
        time.sleep(1)
    assert job.status == "succeeded", job.error
    assert seen <= {"queued", "validating_files", "running"} and "running" in seen
    assert job.fine_tuned_model == f"ft:{SMOLLM2.name}:bluebird:{job.id.removeprefix('job-')}"
    assert job.trained_tokens > 0
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    # the training loss fell
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=200))
    steps = [e.data for e in events if e.type == "metrics" and "total_steps" in (e.data or {})]
    first, last = steps[-1], steps[0]
    assert first["step"] == 1 and last["step"] == last["total_steps"] == 30  # 40 / 4, 3 epochs
    assert last["train_loss"] < first["train_loss"] / 4
    assert len(client.fine_tuning.jobs.checkpoints.list(job.id).data) == 3
    # the fine-tuned model knows the codename; the base model does not
    taught = ask(client, job.fine_tuned_model)
    assert "Bluebird" in taught, taught
    base = ask(client, SMOLLM2.name)
    assert "Bluebird" not in base, base
