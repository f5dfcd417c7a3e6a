"""Serving metrics per model and version: outcomes, latency, queue depth, batch sizes, loads."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
            queue.add_metric(labels, deployment.queued_rows)
            memory.add_metric(labels, deployment.memory_bytes)
        yield queue
        yield memory


class GenerationMetrics:
    """Text-generation metrics under vLLM's names, so existing dashboards work."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running",
            "Sequences in the running batch.",
            labels,
            registry=registry,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Sequences waiting to run.",
            labels,
            registry=registry,
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "Share of the KV cache's blocks in use (0 to 1).",
            labels,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", labels, registry=registry
        )
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels,
            registry=registry,
        )
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            labels,
            registry=registry,
        )
        self.preemptions = Counter(
            "vllm:num_preemptions",
            "Sequences preempted for want of KV cache blocks (recomputed later).",
            labels,
            registry=registry,
        )
        self.spec_drafts = Counter(
            "vllm:spec_decode_num_drafts",
            "Rounds of speculative decoding.",
            labels,
            registry=registry,
        )
        self.spec_draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens",
            "Tokens the draft model proposed.",
            labels,
            registry=registry,
        )
        self.spec_accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens",
            "Proposed tokens the model picked too.",
            labels,
            registry=registry,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to the first token.",
            labels,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between two tokens of a sequence.",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            labels,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
            registry=registry,
        )

    def recorder(self, model_name: str):
        """A callback that turns one engine step's figures into metrics for one model."""

        def record(stats) -> None:
            self.running.labels(model_name).set(stats.running)
            self.waiting.labels(model_name).set(stats.waiting)
            self.kv_usage.labels(model_name).set(stats.kv_usage)
            if stats.prompt_tokens:
                self.prompt_tokens.labels(model_name).inc(stats.prompt_tokens)
            for counter, count in (
                (self.generation_tokens, stats.generation_tokens),
                (self.prefix_cache_queries, stats.prefix_cache_queries),
                (self.prefix_cache_hits, stats.prefix_cache_hits),
                (self.preemptions, stats.preemptions),
                (self.spec_drafts, stats.spec_drafts),
                (self.spec_draft_tokens, stats.spec_draft_tokens),
                (self.spec_accepted_tokens, stats.spec_accepted_tokens),
            ):
                if count:
                    counter.labels(model_name).inc(count)
            for histogram, samples in (
                (self.ttft, stats.ttft),
                (self.itl, stats.itl),
                (self.e2e, stats.e2e),
            ):
                for sample in samples:
                    histogram.labels(model_name).observe(sample)

        return record
