"""The ``train`` job end to end, in-process: a dataset uploaded through /v1/files, a job
created over HTTP, a real worker (in this process) runs it, and the new version serves."""

from __future__ import annotations

import base64
import csv
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maas.jobs.worker import Worker
from maas.training import checkpoint as checkpoints


@pytest.fixture
def acme(tenant_keys):
    return tenant_keys


TINY = {"epochs": 3, "batch_size": 16, "image_size": 8, "arguments": {"channels": [4], "hidden": 8}}
"""A CNN small enough to train three epochs on ``few_digits`` in a second."""


def model_weights(client, *names: str) -> list[dict[str, torch.Tensor]]:
    """The weights of each named model's latest version, as the registry keeps them."""
    registry = client.app.state.registry
    return [
        load_file(registry.folder(registry.resolve(name)) / "model.safetensors") for name in names
    ]


def upload(client, headers, path: Path) -> str:
    with path.open("rb") as handle:
        answer = client.post(
            "/v1/files",
            headers=headers,
            files={"file": (path.name, handle.read())},
            data={"purpose": "dataset"},
        )
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def start(client, headers, **params) -> str:
    answer = client.post("/api/v1/jobs", headers=headers, json={"kind": "train", "params": params})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def run_jobs(settings, count: int = 1) -> None:
    worker = Worker(settings)
    try:
        assert worker.run(max_jobs=count) == count
    finally:
        worker.engine.dispose()


