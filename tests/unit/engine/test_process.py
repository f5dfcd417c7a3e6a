"""The engine in a process of its own: it answers as the engine does, and a request that
races an unload gets a clear Unavailable, never a broken pipe."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from maas.engine import process
from maas.engine.process import EngineProcess
from maas.errors import Unavailable
from maas.logs import ChildLogging
from maas.routing.llm_deployment import EngineOptions
from maas.runtime.llm.runner import RunnerOptions
from tests.unit.engine.conftest import generate_alone, greedy, token_ids

# Spawning the process imports torch again and loads the model: seconds, not milliseconds.
pytestmark = pytest.mark.timeout(180)


def collect(engine: EngineProcess, prompt: list[int], params) -> list:
    async def run() -> list:
        return [delta async for delta in engine.generate(prompt, params)]

    return asyncio.run(run())


def test_a_request_after_an_unload_is_unavailable(llama_version, llama_tokenizer, make_engine):
    # float32 and eager, as make_engine's: timing dtypes and compiling took most of 15 to 21 s
    runner = RunnerOptions(
        dtype="float32", max_sequences=2, max_model_len=64, threads=1, compile=False
    )
    engine = EngineProcess(
        llama_version, EngineOptions(runner), llama_tokenizer.for_engine(), name="tiny"
    )
    prompt = llama_tokenizer.encode("the cat sat on the mat")
    try:
        deltas = collect(engine, prompt, greedy(6))
        assert token_ids(deltas) == token_ids(generate_alone(make_engine, prompt, greedy(6)))
    finally:
        engine.close()
    with pytest.raises(Unavailable, match="unloaded"):
        collect(engine, prompt, greedy(6))
    # as if close() had begun just after the checks: the pipe is shut under the request
    engine._closing = engine._ended = False
    with pytest.raises(Unavailable, match="unloaded"):
        collect(engine, prompt, greedy(6))


def test_the_engine_process_logs_its_load_as_the_server_does(
    llama_version, llama_tokenizer, caplog, capfd
):
    """A spawned process starts with logging unconfigured: without the parent's set-up passed
    on, the engine's INFO lines (its dtype, its compiled step, "ready in") were dropped."""
    caplog.set_level(logging.INFO, logger="maas")
    options = EngineOptions(
        RunnerOptions(dtype="float32", max_sequences=2, max_model_len=64, compile=False)
    )
    engine = EngineProcess(llama_version, options, llama_tokenizer.for_engine(), name="tiny")
    engine.close()
    lines = capfd.readouterr().err.splitlines()
    ready = [line for line in lines if " ready in " in line]
    assert len(ready) == 1, lines
    assert ready[0].startswith("INFO:     (engine-tiny) ")


def test_a_child_logs_at_its_parent_s_level(caplog):
    caplog.set_level(logging.WARNING, logger="maas")
    assert ChildLogging.of_parent() == ChildLogging(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="maas")
    assert ChildLogging.of_parent() == ChildLogging(logging.DEBUG)


def _refuse_to_unpickle():
    raise RuntimeError("this version cannot be read here")


class Unreadable:
    """A version the engine process cannot unpickle: it fails as it reads its load."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


def test_an_engine_process_that_fails_to_read_its_load_fails_it_at_once():
    """What the process loads goes over its pipe, not in multiprocessing's start arguments:
    a child that died while reading those, with more than a pipe's buffer still unread (the
    demo's tokenizer alone pickles to 1.5 MB), left ``start()`` writing for ever to a pipe
    whose reading end it held itself."""
    options = EngineOptions(RunnerOptions(dtype="float32", compile=False))
    tokenizer = "as large as the demo's" * 2**16  # read after the version, if ever
    with pytest.raises(Unavailable, match="this version cannot be read here"):
        EngineProcess(Unreadable(), options, tokenizer, name="unreadable")


def _stay_stuck() -> ChildLogging:
    time.sleep(120)  # longer than the test waits: the server must not wait for it
    return ChildLogging(logging.INFO)


class Stuck:
    """Start arguments whose reading leaves the child stuck before it reads its load."""

    def __reduce__(self):
        return (_stay_stuck, ())


def test_a_process_stuck_before_it_reads_its_load_fails_within_the_start_timeout(monkeypatch):
    """A load larger than a pipe's buffer waits for the process to read it; one that never
    does (stuck at start) must fail the load after ``START_TIMEOUT``, not hold it for ever."""
    monkeypatch.setattr(process, "START_TIMEOUT", 3.0)
    monkeypatch.setattr(ChildLogging, "of_parent", lambda: Stuck())
    options = EngineOptions(RunnerOptions(dtype="float32", compile=False))
    tokenizer = "as large as the demo's" * 2**16
    started = time.monotonic()
    with pytest.raises(Unavailable, match="did not start within 3s"):
        EngineProcess(object(), options, tokenizer, name="stuck")
    assert time.monotonic() - started < 30
