"""Serving metrics per model and version: outcomes, latency, queue depth, batch sizes, loads."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.requests = Counter(
            "maas_inference_requests",
            "Inference requests by model, version and outcome (success, client_error, "
            "server_error, rejected).",
            [*labels, "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "maas_inference_request_duration_seconds",
            "Time from a request reaching its model to its answer.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "maas_inference_batch_rows",
            "Rows per forward pass (1 means no batching happened).",
            labels,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.load_seconds = Histogram(
            "maas_model_load_seconds",
            "Time to load a model version (verify files, build, read weights).",
            labels,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )


class PoolCollector(Collector):
    """Queue depth and memory of each loaded deployment, read at scrape time."""

    def __init__(self, deployments: Callable[[], Iterable]) -> None:
        self._deployments = deployments

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "maas_inference_queue_rows", "Rows waiting for a batch.", labels=["model", "version"]
        )
        memory = GaugeMetricFamily(
            "maas_model_memory_bytes",
            "Estimated memory of a loaded model.",
            labels=["model", "version"],
        )
        for deployment in self._deployments():
            labels = [deployment.record.name, str(deployment.record.version)]
            queue.add_metric(labels, deployment.batcher.queued_rows)
            memory.add_metric(labels, deployment.runtime.memory_bytes)
        yield queue
        yield memory