def test_the_digits_cnn_trains_past_95_percent_and_serves(app_client, acme, digits, settings):
    file_id = upload(app_client, acme["acme"], digits)
    job_id = start(
        app_client,
        acme["acme"],
        training_file=file_id,
        model="digits-cnn",
        epochs=8,
        arguments={"channels": [16, 32], "hidden": 64},
    )
    run_jobs(settings)
    job = app_client.get(f"/api/v1/jobs/{job_id}", headers=acme["acme"]).json()
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["val_accuracy"] >= 0.95 and result["reference"] == "digits-cnn:1"
    version = app_client.get("/api/v1/models/digits-cnn/versions/1", headers=acme["acme"]).json()
    manifest = version["manifest"]
    assert manifest["labels"] == [str(d) for d in range(10)]
    assert manifest["metrics"]["val_accuracy"] == result["val_accuracy"]
    assert manifest["recipe"]["params"]["training_file"] == file_id
    assert manifest["recipe"]["job"] == job_id
    # the model is private to acme, and serves a digit it is shown
    assert app_client.get("/api/v1/models/digits-cnn", headers=acme["globex"]).status_code == 404
    with zipfile.ZipFile(digits) as archive:
        seven = archive.read(sorted(n for n in archive.namelist() if "/7/" in n)[0])
    answer = app_client.post(
        "/v1/models/digits-cnn:predict",
        headers=acme["acme"],
        json={"instances": [{"b64": base64.b64encode(seven).decode()}]},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["label"] == "7"
    usage = app_client.get("/api/v1/usage?group_by=endpoint,model", headers=acme["acme"]).json()
    [metered] = [row for row in usage["data"] if row["group"]["endpoint"] == "JOB train"]
    assert (
        metered["group"]["model"] == "digits-cnn"
        and metered["items"] == result["usage"]["samples"] == 1438 * 8
    )  # the training split's images, each epoch
    events = app_client.get(f"/api/v1/jobs/{job_id}/events", headers=acme["acme"]).json()["data"]
    epochs = [e for e in events if e["message"].startswith("epoch ")]
    assert len(epochs) == 8 and {"val_loss", "train_loss", "samples_per_s"} <= set(
        epochs[0]["metrics"]
    )


def test_training_stopped_after_an_epoch_resumes_to_the_same_weights(
    app_client, acme, few_digits, settings, monkeypatch
):
    file_id = upload(app_client, acme["acme"], few_digits)
    common = {"training_file": file_id, **TINY, "checkpoint_every_seconds": 0}
    whole = start(app_client, acme["acme"], model="whole", **common)
    run_jobs(settings)
    halted = start(app_client, acme["acme"], model="halted", **common)
    worker = Worker(settings)
    commit = checkpoints.commit

    def commit_then_stop(*args, **kwargs):
        commit(*args, **kwargs)
        worker.stop.set()  # as SIGTERM does: the job goes back to the queue at its next report

    monkeypatch.setattr(checkpoints, "commit", commit_then_stop)
    assert worker.run(max_jobs=1) == 1
    worker.engine.dispose()
    monkeypatch.setattr(checkpoints, "commit", commit)
    paused = app_client.get(f"/api/v1/jobs/{halted}", headers=acme["acme"]).json()
    assert paused["status"] == "queued" and paused["checkpoint"]["epoch"] == 1
    run_jobs(settings)
    done = app_client.get(f"/api/v1/jobs/{halted}", headers=acme["acme"]).json()
    assert done["status"] == "succeeded" and done["attempt"] == 2
    events = app_client.get(f"/api/v1/jobs/{halted}/events", headers=acme["acme"]).json()["data"]
    assert any(e["message"] == "resumed after epoch 1 from its checkpoint" for e in events)
    weights = model_weights(app_client, "whole", "halted")
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert (
        app_client.get(f"/api/v1/jobs/{whole}", headers=acme["acme"]).json()["result"]["val_loss"]
        == done["result"]["val_loss"]
    )


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"model": "m"}, "params.training_file"),
        ({"training_file": "file-nope", "model": "m"}, "params.training_file"),
        ({"training_file": "{file}", "model": "m", "epochs": 0}, "params.epochs"),
        (
            {"training_file": "{file}", "model": "m", "arguments": {"num_classes": 3}},
            "params.arguments",
        ),
        ({"training_file": "{file}", "model": "m", "arguments": {"depth": 3}}, "params.arguments"),
        ({"training_file": "{file}", "model": "m", "optimizer": "lion"}, "params.optimizer"),
        ({"training_file": "{file}", "model": "m", "surprise": 1}, "params.surprise"),
        (
            {
                "training_file": "{file}",
                "model": "m",
                "architecture": "lstm-classifier",
                "arguments": {"vocab_size": 10},
            },
            "params.arguments",
        ),
        ({"training_file": "{file}", "model": "m", "architecture": "gpt"}, "params.architecture"),
        ({"training_file": "{file}", "model": "Bad Name!"}, "params.model"),
    ],
)
def test_bad_training_jobs_are_refused_before_they_are_queued(
    app_client, acme, few_digits, params, param
):
    file_id = upload(app_client, acme["acme"], few_digits)
    params = {k: (file_id if v == "{file}" else v) for k, v in params.items()}
    answer = app_client.post(
        "/api/v1/jobs", headers=acme["acme"], json={"kind": "train", "params": params}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_another_tenant_s_dataset_cannot_be_trained_on(app_client, acme, few_digits):
    file_id = upload(app_client, acme["acme"], few_digits)
    answer = app_client.post(
        "/api/v1/jobs",
        headers=acme["globex"],
        json={"kind": "train", "params": {"training_file": file_id, "model": "stolen"}},
    )
    assert answer.status_code == 400 and "no file" in answer.json()["error"]["message"]


def sentiment_csv(rows: int = 120) -> bytes:
    good = ["good", "great", "love", "fine", "happy"]
    bad = ["bad", "awful", "hate", "poor", "sad"]
    filler = ["the", "film", "was", "really", "so", "a", "day", "movie"]
    lines = ["text,label"]
    for n in range(rows):
        words = (good if n % 2 else bad)[n % 5 :: 2] + filler[n % 8 : n % 8 + 3]
        label = "positive" if n % 2 else "negative"
        lines.append(f"{' '.join(sorted(words, key=lambda w: (n * 7 + len(w)) % 5))},{label}")
    return ("\n".join(lines) + "\n").encode()


def sentiment_jsonl() -> bytes:
    """The same reviews as JSON Lines objects."""
    rows = csv.DictReader(io.StringIO(sentiment_csv().decode()))
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.mark.parametrize(
    ("architecture", "data"),
    [("lstm-classifier", "csv"), ("transformer-classifier", "csv"), ("lstm-classifier", "jsonl")],
)
def test_a_text_classifier_trains_from_a_csv_or_jsonl_and_serves(
    app_client, acme, settings, architecture, data, tmp_path
):
    path = tmp_path / f"reviews.{data}"
    path.write_bytes(sentiment_csv() if data == "csv" else sentiment_jsonl())
    file_id = upload(app_client, acme["acme"], path)
    arguments = (
        {"embedding_dim": 16, "hidden_size": 16}
        if architecture == "lstm-classifier"
        else {"d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32}
    )
    job_id = start(
        app_client,
        acme["acme"],
        training_file=file_id,
        model="reviews",
        architecture=architecture,
        arguments=arguments,
        epochs=15,
        batch_size=16,
        learning_rate=0.01,
        max_length=16,
    )
    run_jobs(settings)
    job = app_client.get(f"/api/v1/jobs/{job_id}", headers=acme["acme"]).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["val_accuracy"] >= 0.9
    manifest = app_client.get("/api/v1/models/reviews/versions/1", headers=acme["acme"]).json()[
        "manifest"
    ]
    assert manifest["task"] == "text-classification"
    assert manifest["labels"] == ["negative", "positive"]
    answer = app_client.post(
        "/v1/models/reviews:predict",
        headers=acme["acme"],
        json={"instances": ["a great film, love it", "awful, I hate it"]},
    )
    assert answer.status_code == 200, answer.text
    assert [p["label"] for p in answer.json()["predictions"]] == ["positive", "negative"]


def test_a_csv_without_the_named_columns_fails_the_job_with_a_clear_error(
    app_client, acme, settings, tmp_path
):
    csv_path = tmp_path / "other.csv"
    csv_path.write_bytes(b"sentence,sentiment\nok,pos\nbad,neg\n")
    file_id = upload(app_client, acme["acme"], csv_path)
    job_id = start(
        app_client, acme["acme"], training_file=file_id, model="m2", architecture="lstm-classifier"
    )
    run_jobs(settings)
    job = app_client.get(f"/api/v1/jobs/{job_id}", headers=acme["acme"]).json()
    assert job["status"] == "failed"
    assert job["error"]["message"] == "the CSV has no column 'text'; it has sentence, sentiment"
    assert "trace" not in job["error"]


def test_two_processes_train_exactly_what_one_does(app_client, acme, few_digits, settings):
    """Data parallel (DDP, gloo on loopback): the same seed and global batch give the same
    losses and weights as one process, within float tolerance."""
    file_id = upload(app_client, acme["acme"], few_digits)
    common = {"training_file": file_id, **TINY}
    alone = start(app_client, acme["acme"], model="alone", **common)
    pair = start(app_client, acme["acme"], model="pair", world_size=2, **common)
    run_jobs(settings, count=2)
    jobs = [app_client.get(f"/api/v1/jobs/{j}", headers=acme["acme"]).json() for j in (alone, pair)]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], jobs[1]["error"]
    events = [
        [
            e
            for e in app_client.get(f"/api/v1/jobs/{j}/events", headers=acme["acme"]).json()["data"]
            if e["message"].startswith("epoch ")
        ]
        for j in (alone, pair)
    ]
    assert len(events[0]) == len(events[1]) == 3
    for one, two in zip(*events, strict=True):
        for metric in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert two["metrics"][metric] == pytest.approx(
                one["metrics"][metric], rel=1e-4, abs=1e-6
            )
    weights = model_weights(app_client, "alone", "pair")
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6), key


