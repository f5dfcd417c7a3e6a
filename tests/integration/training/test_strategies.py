"""Training strategies beyond data parallel, as ``train`` jobs run by a real worker:
``pipeline`` (GPipe and 1F1B) and synchronous ``parameter-server`` give one process's losses
and weights on the same batches; ``hybrid`` (2 pipelines x 2 stages) too; asynchronous
``parameter-server`` measures and bounds its staleness and still learns the digits."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.training.test_train_job import (
    TINY,
    model_weights,
    run_jobs,
    start,
    upload,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def acme(tenant_keys):
    return tenant_keys


def epochs(client, headers, job_id: str) -> list[dict]:
    events = client.get(f"/api/v1/jobs/{job_id}/events", headers=headers).json()["data"]
    return [e["metrics"] for e in events if e["message"].startswith("epoch ")]


def held_bytes(client, headers, job_id: str) -> dict[int, tuple[int, int, int]]:
    """What each rank said it holds: rank -> (stage, bytes held, the model's bytes)."""
    events = client.get(f"/api/v1/jobs/{job_id}/events", headers=headers).json()["data"]
    pattern = re.compile(
        r"rank (\d+) holds stage (\d+) of \d+ \(.+\): ([\d,]+) of the model's ([\d,]+)"
    )
    held = {}
    for event in events:
        if match := pattern.match(event["message"]):
            rank, stage, mine, total = (int(g.replace(",", "")) for g in match.groups())
            held[rank] = (stage, mine, total)
    return held


def finished(client, headers, *job_ids: str) -> None:
    for job_id in job_ids:
        job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).json()
        assert job["status"] == "succeeded", job["error"]


@pytest.mark.parametrize(
    "strategy",
    [
        {"strategy": "pipeline", "world_size": 2, "micro_batches": 4},
        {"strategy": "pipeline", "world_size": 3, "micro_batches": 4, "pipeline_schedule": "1f1b"},
        {"strategy": "parameter-server", "world_size": 3, "ps_mode": "sync"},
        {"strategy": "hybrid", "world_size": 4, "pipeline_stages": 2, "micro_batches": 2},
    ],
    ids=["pipeline-gpipe", "pipeline-1f1b-3", "ps-sync", "hybrid-2x2"],
)
def test_a_strategy_trains_exactly_what_one_process_does(
    app_client, acme, few_digits, settings, strategy
):
    headers = acme["acme"]
    file_id = upload(app_client, headers, few_digits)
    common = {"training_file": file_id, **TINY}
    alone = start(app_client, headers, model="alone", **common)
    split = start(app_client, headers, model="split", **common, **strategy)
    run_jobs(settings, count=2)
    finished(app_client, headers, alone, split)
    rows = [epochs(app_client, headers, job) for job in (alone, split)]
    assert len(rows[0]) == len(rows[1]) == 3
    for one, other in zip(*rows, strict=True):
        for metric in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert other[metric] == pytest.approx(one[metric], rel=1e-4, abs=1e-6), metric
    weights = model_weights(app_client, "alone", "split")
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6), key
    if strategy["strategy"] != "parameter-server":  # each rank holds its stage's layers only
        held = held_bytes(app_client, headers, split)
        assert sorted(held) == list(range(strategy["world_size"]))
        model_bytes = sum(t.numel() * t.element_size() for t in weights[0].values())
        stages: dict[int, int] = {}
        for stage, mine, total in held.values():
            assert total == model_bytes and 0 < mine < total
            assert stages.setdefault(stage, mine) == mine  # a stage's copies hold the same
        assert sum(stages.values()) == model_bytes


def test_a_pipeline_trains_batches_of_every_size_as_one_process_does(
    app_client, acme, few_digits, settings
):
    """96 samples in batches of 14: 6 batches cut into 2 micro-batches of 7 (4 do not divide
    14), and a last batch of 12 cut into 4 of 3, each size with its own schedule."""
    headers = acme["acme"]
    file_id = upload(app_client, headers, few_digits)
    common = {"training_file": file_id, **TINY, "batch_size": 14}
    alone = start(app_client, headers, model="alone", **common)
    split = start(
        app_client, headers, model="split", strategy="pipeline", world_size=2, micro_batches=4,
        **common,
    )  # fmt: skip
    run_jobs(settings, count=2)
    finished(app_client, headers, alone, split)
    rows = [epochs(app_client, headers, job) for job in (alone, split)]
    for one, other in zip(*rows, strict=True):
        assert other["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4, abs=1e-6)
    weights = model_weights(app_client, "alone", "split")
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6), key


