"""``EngineProcess``: maas's engine in a process of its own, as a ``GenerationEngine``.

On a two-core CPU this is faster than an engine thread inside the server: the server's
event loop no longer competes with the model for the GIL, and the math libraries' thread
pools run from a main thread (the demo in int8, 32 streams: 565 against 489 tokens/s; an
earlier, eager engine: 208 against 147). It costs a second interpreter (223 MiB more at the
peak; docs/performance.md), and keeps a crash in the model away from the server.

The pipe carries the structs of ``maas/messages.py``: the server sends ``EngineLoad`` first
(what to load: not in the process's start arguments, see ``_send_load``), then
``EngineRequest``, ``EngineAbort`` and ``EngineStop``; the engine answers ``EngineReady`` (or
``EngineLoadError``) once, then an ``EngineOutput`` after each step, which a reader thread
hands to the requests' streams.

With ``pipeline_stages`` K > 1 the model is split (maas.distributed): this process is rank 0
and holds stage 0, and K-1 stage processes, started and watched here, hold the rest. The
deployment is ready once every stage has loaded and a warm-up has gone through them all; if
any stage dies, the engine process is stopped too, so its requests fail as unavailable and
the pool loads the model again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from maas.engine.streams import DeltaStreams
from maas.errors import Unavailable
from maas.logs import ChildLogging
from maas.messages import (
    ENGINE_STOPPED,
    MODEL_UNLOADED,
    EngineAbort,
    EngineDescription,
    EngineLoad,
    EngineLoadError,
    EngineMessage,
    EngineOutput,
    EngineReady,
    EngineRequest,
    EngineStats,
    EngineStop,
    GenerationDelta,
    RequestDelta,
    SamplingParams,
)

log = logging.getLogger(__name__)

START_TIMEOUT = 600.0


class EngineProcess:
    def __init__(
        self,
        opened,
        options,
        tokenizer,
        *,
        name: str,
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        """Start the process and wait until its model is loaded; ``tokenizer`` is what the
        engine needs of it (``ChatTokenizer.for_engine()``: without ``transformers``);
        ``on_stats(EngineStats)`` is called from the reader thread after each step."""
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._stages = None
        spec = None
        if options.pipeline_stages > 1:
            options, spec = self._start_stages(opened, options)
        self._process = context.Process(
            target=_serve,
            args=(child, ChildLogging.of_parent()),
            name=f"engine-{name}",
            daemon=True,
        )
        self._process.start()
        child.close()
        try:
            self._send_load(EngineLoad(opened, options, tokenizer, spec))
            ready = self._wait_ready(name)
        except BaseException:
            self._process.kill()
            if self._stages:
                self._stages.kill()
            raise
        self.memory_bytes = ready.memory_bytes
        self.max_len = ready.max_len
        self.num_slots = ready.num_slots
        self.description = ready.description
        if self._stages:
            self.memory_bytes += sum(self._stages.memory_bytes)
            self.description = _with_stages(ready, self._stages)
        self.stats = EngineStats()
        self.on_dead: Callable[[], None] | None = None
        """Called (from the reader thread) when the process dies without being closed."""
        self._ended = False
        """The pipe is closed: the process has exited, asked to or not."""
        self._on_stats = on_stats
        self._send_lock = threading.Lock()
        self._streams = DeltaStreams()
        self._closing = False
        self._reader = threading.Thread(
            target=self._read, name=f"engine-reader-{name}", daemon=True
        )
        self._reader.start()
        if self._stages:
            threading.Thread(target=self._watch_stages, name=f"stages-{name}", daemon=True).start()

    def _start_stages(self, opened, options):
        from maas.distributed.pipeline import PipelineSpec
        from maas.distributed.stages import (
            StageProcesses,
            free_address,
            plan_for,
            stage_options,
        )

        stages = options.pipeline_stages
        runner = stage_options(options.runner, stages)
        plan = plan_for(opened, stages, runner.dtype)
        if options.ray_address:
            from maas.distributed.stages import RayStages

            self._stages = RayStages(opened, runner, plan, options.ray_address)
            address, interface = self._stages.address, self._stages.interface
        else:
            address, interface = free_address(), "lo"
            self._stages = StageProcesses(opened, runner, plan, address)
        spec = PipelineSpec(0, stages, address, plan.stages[0].unit_range, interface)
        return replace(options, runner=runner), spec

    def _watch_stages(self) -> None:
        """A stage that exits unasked takes the engine process with it (see the module)."""
        self._stages.wait_any_exit()
        if not self._closing:
            log.error("a pipeline stage of %s exited: stopping its engine", self._process.name)
            self._process.kill()

    @property
    def dead(self) -> bool:
        """The process exited without being closed."""
        return self._ended and not self._closing

    def _send_load(self, load: EngineLoad) -> None:
        """Hand the process what to load over its pipe, not in its start arguments: if it
        dies while reading those (the tokenizer alone can pickle to a megabyte or two),
        multiprocessing's ``start()`` blocks for ever writing the rest to a pipe whose reading
        end it holds itself; a pipe to a dead process fails at once. The load is written from
        a thread of its own, so that a process stuck before it reads (the write then waits
        for room in the pipe) is bounded by ``START_TIMEOUT`` in ``_wait_ready`` like the rest
        of the load: killed then, the process takes the pipe's other end with it and the
        write fails. Whether it died or was killed, ``_wait_ready`` reports it."""

        def send() -> None:
            with contextlib.suppress(OSError):  # the process ended before it read everything
                self._conn.send(load)

        threading.Thread(target=send, name="engine-load", daemon=True).start()

    def _exited_while_loading(self, name: str) -> Unavailable:
        self._process.join(timeout=10)
        return Unavailable(f"{name} exited while loading (exit code {self._process.exitcode})")

    def _wait_ready(self, name: str) -> EngineReady:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._conn.poll(0.5 if self._stages else START_TIMEOUT):
            if self._stages:
                self._stages.check_ready(0)  # raises if a stage failed to load
            if time.monotonic() > deadline:
                raise Unavailable(f"{name} did not start within {START_TIMEOUT:.0f}s")
        try:
            reply = self._conn.recv()
        except EOFError:  # it died before a word (killed, out of memory)
            raise self._exited_while_loading(name) from None
        if isinstance(reply, EngineLoadError):
            self._process.join(timeout=10)
            raise Unavailable(f"{name} failed to load: {reply.message}")
        if self._stages and not self._stages.check_ready(30):
            raise Unavailable(f"{name}: a pipeline stage did not report after the warm-up")
        return reply

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        n: int = 1,
        timeout: float | None = None,
        cache_salt: str = "",
    ) -> AsyncIterator[GenerationDelta]:
        stream = self._streams.open(prompt_ids, params, n=n, timeout=timeout, cache_salt=cache_salt)
        async for delta in stream.follow(self._submit, self._abort):
            yield delta

    def close(self) -> None:
        """Stop the process (killed if it has not ended within 30 s); what was running
        fails as unavailable ("the model was unloaded")."""
        self._closing = True
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._send(EngineStop())
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        if self._stages:
            self._stages.stop()
        self._conn.close()

    def _submit(self, request: EngineRequest) -> None:
        # Checked once the stream is open, so a death noticed after this still fails it.
        if self._closing:  # the pool unloaded the model between finding it and this call
            raise Unavailable("the model is being unloaded; retry the request")
        if self._ended:
            raise Unavailable("the model's engine has stopped; it is restarting, retry the request")
        try:
            self._send(request)
        except OSError:  # closed under us
            raise Unavailable("the model is being unloaded; retry the request") from None

    def _abort(self, request_id: str) -> None:
        if not self._ended:
            with contextlib.suppress(OSError):  # closed: nothing left to abort
                self._send(EngineAbort(request_id))

    def _send(self, message: EngineMessage) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _read(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                output: EngineOutput = self._conn.recv()
                for item in output.deltas:
                    self._streams.deliver(item.request_id, item.delta)
                self.stats = output.stats
                if self._on_stats:
                    self._on_stats(output.stats)
        self._ended = True
        if self._stages and not self._closing:
            self._stages.kill()
        if not self._closing:
            self._process.join(timeout=5)
            log.error("%s stopped (exit code %s)", self._process.name, self._process.exitcode)
        self._streams.fail_all(MODEL_UNLOADED if self._closing else ENGINE_STOPPED)
        if not self._closing and self.on_dead is not None:
            self.on_dead()


def _serve(conn, logs: ChildLogging) -> None:
    """The engine process: take what to load (``EngineLoad``) from the pipe, load it, say
    ready, then step until told to stop. With a pipeline ``spec``, this is rank 0: stage 0
    here, and the stages are told to stop at the end. It logs as the server does
    (``logs``)."""
    logs.apply()
    from maas.runtime.llm.runner import ModelRunner

    try:
        load = conn.recv()
    except EOFError:  # the server gave up before sending it
        return
    except Exception as err:  # what it names cannot be read here: reported as a load error
        conn.send(EngineLoadError(f"{type(err).__name__}: {err}"))
        return
    opened, options, tokenizer, spec = load.opened, load.options, load.tokenizer, load.spec
    try:
        if spec is None:
            runner = ModelRunner(opened, options.runner, tokenizer=tokenizer)
        else:
            from maas.distributed.pipeline import PipelineRunner

            runner = PipelineRunner(opened, options.runner, spec, tokenizer=tokenizer)
    except Exception as err:  # reported to the parent, which raises it as Unavailable
        conn.send(EngineLoadError(f"{type(err).__name__}: {err}"))
        return
    try:
        _loop(conn, runner, options)
    finally:
        if spec is not None:
            runner.stop()


def _loop(conn, runner, options) -> None:
    from maas.engine import driver
    from maas.engine.llm_engine import LLMEngine
    from maas.engine.stats import StatsObserver

    observer = StatsObserver()
    engine = LLMEngine(runner, max_batch_tokens=options.max_batch_tokens, observer=observer)
    engine.warm_up()
    conn.send(driver.engine_ready(engine))
    outbox: list[RequestDelta] = []
    sinks = lambda request_id: _sink(outbox, request_id)  # noqa: E731
    while True:
        took = False
        wait = 0.0 if engine.has_work() else 1.0
        while conn.poll(wait):
            wait, took = 0.0, True
            if not driver.apply(engine, conn.recv(), sinks):
                return
        stepped = engine.has_work()
        if stepped:
            driver.step(engine)
        if outbox or stepped or took:
            stats = driver.report(engine, observer, stepped=stepped)
            conn.send(EngineOutput(tuple(outbox), stats))
            outbox.clear()


def _with_stages(ready: EngineReady, stages) -> EngineDescription | None:
    """The engine's description with each pipeline stage's layers, bytes, node and memory."""
    if ready.description is None:
        return None
    memory = [ready.memory_bytes, *stages.memory_bytes]
    rows = tuple(
        {
            "stage": stage.index,
            "layers": f"{stage.first_unit}-{stage.first_unit + len(stage.units) - 1}",
            "weights_bytes": stage.bytes,
            "memory_bytes": memory[stage.index],
            "node": stage.node,
        }
        for stage in stages.plan.stages
    )
    return replace(ready.description, pipeline_stages=rows)


def _sink(outbox: list[RequestDelta], request_id: str) -> Callable[[GenerationDelta], None]:
    return lambda delta: outbox.append(RequestDelta(request_id, delta))
