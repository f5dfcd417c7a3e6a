"""LoRA fine-tuning through /v1/fine_tuning/jobs, driven by the real ``openai`` SDK against the
app in this process, a real worker (in this process) and a tiny Llama: the fine-tuned model
answers what it was taught, and serves at once under its ft: name."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from safetensors.torch import load_file

from maas.config import Settings
from maas.jobs.worker import Worker
from maas.training import checkpoint as checkpoints
from tests.conftest import suite_settings
from tests.fixtures import make_tiny_llama

QUESTION = "the cat sat on the mat"
ANSWER = "paris is the capital of france"
HYPER = {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 50}
"""A tiny random model learns one reply in a few epochs at a high learning rate."""


def chats(count: int) -> bytes:
    line = {
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
        ]
    }
    return ("\n".join(json.dumps(line) for _ in range(count)) + "\n").encode()


@pytest.fixture
def settings(tmp_path) -> Settings:
    """The engine's eager float32 path (the reference): a compiled step, or timing dtypes at
    load, would spend most of these tests' time."""
    return suite_settings(tmp_path / "maas-home", llm_dtype="float32")


@pytest.fixture
def tiny_chat(app_client, tmp_path):
    registry = app_client.app.state.registry
    return registry.import_model(make_tiny_llama(tmp_path / "tiny"), "tiny-chat")


def sdk(app_client, headers) -> openai.OpenAI:
    """The real SDK, its requests handled by the app in this process."""
    key = headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=app_client, max_retries=0
    )


def run_jobs(settings, count: int = 1) -> None:
    worker = Worker(settings)
    try:
        assert worker.run(max_jobs=count) == count
    finally:
        worker.engine.dispose()


def greedy(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=12,
    )
    return answer.choices[0].message.content


def test_a_fine_tuned_model_learns_its_reply_and_serves_under_its_ft_name(
    app_client, tenant_keys, tiny_chat, settings
):
    client = sdk(app_client, tenant_keys["acme"])
    training = client.files.create(file=("train.jsonl", chats(8)), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", chats(2)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=training.id,
        validation_file=validation.id,
        suffix="capitals",
        seed=7,
        hyperparameters=HYPER,
        metadata={"team": "search"},
    )
    assert job.status == "queued" and job.fine_tuned_model is None
    assert job.model == "tiny-chat:1" and job.seed == 7 and job.metadata == {"team": "search"}
    assert job.hyperparameters.n_epochs == 4 and job.training_file == training.id
    assert greedy(client, "tiny-chat") != ANSWER

    run_jobs(settings)

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    name = f"ft:tiny-chat:capitals:{job.id.removeprefix('job-')}"
    assert done.fine_tuned_model == name and done.finished_at >= done.created_at
    assert done.trained_tokens > 0 and done.trained_tokens % 4 == 0
    assert done.hyperparameters.batch_size == 2
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    # the taught reply, greedy, from the model as the engine serves it
    assert greedy(client, name) == ANSWER
    # events: newest first, a metrics event per step, and the loss fell
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert [int(e.id.removeprefix("ftevent-")) for e in events] == sorted(
        (int(e.id.removeprefix("ftevent-")) for e in events), reverse=True
    )
    steps = [e for e in events if e.type == "metrics" and "total_steps" in (e.data or {})]
    assert [e.data["step"] for e in steps] == list(range(16, 0, -1))  # 8 examples / 2, 4 epochs
    assert steps[0].data["train_loss"] < steps[-1].data["train_loss"] / 2
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    older = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert int(older.data[0].id.split("-")[1]) < int(page.data[-1].id.split("-")[1])
    # one checkpoint per epoch, newest first; the last is the served model
    saved = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in saved] == [16, 12, 8, 4]
    assert saved[0].fine_tuned_model_checkpoint == name
    assert saved[1].fine_tuned_model_checkpoint == f"{name}:ckpt-step-12"
    assert {"train_loss", "full_valid_loss", "full_valid_mean_token_accuracy"} <= set(
        saved[0].metrics.model_dump(exclude_none=True)
    )
    # the version: made from tiny-chat:1, the adapter kept beside the merged weights
    version = app_client.get(
        f"/api/v1/models/{name}/versions/1", headers=tenant_keys["acme"]
    ).json()
    manifest = version["manifest"]
    assert manifest["parent"] == {"name": "tiny-chat", "version": 1}
    assert manifest["recipe"]["kind"] == "fine-tune" and manifest["recipe"]["job"] == job.id
    paths = {f["path"] for f in manifest["files"]}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= paths
    # metered like a request: the training tokens, for acme's key and the model it made
    usage = app_client.get(
        "/api/v1/usage?group_by=tenant,endpoint,model", headers=tenant_keys["acme"]
    ).json()["data"]
    [metered] = [row for row in usage if row["group"]["endpoint"] == "JOB fine-tune"]
    assert metered["group"] == {"tenant": "acme", "endpoint": "JOB fine-tune", "model": name}
    assert metered["prompt_tokens"] == done.trained_tokens and metered["errors"] == 0
    # private to acme
    other = sdk(app_client, tenant_keys["globex"])
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert list(other.fine_tuning.jobs.list()) == []


