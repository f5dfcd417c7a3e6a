"""On a real two-node Ray cluster (two raylets on this machine, ``ray.cluster_utils``):
training ranks and LLM pipeline stages as Ray actors in placement groups, with the results
of the same work done in local processes."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.integration.training.test_train_job import TINY, model_weights, run_jobs, start, upload

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def ray_settings(settings, ray_cluster):
    return settings.model_copy(update={"ray_address": ray_cluster.address})


@pytest.fixture
def acme(tenant_keys):
    return tenant_keys


def events(client, headers, job_id) -> list[dict]:
    return client.get(f"/api/v1/jobs/{job_id}/events", headers=headers).json()["data"]


@pytest.mark.parametrize(
    "strategy",
    [{"world_size": 2}, {"strategy": "pipeline", "world_size": 2, "micro_batches": 2}],
    ids=["data", "pipeline"],
)
def test_training_ranks_on_two_ray_nodes_train_what_one_process_does(
    app_client, acme, few_digits, settings, ray_settings, strategy
):
    headers = acme["acme"]
    file_id = upload(app_client, headers, few_digits)
    common = {"training_file": file_id, **TINY}
    alone = start(app_client, headers, model="alone", **common)
    run_jobs(settings)
    spread = start(app_client, headers, model="spread", **common, **strategy)
    run_jobs(ray_settings)
    job = app_client.get(f"/api/v1/jobs/{spread}", headers=headers).json()
    assert job["status"] == "succeeded", job["error"]
    [placed] = [
        e["message"] for e in events(app_client, headers, spread) if "on Ray" in e["message"]
    ]
    nodes = {part.split(" on ")[1].split("@")[0] for part in placed.split(": ")[1].split(", ")}
    assert len(nodes) == 2, placed  # one rank on each node
    weights = model_weights(app_client, "alone", "spread")
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6), key
    assert app_client.get(f"/api/v1/jobs/{alone}", headers=headers).json()["status"] == "succeeded"


def test_llm_pipeline_stages_as_ray_actors_answer_as_one_process(ray_cluster, tmp_path):
    from maas.config import Settings
    from maas.engine.process import EngineProcess
    from maas.messages import SamplingParams
    from maas.registry import open_registry
    from maas.routing.llm_deployment import EngineOptions
    from maas.runtime.llm.runner import RunnerOptions
    from maas.runtime.llm.tokenizer import load_tokenizer
    from tests.fixtures import make_tiny_llama

    registry = open_registry(Settings(home=tmp_path / "home"))
    registry.import_model(make_tiny_llama(tmp_path / "llama", num_layers=4), "tiny")
    opened = registry.open_version("tiny")
    registry.close()
    tokenizer = load_tokenizer(opened)
    prompts = [tokenizer.encode(t) for t in ("the cat sat on the mat", "a dog ran", "hello")]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    def answers(stages: int, address: str) -> tuple[list[list[int]], tuple]:
        runner = RunnerOptions(dtype="float32", max_sequences=4, max_model_len=64, compile=False)
        options = EngineOptions(runner, pipeline_stages=stages, ray_address=address)
        engine = EngineProcess(opened, options, tokenizer.for_engine(), name=f"tiny-{stages}")

        async def run():
            async def one(prompt):
                return [t async for d in engine.generate(prompt, params) for t in d.token_ids]

            return await asyncio.gather(*(one(p) for p in prompts))

        try:
            return asyncio.run(run()), engine.description.pipeline_stages
        finally:
            engine.close()

    whole, _ = answers(1, "")
    split, stages = answers(3, ray_cluster.address)
    assert split == whole
    assert stages[0]["node"] == "local"
    assert all(s["node"].startswith("ray:") for s in stages[1:]), stages
    assert len({s["node"] for s in stages[1:]}) == 2, stages  # spread over the two nodes
