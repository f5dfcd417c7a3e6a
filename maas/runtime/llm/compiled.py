"""The decode step compiled: each layer of a decode-only step through one fused function.

A decoding step of a small model is thousands of tiny eager ops (about 2.5 us of dispatch
each on a 2-core CPU) around a few matrix products; ``torch.compile`` with the inductor CPU
backend fuses the norms, rotary, residual adds and attention of a layer into a handful of C++
loops, and attention reads each cached block where it lies, once. One compiled function
serves every layer (same code, same shapes: compiled once, not once per layer), with the
batch size and the context as symbolic sizes, so a step's shape never triggers a compile
while serving: the two specialisations inductor makes (one sequence, and several) are built
at load, and checked against the eager path before use. Where compilation is not possible
(no C++ compiler, an op inductor refuses), the eager path runs, as it always can.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

import torch

from maas.runtime.llm.model import DecodeRows, KVCache, LlamaModel, StepInput, decode_layer

log = logging.getLogger(__name__)

PARITY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5}
"""Largest difference allowed between compiled and eager logits (relative to their scale) at
load, by the model's dtype. In float32 the two agree to rounding. In bfloat16 they round at
different places, and eager is the less exact one: on the demo model, eager one-row steps are
0.24 from float32's logits and compiled ones 0.06, so only a broken kernel's garbage (a
difference of the logits' own size) is caught there."""

WARM_SHAPES = ((1, 2), (2, 3))
"""(sequences, blocks each) run at load: inductor specialises size 1, so one sequence and
several are compiled apart. Block tables are padded to at least ``MIN_BLOCKS`` blocks."""

MIN_BLOCKS = 2


@dataclass(frozen=True)
class CompileReport:
    seconds: float
    max_difference: float


def compile_decode(model: LlamaModel, cache: KVCache) -> CompileReport | None:
    """Compile the model's decode step and warm it up; None (eager kept) if that fails."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        log.info("no C++ compiler on PATH: decode steps run eagerly")
        return None
    started = time.perf_counter()
    worst = 0.0
    try:
        compiled = torch.compile(decode_layer, dynamic=True, fullgraph=True)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for sequences, blocks in WARM_SHAPES:
                step = _null_step(model, sequences, blocks)
                model.decode_layer = None
                expected = model(step, cache)
                model.decode_layer = compiled
                got = model(step, cache)
                scale = float(expected.abs().max()) or 1.0
                worst = max(worst, float((got - expected).abs().max()) / scale)
    except Exception as err:  # inductor raises many kinds; the eager path always works
        model.decode_layer = None
        log.warning("compiling the decode step failed, running eagerly: %s", err, exc_info=True)
        return None
    if worst > PARITY_TOLERANCE.get(cache.dtype, PARITY_TOLERANCE[torch.float32]):
        model.decode_layer = None
        log.warning("compiled decode step differs from eager by %.2g: running eagerly", worst)
        return None
    report = CompileReport(time.perf_counter() - started, worst)
    log.info("decode step compiled in %.1fs (max difference %.1g)", report.seconds, worst)
    return report


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