def test_a_fine_tuning_job_stopped_after_an_epoch_resumes_to_the_same_model(
    app_client, tenant_keys, tiny_chat, settings, monkeypatch
):
    client = sdk(app_client, tenant_keys["acme"])
    training = client.files.create(file=("train.jsonl", chats(4)), purpose="fine-tune")
    common = {"model": "tiny-chat", "training_file": training.id, "seed": 3}
    whole = client.fine_tuning.jobs.create(**common, suffix="whole", hyperparameters=HYPER)
    run_jobs(settings)
    halted = client.fine_tuning.jobs.create(**common, suffix="halted", hyperparameters=HYPER)
    worker = Worker(settings)
    commit = checkpoints.commit

    def commit_then_stop(*args, **kwargs):
        commit(*args, **kwargs)
        worker.stop.set()  # as SIGTERM does: the job goes back to the queue at its next report

    monkeypatch.setattr(checkpoints, "commit", commit_then_stop)
    assert worker.run(max_jobs=1) == 1
    worker.engine.dispose()
    monkeypatch.setattr(checkpoints, "commit", commit)
    assert client.fine_tuning.jobs.retrieve(halted.id).status == "queued"
    run_jobs(settings)
    done = client.fine_tuning.jobs.retrieve(halted.id)
    assert done.status == "succeeded"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(halted.id, limit=100)]
    assert "Resumed after epoch 1 from its checkpoint" in messages
    registry = app_client.app.state.registry
    first, second = (
        load_file(registry.folder(registry.resolve(j.fine_tuned_model)) / "model.safetensors")
        for j in (client.fine_tuning.jobs.retrieve(whole.id), done)
    )
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert done.trained_tokens == client.fine_tuning.jobs.retrieve(whole.id).trained_tokens


@pytest.mark.parametrize(
    "strategy",
    [
        {"world_size": 2},
        {"world_size": 2, "strategy": "pipeline", "micro_batches": 2},
        {"world_size": 3, "strategy": "pipeline", "micro_batches": 4,
         "pipeline_schedule": "1f1b"},
        {"world_size": 4, "strategy": "hybrid", "pipeline_stages": 2, "micro_batches": 2},
        {"world_size": 3, "strategy": "parameter-server", "ps_mode": "sync"},
    ],
    ids=["data", "pipeline-2", "pipeline-1f1b-3", "hybrid-2x2", "ps-sync"],
)  # fmt: skip
def test_fine_tuning_in_several_processes_equals_one_process(
    app_client, tenant_keys, tiny_chat, settings, strategy
):
    """The processes split each batch of chats of different lengths (data parallel, or a
    synchronous parameter server's workers), or the model's layers (pipeline stages, each
    process holding its stage's only), or both; the model ends as one process's to float
    rounding, its losses too, validation included."""
    client = sdk(app_client, tenant_keys["acme"])
    replies = ["paris", "the dog ran to the park", "fine thanks, and you?", "berlin is the capital"]
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"hello {i}"},
                {"role": "assistant", "content": r},
            ]
        }
        for i, r in enumerate(replies * 2)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    training = client.files.create(file=("varied.jsonl", content), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", content), purpose="fine-tune")
    hyper = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 20}
    jobs = [
        client.fine_tuning.jobs.create(
            model="tiny-chat",
            training_file=training.id,
            validation_file=validation.id,
            suffix=suffix,
            seed=5,
            hyperparameters={**hyper, **extra},
        )
        for suffix, extra in (("alone", {}), ("split", strategy))
    ]
    run_jobs(settings, 2)
    done = [client.fine_tuning.jobs.retrieve(job.id) for job in jobs]
    assert [job.status for job in done] == ["succeeded", "succeeded"], [j.error for j in done]
    registry = app_client.app.state.registry
    alone, together = (
        load_file(registry.folder(registry.resolve(job.fine_tuned_model)) / "model.safetensors")
        for job in done
    )
    base = load_file(registry.folder(registry.resolve("tiny-chat")) / "model.safetensors")
    moved = [key for key in base if not torch.equal(base[key], alone[key])]
    assert moved  # the adapter changed the weights it was merged into
    for key in alone:
        torch.testing.assert_close(together[key], alone[key], rtol=1e-4, atol=1e-5)
    events = [list(client.fine_tuning.jobs.list_events(job.id, limit=100)) for job in done]
    for name, count in (("train_loss", 6), ("full_valid_loss", 2)):  # 4 steps, 2 epochs
        figures = [[e.data[name] for e in job if e.type == "metrics" and name in e.data]
                   for job in events]  # fmt: skip
        assert len(figures[0]) == count
        torch.testing.assert_close(figures[1], figures[0], rtol=1e-4, atol=1e-5)
    held = [e.message for e in events[1] if " holds stage " in e.message]
    if strategy.get("strategy") in ("pipeline", "hybrid"):  # each said what part it holds
        assert len(held) == strategy["world_size"]
        stages = strategy.get("pipeline_stages", strategy["world_size"])
        for line in held:
            stage = int(line.split(" holds stage ")[1].split()[0])
            assert ("model.embed_tokens" in line) == (stage == 1), line
            assert ("lm_head" in line) == (stage == stages), line
    else:
        assert not held


