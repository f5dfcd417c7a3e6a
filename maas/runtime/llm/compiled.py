"""The decode step compiled: a decode-only step's layers, a few at a time, through one fused
function.

A decoding step of a small model is thousands of tiny eager ops (about 2.5 us of dispatch
each on a 2-core CPU) around a few matrix products; ``torch.compile`` with the inductor CPU
backend fuses the norms, rotary and residual adds of a layer into a handful of C++ loops
around the matrix products and attention (the paged attention kernel as a custom op, or the
gathered blocks through PyTorch's fused attention). One compiled function serves every group
of ``layers_per_call`` layers (same code, same shapes: compiled once, not once per group),
with the batch size and the context as symbolic sizes (and every other size, the weights' and
the KV cache's, fixed), so a step's shape never triggers a compile while serving: the two
specialisations inductor makes (one sequence, and several) are built at load, and checked
against the eager path before use. Both paths are then timed
at a few batch sizes, and compiled steps are used up to the largest at which they were
faster. Where compilation is not possible (no C++ compiler, an op inductor refuses), or is
nowhere faster, the eager path runs, as it always can.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from maas.runtime.llm.model import (
    DecodeRows,
    KVCache,
    LlamaModel,
    PrefillRows,
    StepInput,
    decode_layers,
    layer_out,
    layer_qkv,
)

log = logging.getLogger(__name__)

PARITY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5}
"""Largest difference allowed between compiled and eager logits (relative to their scale) at
load, by the model's dtype. In float32 the two agree to rounding. In bfloat16 they round at
different places, and eager is the less exact one: on the demo model, eager one-row steps are
0.24 from float32's logits and compiled ones 0.06, so only a broken kernel's garbage (a
difference of the logits' own size) is caught there."""

LAYERS_PER_CALL = 15
"""Most layers each call of the compiled step runs (``layers_per_call`` spreads a model's
layers evenly over as few calls as that allows). Each call costs Dynamo's lookup and the
compiled region's entry (30 calls took 3 ms of a 17 ms one-sequence step); more layers a call
compile longer. The demo in int8 (30 layers, 2 cores; step ms at one sequence, and compile
seconds with inductor's cache cold), first with the steps of 2026-12-04:

| layers a call | 1 sequence | 32 sequences | compiling |
|---|---|---|---|
| 1 | 20.5 | 34.4 | about 13 |
| 6 | 16.8 | 29.5 | 45 (9 with inductor's cache warm) |
| 10 | 15.8 | | 22 warm |
| 30 | 16.0 | | 55 warm |

and with those of 2026-12-05 (C++ operators, the VNNI kernel), two variants in one process,
steps alternated: 15 layers a call against 6, 0.967 of the step (8.93 against 9.23 ms); 30
against 15, 1.011. A whole cold load of the demo (``bench/llm_step_profile.py``, compiling
included) took 31.0 s at 6, 34.5 s at 15 and 47.9 s at 30."""


def layers_per_call(layers: int) -> int:
    """Layers a call for a model of ``layers``: as few calls as ``LAYERS_PER_CALL`` allows,
    sharing the layers evenly (30: two of 15; 24: two of 12; 32: 11, 11 and a last call of
    10, which compiles a graph of its own)."""
    calls = -(-layers // LAYERS_PER_CALL)
    return -(-layers // calls)


WITHOUT_ASSERTS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
"""Inductor's checks left out of the compiled steps: that each input, and each output of an
operator it calls (the two maas operators, torch._int_mm), has the size, stride and alignment
it was traced with. About 660 calls a one-sequence demo step, 5% of it (A/B in one process,
steps alternated: 9.80 against 9.29 ms, then 10.46 against 9.98). Dynamo's guards check each
step's inputs before the call, and tests check that each operator's output has the shape and
strides of its traced form (test_torch_ops.py)."""

WARM_SHAPES = ((1, 2), (2, 3))
"""(sequences, blocks each) run at load: inductor specialises size 1, so one sequence and
several are compiled apart. Block tables are padded to at least ``MIN_BLOCKS`` blocks.

Tried for one graph instead of two (the demo in int8 compiles in 55 s cold, 27 s a graph):
the rows marked unbacked (``mark_unbacked``) compiled a step whose logits differed from
eager's by 0.87 (caught at load); ``backed_size_oblivious`` still guarded ``x.size()[0] ==
1`` inside an operator's call and compiled the second graph anyway (62 s in all)."""

MIN_BLOCKS = 2


TIMED_ROWS = (1, 4, 16, 32)
"""Batch sizes at which compiled and eager steps are timed at load (up to max_sequences)."""
TIMED_STEPS = 3


@dataclass(frozen=True)
class CompileReport:
    seconds: float
    max_difference: float
    rows: int
    """Compiled steps are used for at most this many sequences: up to the largest timed batch
    at which they were faster than eager. Not only up to the first batch where they were
    slower: at one sequence int8's steps spend most of their time in the same kernel either
    way, and a noisy timing there (18.9 against 18.7 ms) turned off compiled steps that were
    26% faster at 32."""
    timings: tuple[tuple[int, float, float], ...]
    """(rows, eager ms, compiled ms) of each timed batch size."""


def compile_decode(
    model: LlamaModel,
    cache: KVCache,
    max_sequences: int = TIMED_ROWS[-1],
    timer: Callable[[], float] = time.perf_counter,
    always: bool = False,
) -> CompileReport | None:
    """Compile the model's decode step, warm it up, check it against eager, and time both;
    None (eager kept) if compilation fails, differs, or is nowhere faster (unless
    ``always``: then kept for every batch whatever the timings)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        log.info("no C++ compiler on PATH: decode steps run eagerly")
        return None
    started = time.perf_counter()
    worst = 0.0
    model.compiled_rows = max_sequences
    try:
        model.layers_per_call = layers_per_call(len(model.blocks))
        options = {**WITHOUT_ASSERTS, "guard_filter_fn": without_weight_checks}
        compiled = torch.compile(own_copy(decode_layers), fullgraph=True, options=options)
        # decode_layers(blocks, x, cos, sin, k_caches, v_caches, cache_index, block_tables,
        # lengths): every argument but the layers and the caches has a row a sequence
        tracing = _sizes_marked(compiled, rows=(1, 2, 3, 6, 7, 8), blocks=7)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for sequences, blocks in WARM_SHAPES:
                step = _null_step(model, sequences, blocks)
                hidden = null_hidden(model, sequences)
                difference = _difference(model, step, cache, hidden, "decode_layers", tracing)
                worst = max(worst, difference)
            timings = _timings(model, cache, compiled, max_sequences, timer)
    except Exception as err:  # inductor raises many kinds; the eager path always works
        model.decode_layers = None
        log.warning("compiling the decode step failed, running eagerly: %s", err, exc_info=True)
        return None
    if worst > PARITY_TOLERANCE.get(model.dtype, PARITY_TOLERANCE[torch.float32]):
        model.decode_layers = None
        log.warning("compiled decode step differs from eager by %.2g: running eagerly", worst)
        return None
    faster = [size for size, eager_ms, compiled_ms in timings if compiled_ms < eager_ms]
    rows = timings[-1][0] if always else max(faster, default=0)
    for size, eager_ms, compiled_ms in timings:
        log.info("decode step of %d: %.1f ms eager, %.1f ms compiled", size, eager_ms, compiled_ms)
    if rows == 0:
        model.decode_layers = None
        log.info("the compiled decode step is not faster here: running eagerly")
        return None
    model.compiled_rows = max_sequences if rows == timings[-1][0] else rows
    report = CompileReport(time.perf_counter() - started, worst, model.compiled_rows, timings)
    log.info(
        "decode step compiled in %.1fs (max difference %.1g), used up to %d sequences",
        report.seconds,
        worst,
        model.compiled_rows,
    )
    return report


PREFILL_WARM_TOKENS = (1, 7)
"""Tokens of the prefill steps run at load: inductor specialises size 1 apart."""
PREFILL_TIMED_TOKENS = 128


@dataclass(frozen=True)
class PrefillReport:
    seconds: float
    max_difference: float
    eager_ms: float
    compiled_ms: float
    """A prefill step of ``PREFILL_TIMED_TOKENS`` tokens, each way."""


def compile_prefill(
    model: LlamaModel,
    cache: KVCache,
    timer: Callable[[], float] = time.perf_counter,
    always: bool = False,
) -> PrefillReport | None:
    """Compile the parts of a layer around attention for steps with prompt chunks (attention
    stays eager: the chunks vary in number): a layer's norms, products, rotary, residual
    adds and MLP as a few fused loops. Warmed up, checked against eager and timed at load;
    None (eager kept) if compilation fails, differs, or is not faster."""
    started = time.perf_counter()
    worst = 0.0
    try:
        parts = (
            torch.compile(own_copy(layer_qkv), fullgraph=True, options=WITHOUT_ASSERTS),
            torch.compile(own_copy(layer_out), fullgraph=True, options=WITHOUT_ASSERTS),
        )
        # layer_qkv(block, x, cos, sin) and layer_out(block, x, attended): a row a token
        tracing = (_sizes_marked(parts[0], rows=(1, 2, 3)), _sizes_marked(parts[1], rows=(1, 2)))
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for tokens in PREFILL_WARM_TOKENS:
                step, hidden = _null_prefill(model, cache, tokens), null_hidden(model, tokens)
                difference = _difference(model, step, cache, hidden, "prefill_parts", tracing)
                worst = max(worst, difference)
            step = _null_prefill(model, cache, PREFILL_TIMED_TOKENS)
            hidden = null_hidden(model, PREFILL_TIMED_TOKENS)
            eager_ms, compiled_ms = _alternating_ms(
                model, step, cache, hidden, "prefill_parts", parts, timer
            )
    except Exception as err:  # inductor raises many kinds; the eager path always works
        model.prefill_parts = None
        log.warning("compiling the prefill parts failed, running eagerly: %s", err, exc_info=True)
        return None
    model.prefill_parts = None
    if worst > PARITY_TOLERANCE.get(model.dtype, PARITY_TOLERANCE[torch.float32]):
        log.warning("compiled prefill parts differ from eager by %.2g: running eagerly", worst)
        return None
    report = PrefillReport(time.perf_counter() - started, worst, eager_ms, compiled_ms)
    log.info(
        "prefill step of %d tokens: %.1f ms eager, %.1f ms compiled",
        PREFILL_TIMED_TOKENS,
        report.eager_ms,
        report.compiled_ms,
    )
    if report.compiled_ms >= report.eager_ms and not always:
        return None
    model.prefill_parts = parts
    return report


def _sizes_marked(compiled: Callable, rows: tuple[int, ...], blocks: int | None = None) -> Callable:
    """``compiled``, called with the sizes that vary between steps marked dynamic for Dynamo
    to trace: the first dimension (tokens or sequences) of the arguments at positions
    ``rows`` unless it is 1 (inductor specialises 1 apart), and the second (blocks) of the
    block tables at position ``blocks``. Every other size (the weights', the KV cache's)
    stays fixed, as the model it was traced for: compiled with every size symbolic, the
    demo's decode step took 42 s to compile instead of 28, and ran no faster. Only the
    warm-up calls go through this; the graphs they build then serve every step."""

    def call(*args):
        for position in rows:
            if args[position].shape[0] > 1:
                torch._dynamo.mark_dynamic(args[position], 0)
        if blocks is not None:
            torch._dynamo.mark_dynamic(args[blocks], 1)
        return compiled(*args)

    return call


def without_weight_checks(entries: list) -> list[bool]:
    """Which of Dynamo's guards a compiled decode step keeps (a ``guard_filter_fn``): all but
    the tensor checks of the layers' own tensors (sources under ``blocks``), about a hundred a
    call (96 of 776 for six demo layers in int8), which took half of Dynamo's lookup before
    each call (130 against 67 us; 0.3 ms of a one-sequence step of five calls). Those checks
    could only fail if a layer's weights changed shape, dtype or device after load, and
    nothing does: a model's weights are set before it compiles, and each model compiles a
    copy of its own of the function (``own_copy``), so no other model's layers reach it.
    Every other guard stays: each step's inputs, the KV caches, the number of layers and
    their Python attributes."""
    return [
        not (entry.guard_type == "TENSOR_MATCH" and entry.name.startswith("blocks"))
        for entry in entries
    ]


def own_copy(function: Callable) -> Callable:
    """``function`` with a code object of its own. Dynamo keeps the variants it compiles per
    code object, at most ``recompile_limit`` (8) of them, and each model (its dtype, sizes and
    kernels) needs its own two: compiled from the one shared function, a process's fifth
    differently made model would find the limit reached and run eagerly (as a long test
    session did). A copy per model also spares each step the guards of other models'
    variants, and goes with the model when it is unloaded."""
    code = function.__code__.replace()
    return types.FunctionType(
        code, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )


def _null_prefill(model: LlamaModel, cache: KVCache, tokens: int) -> StepInput:
    """A prefill step that reads and writes only the null block (block 0)."""
    blocks = torch.zeros(-(-tokens // cache.block_size), dtype=torch.long)
    return StepInput(
        input_ids=torch.arange(tokens) % model.config.vocab_size,
        positions=torch.arange(tokens),
        cache_index=torch.zeros(tokens, dtype=torch.long),
        decode=None,
        prefills=[PrefillRows(0, tokens, blocks, 0)],
        logits_rows=torch.tensor([tokens - 1]),
    )


def _timings(
    model: LlamaModel, cache: KVCache, compiled, max_sequences: int, timer
) -> tuple[tuple[int, float, float], ...]:
    sizes = [size for size in TIMED_ROWS if size <= max_sequences] or [max_sequences]
    timings = []
    for size in sizes:
        step = _null_step(model, size, MIN_BLOCKS)
        hidden = null_hidden(model, size)
        eager_ms, compiled_ms = _alternating_ms(
            model, step, cache, hidden, "decode_layers", compiled, timer
        )
        timings.append((size, eager_ms, compiled_ms))
    model.decode_layers = compiled
    return tuple(timings)


def _difference(
    model: LlamaModel, step: StepInput, cache: KVCache, hidden, attribute: str, compiled
) -> float:
    """How far ``step``'s logits with ``model.<attribute>`` set to ``compiled`` lie from the
    eager ones (the attribute None), relative to the largest eager logit; the attribute is
    left set to ``compiled``."""
    setattr(model, attribute, None)
    expected = model(step, cache, hidden)
    setattr(model, attribute, compiled)
    got = model(step, cache, hidden)
    scale = float(expected.abs().max()) or 1.0
    return float((got - expected).abs().max()) / scale


def _alternating_ms(
    model: LlamaModel, step: StepInput, cache: KVCache, hidden, attribute: str, compiled, timer
) -> tuple[float, float]:
    """Median ms of ``step`` eager (``model.<attribute>`` None) and with ``compiled``, timed in
    ``TIMED_STEPS`` alternating rounds (a step each way per round, after one each way to warm
    up), so that a burst of other work on the machine slows both ways rather than one: timed
    one way after the other, a busy moment once made compiled steps look slower than eager at
    one sequence, and a load with only that size to time ran eagerly."""
    ways = (None, compiled)
    times: tuple[list[float], list[float]] = ([], [])
    for way in ways:
        setattr(model, attribute, way)
        model(step, cache, hidden)
    for _ in range(TIMED_STEPS):
        for way, taken in zip(ways, times, strict=True):
            setattr(model, attribute, way)
            begun = timer()
            model(step, cache, hidden)
            taken.append((timer() - begun) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def null_hidden(model: LlamaModel, sequences: int) -> torch.Tensor | None:
    """Hidden states for a pipeline stage that does not embed (None for one that does)."""
    if model.embed is not None:
        return None
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(sequences, model.config.hidden_size, generator=generator)
    return hidden.to(model.dtype)


def _null_step(model: LlamaModel, sequences: int, blocks: int) -> StepInput:
    """A decode step that reads and writes only the null block (block 0)."""
    block_size = 1
    return StepInput(
        input_ids=torch.arange(sequences) % model.config.vocab_size,
        positions=torch.zeros(sequences, dtype=torch.long),
        cache_index=torch.zeros(sequences, dtype=torch.long),
        decode=DecodeRows(
            sequences,
            torch.zeros(sequences, blocks, dtype=torch.long),
            torch.full((sequences,), block_size, dtype=torch.long),
        ),
        prefills=[],
        logits_rows=torch.arange(sequences),
    )
