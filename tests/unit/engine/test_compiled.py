"""The compiled decode step: the same greedy tokens as the eager reference, and the eager path
whenever compilation is not possible."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import maas.runtime.llm.compiled as compiled
from maas.config import Settings
from maas.engine.llm_engine import LLMEngine
from maas.registry import open_registry
from maas.runtime.llm.kernels import PackedLinear
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from tests.fixtures import make_tiny_llama
from tests.unit.engine.conftest import greedy, run_to_end, submit, token_ids

TEXTS = ["the cat sat on the mat", "paris is the capital of", "one two three four five six"]


@pytest.fixture(scope="module")
def prompts(llama_tokenizer) -> list[list[int]]:
    return [llama_tokenizer.encode(text) for text in TEXTS]


def generate_staggered(engine, prompts, lengths) -> list[list[int]]:
    """Requests joining a running batch one step apart, so steps mix prefill and decoding
    and decode-only steps see 1, 2 and 3 sequences and growing block tables."""
    outputs = []
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        outputs.append(submit(engine, f"r{i}", prompt, greedy(n)))
        for _ in range(3):
            engine.step()
    run_to_end(engine)
    return [token_ids(deltas) for deltas in outputs]


@pytest.mark.parametrize(
    ("dtype", "kv_cache_dtype"), [("float32", "auto"), ("int8", "auto"), ("int8", "bfloat16")]
)
def test_compiled_and_eager_steps_give_the_same_greedy_tokens(
    make_engine, prompts, dtype, kv_cache_dtype, monkeypatch
):
    lengths = [40, 25, 30]  # past two 16-position blocks, so the tables grow mid-run
    eager_engine = make_engine(dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    eager = generate_staggered(eager_engine, prompts, lengths)
    timed = compiled._timings

    def as_if_faster(*args):
        """This test is about tokens, not speed: the compiled step is kept whatever a busy
        machine timed (the timings are still taken)."""
        return tuple((size, e, min(c, e / 2)) for size, e, c in timed(*args))

    monkeypatch.setattr(compiled, "_timings", as_if_faster)
    engine = make_engine(dtype=dtype, compile=True, kv_cache_dtype=kv_cache_dtype)
    assert engine.runner.cache.dtype == eager_engine.runner.cache.dtype
    report = engine.runner.compiled
    assert report is not None and [size for size, _, _ in report.timings] == [1, 4]
    engine.runner.model.compiled_rows = 4  # whatever the timings said: compiled every step
    calls = []
    layers = engine.runner.model.decode_layers
    engine.runner.model.decode_layers = lambda *args: calls.append(1) or layers(*args)
    with torch.compiler.set_stance("fail_on_recompile"):  # the graphs built at load serve
        # every step's batch size, block table and prompt chunk
        assert generate_staggered(engine, prompts, lengths) == eager
    assert len(calls) >= 30  # most steps were decode-only, through the compiled layers
    assert all(len(ids) == n for ids, n in zip(eager, lengths, strict=True))
    # one copy of the weights: the compiled steps read the plain ones, and float32's packed
    # copy (which needs the plain one beside it) is not made for the batches run eagerly
    assert not any(isinstance(m, PackedLinear) for m in engine.runner.model.modules())


def test_a_failed_compilation_falls_back_to_the_packed_eager_path(
    make_engine, prompts, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("no inductor here")

    monkeypatch.setattr(torch, "compile", broken)
    engine = make_engine(compile=True)
    assert engine.runner.compiled is None and engine.runner.model.decode_layers is None
    assert any(isinstance(m, PackedLinear) for m in engine.runner.model.modules())
    deltas = submit(engine, "r", prompts[0], greedy(8))
    run_to_end(engine)
    assert token_ids(deltas) == token_ids(_alone(make_engine, prompts[0]))


def test_compiled_steps_are_used_only_up_to_the_batch_where_they_were_faster(
    make_engine, prompts, monkeypatch
):
    readings = iter([0, 5, 0, 1] * 3 + [0, 5, 0, 1] * 3 + [0, 1, 0, 5] * 3)
    monkeypatch.setattr(compiled, "TIMED_ROWS", (1, 2, 4))
    # each timed step (readings in seconds): eager 5 s, compiled 1 s at 1 and 2 sequences;
    # at 4, the reverse
    clock = lambda: next(readings)  # noqa: E731
    engine = make_engine(compile=False)
    model, cache = engine.runner.model, engine.runner.cache
    report = compiled.compile_decode(model, cache, max_sequences=4, timer=clock)
    assert report.rows == 2 == model.compiled_rows
    assert report.timings == ((1, 5000, 1000), (2, 5000, 1000), (4, 1000, 5000))
    calls = []
    layers = model.decode_layers
    model.decode_layers = lambda *args: calls.append(1) or layers(*args)
    outputs = [submit(engine, f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)]
    engine.step()  # three prompts prefilled: eager
    engine.step()  # three decoding: more than 2, eager
    assert calls == []
    engine.abort("r2")
    engine.step()  # two decoding: compiled
    assert len(calls) == 1  # the tiny model's two layers in one call
    run_to_end(engine)
    assert all(len(token_ids(deltas)) == 6 for deltas in outputs[:2])


def test_a_slower_timing_at_one_sequence_does_not_turn_off_compiled_batches(
    make_engine, monkeypatch
):
    readings = iter([0, 1, 0, 5] * 3 + [0, 5, 0, 1] * 3 + [0, 5, 0, 1] * 3)
    monkeypatch.setattr(compiled, "TIMED_ROWS", (1, 2, 4))
    # eager faster at one sequence (as noise can make it), compiled at 2 and 4
    engine = make_engine(compile=False)
    model, cache = engine.runner.model, engine.runner.cache
    report = compiled.compile_decode(model, cache, max_sequences=4, timer=lambda: next(readings))
    assert report is not None and report.rows == 4 == model.compiled_rows


def test_a_burst_of_other_work_slows_both_ways_not_compiled_steps_alone(make_engine):
    """The machine busy for two timed steps in a row (20 ms more each): timed in alternating
    rounds, the burst falls on one step of each way, and the medians still show compiled
    steps faster; timed three eager steps and then three compiled ones, it fell on two
    compiled steps, and a load with only one size to time ran eagerly."""
    engine = make_engine(compile=False)
    model, cache = engine.runner.model, engine.runner.cache
    now, calls = [0.0], [0]

    def clock() -> float:  # read at each timed step's start and end
        calls[0] += 1
        if calls[0] % 2 == 0:
            step = calls[0] // 2
            taken = 10.0 if model.decode_layers is None else 7.0
            now[0] += (taken + (20.0 if step in (4, 5) else 0.0)) / 1000
        return now[0]

    report = compiled.compile_decode(model, cache, max_sequences=1, timer=clock)
    assert report is not None and model.decode_layers is not None
    assert report.timings == ((1, pytest.approx(10.0), pytest.approx(7.0)),)


def test_layers_run_a_few_a_call_and_the_rest_in_a_last_one(
    prompts, llama_tokenizer, tmp_path, monkeypatch
):
    registry = open_registry(Settings(home=tmp_path / "home"))
    registry.import_model(make_tiny_llama(tmp_path / "llama3", num_layers=3), "three")
    version = registry.open_version("three")
    options = RunnerOptions(max_sequences=4, max_model_len=128, compile=False, threads=1)
    eager = LLMEngine(ModelRunner(version, options, llama_tokenizer), max_batch_tokens=64)
    lengths = [20, 12, 16]
    expected = generate_staggered(eager, prompts, lengths)
    monkeypatch.setattr(compiled, "LAYERS_PER_CALL", 2)
    runner = ModelRunner(
        version, replace(options, compile=True, compile_always=True), llama_tokenizer
    )
    registry.close()
    model = runner.model
    assert model.layers_per_call == 2 and runner.compiled is not None
    groups = []
    layers = model.decode_layers
    model.decode_layers = lambda blocks, *rest: groups.append(len(blocks)) or layers(blocks, *rest)
    engine = LLMEngine(runner, max_batch_tokens=64)
    assert generate_staggered(engine, prompts, lengths) == expected
    assert groups[:4] == [2, 1, 2, 1] and len(groups) >= 20  # each decode step: 2 calls


def test_without_a_cpp_compiler_nothing_is_compiled(make_engine, monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert make_engine(compile=True).runner.compiled is None


def counting_clock(eager_ms, compiled_ms):
    """A timer under which every timed eager step lasts ``eager_ms`` and every compiled one
    ``compiled_ms`` (steps are timed a step each way per round, eager first)."""
    readings = []
    for ms in [eager_ms, compiled_ms] * compiled.TIMED_STEPS:
        readings += [0.0, ms / 1000]
    return iter(readings).__next__


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_compiled_prefill_parts_give_the_same_greedy_tokens(make_engine, prompts, dtype):
    lengths = [20, 12, 16]
    eager = generate_staggered(make_engine(dtype=dtype), prompts, lengths)
    engine = make_engine(dtype=dtype)
    model, cache = engine.runner.model, engine.runner.cache
    report = compiled.compile_prefill(model, cache, timer=counting_clock(5.0, 1.0))
    assert report is not None and report.max_difference < 1e-3
    assert (report.eager_ms, report.compiled_ms) == (5.0, 1.0)
    qkv, out = model.prefill_parts
    calls = []
    model.prefill_parts = (
        lambda *a: calls.append(1) or qkv(*a),
        lambda *a: out(*a),
    )
    assert generate_staggered(engine, prompts, lengths) == eager  # every step eager-attended
    assert len(calls) >= engine.runner.config.num_layers * 20


def test_prefill_parts_stay_eager_when_not_faster_or_broken(make_engine, monkeypatch):
    engine = make_engine()
    model, cache = engine.runner.model, engine.runner.cache
    assert compiled.compile_prefill(model, cache, timer=counting_clock(1.0, 5.0)) is None
    assert model.prefill_parts is None

    def broken(*args, **kwargs):
        raise RuntimeError("no inductor here")

    monkeypatch.setattr(torch, "compile", broken)
    assert compiled.compile_prefill(model, cache) is None and model.prefill_parts is None


def test_always_keeps_compiled_steps_however_they_time(make_engine):
    engine = make_engine()
    model, cache = engine.runner.model, engine.runner.cache
    slower = counting_clock(1.0, 5.0)
    assert compiled.compile_prefill(model, cache, timer=slower, always=True) is not None
    assert model.prefill_parts is not None
    readings = iter([0, 1, 0, 5] * compiled.TIMED_STEPS * 2)  # compiled 5x slower, each size
    report = compiled.compile_decode(
        model, cache, max_sequences=4, timer=lambda: next(readings), always=True
    )
    assert report is not None and report.rows == 4 == model.compiled_rows
    assert all(c > e for _, e, c in report.timings)  # measured slower, kept all the same


def test_each_model_compiles_into_a_cache_of_its_own(make_engine):
    """Dynamo keeps at most ``recompile_limit`` compiled variants of one function; each model
    needs two of each step function (one row, and several). Models compiled from one shared
    function would exhaust a limit of two at the second model and run it eagerly."""
    with torch._dynamo.config.patch(recompile_limit=2):
        for dtype in ("float32", "int8"):
            runner = make_engine(dtype=dtype).runner
            model, cache = runner.model, runner.cache
            fast = counting_clock(5.0, 1.0)  # one timed size (1 row), compiled faster
            report = compiled.compile_decode(model, cache, max_sequences=2, timer=fast)
            assert report is not None and model.decode_layers is not None, dtype
            prefill = compiled.compile_prefill(model, cache, timer=counting_clock(5.0, 1.0))
            assert prefill is not None and model.prefill_parts is not None, dtype


def test_the_runner_compiles_prefill_parts_only_with_a_compiled_decode_step(
    make_engine, monkeypatch
):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    runner = make_engine(compile=True).runner
    assert runner.compiled is None and runner.prefill_compiled is None
    assert runner.model.prefill_parts is None


def _alone(make_engine, prompt):
    engine = make_engine()
    deltas = submit(engine, "r", prompt, greedy(8))
    run_to_end(engine)
    return deltas


def test_a_compiled_step_checks_its_inputs_and_caches_not_its_layers_weights(
    make_engine, monkeypatch
):
    """Dynamo's tensor checks of the layers' own weights are dropped before each call (they
    cannot fail: see compiled.without_weight_checks); every other guard is kept."""
    seen: list[tuple[str, str, bool]] = []
    keep = compiled.without_weight_checks

    def recorded(entries):
        kept = keep(entries)
        seen.extend((e.name, e.guard_type, k) for e, k in zip(entries, kept, strict=True))
        return kept

    monkeypatch.setattr(compiled, "without_weight_checks", recorded)
    runner = make_engine(dtype="int8").runner
    fast = counting_clock(5.0, 1.0)
    report = compiled.compile_decode(runner.model, runner.cache, max_sequences=2, timer=fast)
    assert report is not None
    dropped = {(name, kind) for name, kind, kept in seen if not kept}
    assert dropped and all(k == "TENSOR_MATCH" and n.startswith("blocks") for n, k in dropped)
    weights = {n for n, _ in dropped}
    assert any(n.endswith(".weight") for n in weights)
    assert any(n.endswith(".weight_sums") for n in weights)
    kept_checks = {name for name, kind, kept in seen if kept and kind == "TENSOR_MATCH"}
    for step_input in ("x", "cos", "block_tables", "lengths"):
        assert step_input in kept_checks
    assert any(name.startswith(("k_caches", "v_caches")) for name in kept_checks)


@pytest.mark.parametrize(
    ("layers", "per_call"), [(1, 1), (3, 3), (15, 15), (16, 8), (24, 12), (30, 15), (32, 11)]
)
def test_layers_are_spread_evenly_over_as_few_calls_as_allowed(layers, per_call):
    assert compiled.layers_per_call(layers) == per_call
    calls = -(-layers // per_call)
    assert per_call <= compiled.LAYERS_PER_CALL and calls == -(-layers // compiled.LAYERS_PER_CALL)