def test_a_data_parallel_job_stopped_mid_run_resumes_to_the_same_weights(
    app_client, acme, few_digits, settings, monkeypatch
):
    from maas.jobs.worker import JobContext

    file_id = upload(app_client, acme["acme"], few_digits)
    common = {"training_file": file_id, **TINY, "checkpoint_every_seconds": 0}
    start(app_client, acme["acme"], model="alone", **common)
    run_jobs(settings)
    pair = start(app_client, acme["acme"], model="pair", world_size=2, **common)
    report = JobContext.report

    def stop_after_epoch_one(self, *args, **kwargs):
        if (kwargs.get("message") or "").startswith("epoch 1/"):
            self._stop.set()  # as SIGTERM does, while both training processes run
        return report(self, *args, **kwargs)

    monkeypatch.setattr(JobContext, "report", stop_after_epoch_one)
    run_jobs(settings)
    monkeypatch.setattr(JobContext, "report", report)
    paused = app_client.get(f"/api/v1/jobs/{pair}", headers=acme["acme"]).json()
    assert paused["status"] == "queued" and paused["checkpoint"]["epoch"] == 1
    run_jobs(settings)
    done = app_client.get(f"/api/v1/jobs/{pair}", headers=acme["acme"]).json()
    assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
    weights = model_weights(app_client, "alone", "pair")
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6), key