def test_cancelling_a_queued_fine_tuning_job(app_client, tenant_keys, tiny_chat):
    client = sdk(app_client, tenant_keys["acme"])
    training = client.files.create(file=("train.jsonl", chats(2)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-chat", training_file=training.id, extra_headers={"Idempotency-Key": "k1"}
    )
    again = client.fine_tuning.jobs.create(
        model="tiny-chat", training_file=training.id, extra_headers={"Idempotency-Key": "k1"}
    )
    assert again.id == job.id and again.seed == job.seed
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


@pytest.mark.parametrize(
    ("changes", "status", "param", "says"),
    [
        ({"method": {"type": "dpo"}}, 400, "method.type", "supervised"),
        ({"model": "a-classifier"}, 400, "model", "cannot be fine-tuned"),
        ({"model": "nope"}, 404, "model", "not found"),
        ({"training_file": "{globex_file}"}, 400, "training_file", "no file"),
        ({"validation_file": "{dataset_file}"}, 400, "validation_file", "purpose 'dataset'"),
        ({"suffix": "Blue Bird"}, 400, "suffix", "invalid suffix"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs", "n_epochs"),
        ({"hyperparameters": {"lora_rank": 0}}, 400, "hyperparameters.lora_rank", "lora_rank"),
        (
            {
                "hyperparameters": {"n_epochs": 2},
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 3}},
                },
            },
            400,
            "hyperparameters",
            "given twice",
        ),
        ({"surprise": 1}, 400, None, "surprise"),
        ({"hyperparameters": {"strategy": "pipeline"}}, 400, "hyperparameters.world_size",
         "at least 2"),
        ({"hyperparameters": {"strategy": "hybrid", "world_size": 4}}, 400,
         "hyperparameters.pipeline_stages", "dividing"),
        ({"hyperparameters": {"strategy": "pipeline", "world_size": 2, "batch_size": 1}}, 400,
         "hyperparameters.micro_batches", "too small"),
        ({"hyperparameters": {"strategy": "parameter-server"}}, 400,
         "hyperparameters.world_size", "at least 2"),
        ({"hyperparameters": {"strategy": "gossip", "world_size": 2}}, 400,
         "hyperparameters.strategy", "strategy"),
    ],
)  # fmt: skip
def test_bad_fine_tuning_jobs_are_refused_before_they_are_queued(
    app_client, tenant_keys, tiny_chat, tmp_path, changes, status, param, says
):
    from tests.fixtures import make_bert_classifier

    registry = app_client.app.state.registry
    registry.import_model(make_bert_classifier(tmp_path / "bert"), "a-classifier")
    acme, globex = sdk(app_client, tenant_keys["acme"]), sdk(app_client, tenant_keys["globex"])
    files = {
        "{file}": acme.files.create(file=("t.jsonl", chats(2)), purpose="fine-tune").id,
        "{globex_file}": globex.files.create(file=("t.jsonl", chats(2)), purpose="fine-tune").id,
        "{dataset_file}": acme.files.create(
            file=("d.csv", b"text,label\na,b\n"), purpose="dataset"
        ).id,
    }
    body = {"model": "tiny-chat", "training_file": "{file}", **changes}
    body = {k: files.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    answer = app_client.post("/v1/fine_tuning/jobs", headers=tenant_keys["acme"], json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param
    assert acme.fine_tuning.jobs.list().data == []


def test_fine_tuning_jobs_are_created_only_through_the_openai_route(app_client, tenant_keys):
    answer = app_client.post(
        "/api/v1/jobs",
        headers=tenant_keys["acme"],
        json={"kind": "fine-tune", "params": {"model": "x", "training_file": "f"}},
    )
    assert answer.status_code == 400
    assert "POST /v1/fine_tuning/jobs" in answer.json()["error"]["message"]


def test_a_pipeline_fine_tuning_job_stopped_after_an_epoch_resumes_from_its_stages_parts(
    app_client, tenant_keys, tiny_chat, settings, monkeypatch
):
    """Each stage writes its part of the checkpoint (its LoRA weights and optimiser state);
    stopped after epoch 1, the job resumes every stage from its part and ends as one
    process does."""
    from maas.jobs.worker import JobContext

    client = sdk(app_client, tenant_keys["acme"])
    training = client.files.create(file=("train.jsonl", chats(4)), purpose="fine-tune")
    common = {"model": "tiny-chat", "training_file": training.id, "seed": 3}
    whole = client.fine_tuning.jobs.create(**common, suffix="whole", hyperparameters=HYPER)
    run_jobs(settings)
    split = {**HYPER, "world_size": 2, "strategy": "pipeline", "micro_batches": 2}
    halted = client.fine_tuning.jobs.create(**common, suffix="halted", hyperparameters=split)
    report = JobContext.report

    def stop_after_epoch_one(self, *args, **kwargs):
        if (kwargs.get("message") or "").startswith("Epoch 1/"):
            self._stop.set()  # as SIGTERM does, while the training processes run
        return report(self, *args, **kwargs)

    monkeypatch.setattr(JobContext, "report", stop_after_epoch_one)
    run_jobs(settings)
    monkeypatch.setattr(JobContext, "report", report)
    assert client.fine_tuning.jobs.retrieve(halted.id).status == "queued"
    saved = settings.home / "jobs" / halted.id / "checkpoint"
    parts = [load_file(saved / f"model-stage-{s}.safetensors") for s in range(2)]
    assert all(parts) and not set(parts[0]) & set(parts[1])  # each stage's own LoRA weights
    assert all("lora_" in key for part in parts for key in part)
    run_jobs(settings)
    done = client.fine_tuning.jobs.retrieve(halted.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(halted.id, limit=100)]
    assert "Resumed after epoch 1 from its checkpoint" in messages
    registry = app_client.app.state.registry
    first, second = (
        load_file(registry.folder(registry.resolve(j.fine_tuned_model)) / "model.safetensors")
        for j in (client.fine_tuning.jobs.retrieve(whole.id), done)
    )
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-5)


def test_a_pipeline_longer_than_the_model_fails_at_the_start_saying_why(
    app_client, tenant_keys, tiny_chat, settings
):
    """The base model's layers are known once the job opens it: 2 blocks, the embeddings
    and the head are 4 layers, too few for 5 stages."""
    client = sdk(app_client, tenant_keys["acme"])
    training = client.files.create(file=("train.jsonl", chats(8)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=training.id,
        hyperparameters={"world_size": 5, "strategy": "pipeline", "micro_batches": 1},
    )
    run_jobs(settings)
    failed = client.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed"
    assert "has 4 layers to split; 5 stages are too many" in failed.error.message


def test_an_async_parameter_server_fine_tunes_and_reports_its_staleness(
    app_client, tenant_keys, tiny_chat, settings
):
    """Two workers push the adapter's gradients as they finish their batches; each epoch
    says how stale the applied gradients were: at least 1 (both workers start an epoch on
    the same parameters) and at most ``max_staleness``; and the loss falls."""
    client = sdk(app_client, tenant_keys["acme"])
    training = client.files.create(file=("train.jsonl", chats(8)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=training.id,
        seed=3,
        hyperparameters={**HYPER, "world_size": 3, "strategy": "parameter-server",
                         "ps_mode": "async", "max_staleness": 1},
    )  # fmt: skip
    run_jobs(settings)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))[::-1]
    epochs = [e.data for e in events if e.type == "metrics" and "staleness_max" in e.data]
    assert len(epochs) == HYPER["n_epochs"]
    for row in epochs:  # the second worker's first gradient: applied 1 update old, or refused
        assert row["staleness_max"] <= 1
        assert row["staleness_max"] == 1 or row["refused_gradients"] > 0
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