def test_an_async_parameter_server_reports_and_bounds_staleness(
    app_client, acme, few_digits, settings
):
    headers = acme["acme"]
    file_id = upload(app_client, headers, few_digits)
    common = {"training_file": file_id, **TINY, "strategy": "parameter-server", "world_size": 3}
    free = start(app_client, headers, model="free", ps_mode="async", **common)
    fresh = start(app_client, headers, model="fresh", ps_mode="async", max_staleness=0, **common)
    run_jobs(settings, count=2)
    finished(app_client, headers, free, fresh)
    free_rows, fresh_rows = (epochs(app_client, headers, job) for job in (free, fresh))
    for row in free_rows:  # each epoch both workers start on the same parameters, so the
        # second gradient applied is at least 1 update old (a slow worker's may be far older)
        assert row["staleness_max"] >= 1 and 0 <= row["staleness_mean"] <= row["staleness_max"]
        assert row["refused_gradients"] == 0
    assert all(row["staleness_max"] == 0 for row in fresh_rows)
    assert sum(row["refused_gradients"] for row in fresh_rows) > 0
    assert free_rows[-1]["train_loss"] < free_rows[0]["train_loss"]


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"strategy": "pipeline"}, "params.world_size", "at least 2"),
        ({"strategy": "hybrid", "world_size": 4}, "params.pipeline_stages", "dividing"),
        ({"strategy": "hybrid", "world_size": 4, "pipeline_stages": 4}, "params.pipeline_stages",
         "2 or more pipelines"),
        ({"strategy": "pipeline", "world_size": 4, "architecture": "lstm-classifier"},
         "params.world_size", "3 layers to split"),
        ({"strategy": "pipeline", "world_size": 2, "batch_size": 3}, "params.micro_batches",
         "too small"),
        ({"strategy": "data", "world_size": 2, "pipeline_stages": 2}, "params.strategy",
         "pipeline_stages is for"),
        ({"strategy": "pipeline", "world_size": 3, "pipeline_schedule": "1f1b",
          "micro_batches": 2}, "params.micro_batches", "at least as many"),
        ({"strategy": "gossip", "world_size": 2}, "params.strategy", ""),
    ],
)  # fmt: skip
def test_a_strategy_that_cannot_run_is_refused_before_it_is_queued(
    app_client, acme, few_digits, params, field, message
):
    headers = acme["acme"]
    file_id = upload(app_client, headers, few_digits)
    body = {"kind": "train", "params": {"training_file": file_id, "model": "m", **params}}
    answer = app_client.post("/api/v1/jobs", headers=headers, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and message in error["message"], error


TEXT = {"epochs": 15, "batch_size": 16, "learning_rate": 0.01, "max_length": 16}
ARCHITECTURES = {
    "small-cnn": {"epochs": 12, "arguments": {"channels": [16, 32], "hidden": 64}},
    "lstm-classifier": {**TEXT, "arguments": {"embedding_dim": 16, "hidden_size": 16}},
    "transformer-classifier": {
        **TEXT,
        "arguments": {"d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32},
    },
}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_an_async_parameter_server_learns_as_well_as_one_process(
    app_client, acme, digits, settings, tmp_path, architecture
):
    """Within 1 point of one process's validation accuracy: the digits CNN, and the two text
    classifiers on the reviews (pipeline and synchronous strategies equal one process's
    weights, above). Both trained to where one process stops improving: stale gradients
    (about one update old) learn a little slower, so after 8 epochs, still improving, the
    server stood 0.6 to 1.1 points behind (347 to 349 of 359 right, against 351; 1 point
    is 3.6 images); after 12 it was at 350 to 351 in six runs."""
    from tests.integration.training.test_train_job import sentiment_csv

    headers = acme["acme"]
    if architecture == "small-cnn":
        file_id = upload(app_client, headers, digits)
    else:
        reviews = tmp_path / "reviews.csv"
        reviews.write_bytes(sentiment_csv())
        file_id = upload(app_client, headers, reviews)
    common = {"training_file": file_id, "architecture": architecture, **ARCHITECTURES[architecture]}
    alone = start(app_client, headers, model="alone", **common)
    server = start(
        app_client,
        headers,
        model="ps",
        strategy="parameter-server",
        ps_mode="async",
        world_size=3,
        **common,
    )
    run_jobs(settings, count=2)
    finished(app_client, headers, alone, server)
    one, ps = (
        app_client.get(f"/api/v1/jobs/{job}", headers=headers).json()["result"]
        for job in (alone, server)
    )
    assert ps["val_accuracy"] >= one["val_accuracy"] - 0.01, (ps, one)
    assert one["val_accuracy"] >= 0.9


@pytest.mark.parametrize(
    "strategy",
    [
        {"strategy": "pipeline", "world_size": 2, "micro_batches": 2},
        {"strategy": "parameter-server", "world_size": 3, "ps_mode": "sync"},
        {"strategy": "parameter-server", "world_size": 3, "ps_mode": "async"},
    ],
    ids=["pipeline", "ps-sync", "ps-async"],
)
def test_a_job_stopped_mid_run_stops_every_process_and_resumes(
    app_client, acme, few_digits, settings, monkeypatch, strategy
):
    """A stop reaches every process at once, whatever each is waiting on (a schedule's
    send, a server's reply); the next attempt resumes from the checkpoint, and the
    equal-to-one-process strategies end with one process's weights."""
    from maas.jobs.worker import JobContext

    headers = acme["acme"]
    file_id = upload(app_client, headers, few_digits)
    common = {"training_file": file_id, **TINY, "checkpoint_every_seconds": 0}
    start(app_client, headers, model="alone", **common)
    run_jobs(settings)
    split = start(app_client, headers, model="split", **common, **strategy)
    report = JobContext.report

    def stop_after_epoch_one(self, *args, **kwargs):
        if (kwargs.get("message") or "").startswith("epoch 1/"):
            self._stop.set()  # as SIGTERM does, while the training processes run
        return report(self, *args, **kwargs)

    monkeypatch.setattr(JobContext, "report", stop_after_epoch_one)
    run_jobs(settings)
    monkeypatch.setattr(JobContext, "report", report)
    paused = app_client.get(f"/api/v1/jobs/{split}", headers=headers).json()
    assert paused["status"] == "queued" and paused["checkpoint"]["epoch"] == 1
    if strategy["strategy"] == "pipeline":  # a part per stage, together the whole model
        saved = settings.home / "jobs" / split / "checkpoint"
        parts = [load_file(saved / f"model-stage-{s}.safetensors") for s in range(2)]
        assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
        assert set(parts[0]) | set(parts[1]) == set(model_weights(app_client, "alone")[0])
    run_jobs(settings)
    done = app_client.get(f"/api/v1/jobs/{split}", headers=headers).json()
    assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
    if strategy.get("ps_mode") != "async":
        weights = model_weights(app_client, "alone", "split")
        for key in weights[0]:
            assert torch.allclose(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize(
    ("architecture", "arguments"),
    [
        ("lstm-classifier", {"embedding_dim": 16, "hidden_size": 16}),
        ("transformer-classifier", {"d_model": 16, "nhead": 2, "num_layers": 2,
                                    "dim_feedforward": 32}),
    ],
)  # fmt: skip
def test_text_classifiers_train_in_pipeline_stages_as_one_process(
    app_client, acme, settings, tmp_path, architecture, arguments
):
    """The text classifiers' steps (embeddings carrying the token mask, the LSTM or each
    encoder layer, the head) in 2 stages: one process's losses and weights."""
    from tests.integration.training.test_train_job import sentiment_csv

    headers = acme["acme"]
    reviews = tmp_path / "reviews.csv"
    reviews.write_bytes(sentiment_csv())
    file_id = upload(app_client, headers, reviews)
    common = {
        "training_file": file_id,
        "architecture": architecture,
        "arguments": arguments,
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": 0.01,
        "max_length": 16,
    }
    alone = start(app_client, headers, model="alone", **common)
    split = start(
        app_client, headers, model="split", strategy="pipeline", world_size=2, micro_batches=2,
        **common,
    )  # fmt: skip
    run_jobs(settings, count=2)
    finished(app_client, headers, alone, split)
    rows = [epochs(app_client, headers, job) for job in (alone, split)]
    for one, other in zip(*rows, strict=True):
        for metric in ("train_loss", "val_loss", "val_accuracy"):
            assert other[metric] == pytest.approx(one[metric], rel=1e-4, abs=1e-6), metric
    weights = model_weights(app_client, "alone", "split")
    for key in weights[0]:
        mine, theirs = weights[0][key], weights[1][key]
        if key.endswith("self_attn.in_proj_bias"):
            # The keys' bias has no effect on attention (a shift of every score alike): its
            # gradient is rounding noise, which AdamW scales up to full-size steps. The query
            # and value biases must agree.
            third = len(mine) // 3
            mine = torch.cat([mine[:third], mine[2 * third :]])
            theirs = torch.cat([theirs[:third], theirs[2 * third :]])
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), key
