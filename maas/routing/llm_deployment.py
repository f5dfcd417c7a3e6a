"""A loaded text-generation model: its tokenizer here, its engine in a process of its own
(or, with MAAS_LLM_ENGINE_PROCESS=false, on a thread of the server).

maas's engine runs the Llama family; any other causal LM in a Hugging Face folder runs on the
``transformers`` fallback (a thread of the server, one request at a time).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from maas.engine.process import EngineProcess
from maas.engine.protocol import GenerationEngine
from maas.errors import Overloaded, UnsupportedFormat
from maas.messages import EngineDescription, EngineStats, GenerationDelta, SamplingParams
from maas.registry.manifest import Manifest, TensorSpec
from maas.registry.records import OpenedVersion, VersionRecord
from maas.routing.deployment import InFlight
from maas.runtime.llm.config import LLAMA_FAMILY
from maas.runtime.llm.options import RunnerOptions
from maas.runtime.llm.tokenizer import ChatTokenizer, load_tokenizer


@dataclass(frozen=True)
class EngineOptions:
    runner: RunnerOptions
    max_batch_tokens: int = 512
    """Tokens in one step: every decoding sequence's next token, then prompt chunks."""
    separate_process: bool = True
    max_waiting: int = 256
    """Sequences that may wait for a KV slot; past it, requests get 503 with Retry-After."""
    pipeline_stages: int = 1
    """Processes the model is split across (maas.distributed); needs ``separate_process``."""
    ray_address: str = ""
    """With pipeline stages: place the later stages on this Ray cluster (else processes
    here)."""


class LLMDeployment(InFlight):
    def __init__(
        self,
        opened: OpenedVersion,
        options: EngineOptions,
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        self.record: VersionRecord = opened.record
        self.manifest: Manifest = opened.manifest
        self.tokenizer = load_tokenizer(opened)
        self.engine: GenerationEngine = start_engine(opened, options, self.tokenizer, on_stats)
        self.capacity = self.engine.num_slots + options.max_waiting
        """Sequences running and waiting at most."""
        self.sequences = 0
        """Sequences submitted to the engine and not finished."""
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.helpers: dict[str, object] = {}
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    @property
    def dead(self) -> bool:
        return self.engine.dead

    @property
    def memory_bytes(self) -> int:
        return self.engine.memory_bytes

    @property
    def description(self) -> EngineDescription | None:
        return self.engine.description

    @property
    def max_len(self) -> int:
        """Positions a sequence may use, prompt and output together."""
        return self.engine.max_len

    def watch(self, on_dead: Callable[[], None]) -> None:
        """Have ``on_dead()`` called (from another thread) if the engine dies unasked."""
        self.engine.on_dead = on_dead

    def check_room(self, sequences: int) -> None:
        """503 with Retry-After, at once, when ``sequences`` more would pass the waiting cap
        (a request that alone is bigger than the cap still runs when nothing waits)."""
        if self.sequences and self.sequences + sequences > self.capacity:
            raise Overloaded(
                f"{self.record.reference} is at capacity ({self.sequences} sequences running "
                "or waiting, MAAS_LLM_MAX_WAITING_SEQUENCES); try again shortly",
                retry_after=1.0,
            )

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        n: int,
        timeout: float | None,
        cache_salt: str = "",
    ) -> AsyncIterator[GenerationDelta]:
        """The engine's deltas for one prompt's ``n`` sequences, counted against the cap."""
        self.sequences += n
        try:
            deltas = self.engine.generate(
                prompt_ids, params, n=n, timeout=timeout, cache_salt=cache_salt
            )
            async for delta in deltas:
                yield delta
        finally:
            self.sequences -= n

    @property
    def queued_rows(self) -> int:
        return self.engine.stats.waiting

    def configure(self, config) -> None:
        """Batching settings are for classic models; the engine batches continuously."""

    async def close(self) -> None:
        self.engine.close()


def start_engine(
    opened: OpenedVersion,
    options: EngineOptions,
    tokenizer: ChatTokenizer,
    on_stats: Callable[[EngineStats], None] | None = None,
) -> GenerationEngine:
    """The back-end for a version: maas's engine for the Llama family, in a process of its
    own or on a thread; the ``transformers`` fallback for other causal LMs. The back-ends that
    run the model in this process are imported here, so that building the server imports no
    torch (nor does a GGUF model's tokenizer: see docs/architecture.md)."""
    name = opened.record.reference
    if not runs_on_engine(opened.manifest):
        from maas.engine.hf_generator import TransformersGenerator
        from maas.runtime.llm.transformers_lm import TransformersLM

        model = TransformersLM(opened, options.runner)
        return TransformersGenerator(model, tokenizer, name=name, on_stats=on_stats)
    if options.pipeline_stages > 1 and not options.separate_process:
        raise ValueError("pipeline stages need the engine in processes of its own")
    if options.separate_process:
        return EngineProcess(opened, options, tokenizer.for_engine(), name=name, on_stats=on_stats)
    from maas.engine.client import EngineClient
    from maas.engine.llm_engine import LLMEngine
    from maas.engine.stats import StatsObserver
    from maas.runtime.llm.runner import ModelRunner

    runner = ModelRunner(opened, options.runner, tokenizer=tokenizer.for_engine())
    engine = LLMEngine(runner, max_batch_tokens=options.max_batch_tokens, observer=StatsObserver())
    engine.warm_up()
    return EngineClient(engine, name=name, on_stats=on_stats)


def runs_on_engine(manifest: Manifest) -> bool:
    """Whether maas's own engine runs the model (else the transformers fallback does)."""
    if manifest.format != "gguf":
        return manifest.config.get("model_type") in LLAMA_FAMILY
    architecture = manifest.config.get("general.architecture")
    if architecture not in LLAMA_FAMILY:
        raise UnsupportedFormat(
            f"GGUF models of architecture {architecture!r} cannot be served: maas's engine runs "
            f"{', '.join(LLAMA_FAMILY)}, and other architectures need a Hugging Face folder "
            "(config.json with safetensors weights) for the transformers fallback"
        )
    return True
