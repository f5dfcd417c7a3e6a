"""Pipeline-parallel LLM inference: the model's decoder blocks in K stages, each its own process,
hidden states passed stage to stage over ``torch.distributed`` (gloo).

Rank 0 is the engine process: it schedules, runs stage 0 (the embedding and the first blocks),
and samples. Ranks 1..K-1 run ``serve_stage``: each loads only its own blocks (and, the last,
the final norm and LM head; see maas.distributed.plan), keeps the KV cache of its own layers,
and loops: receive a step, run its blocks, pass the hidden states on (the last stage sends the
logits back to rank 0). Every stage has the same number of KV blocks, so the scheduler's block
tables hold for all of them.

A step travels as three tensors: a header (kind, tokens, payload length, logit rows), an int64
payload with everything attention needs (positions, cache slots, block tables, prefill
chunks, logit rows; see ``encode_step``), and the hidden states. Rank 0 sends without waiting
(``isend``) and posts the receive of the logits at once, so the engine can schedule and run
stage 0 of the next micro-batch while later stages work on this one (``PipelineRunner.depth``
steps in flight). Each stage handles steps in the order they were sent, which keeps the KV
cache consistent when a block freed by one micro-batch is reused by the next.

A stage that dies breaks its neighbours' connections: gloo raises at once, rank 0 raises
``StageLost``, and the engine process exits, so the server fails the requests as unavailable
(503) and loads the deployment again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from maas.errors import StageLost
from maas.logs import ChildLogging
from maas.runtime.llm.model import DecodeRows, PrefillRows, StepInput
from maas.runtime.llm.runner import ModelRunner, RunnerOptions

log = logging.getLogger(__name__)

STEP, STOP = 1, 0
"""Header kinds."""

HEADER = 4
"""int64 words of a header: kind, tokens, payload length, logit rows."""

TIMEOUT = timedelta(seconds=300)
"""A send or receive that waits longer than this fails (a stage that hangs)."""


@dataclass(frozen=True)
class PipelineSpec:
    """How one process joins a pipeline."""

    rank: int
    world_size: int
    address: str
    """host:port of rank 0's rendezvous store."""
    layers: range
    """This stage's decoder blocks."""
    socket_interface: str = "lo"
    """The network interface gloo uses (loopback for processes on one machine)."""


def join(spec: PipelineSpec) -> None:
    """Join the pipeline's process group (every stage calls this at start)."""
    if spec.socket_interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", spec.socket_interface)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{spec.address}",
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=TIMEOUT,
    )


def encode_step(step: StepInput) -> Tensor:
    """What every stage after the first needs of a step (not the token ids), as int64."""
    tokens = int(step.positions.shape[0])
    decode = step.decode
    words = [tokens, len(step.prefills), int(step.logits_rows.shape[0])]
    if decode is None:
        words += [-1, 0]
    else:
        words += [decode.count, int(decode.block_tables.shape[1])]
    parts = [torch.tensor(words), step.positions, step.cache_index, step.logits_rows]
    if decode is not None:
        parts += [decode.block_tables.reshape(-1), decode.lengths]
    for chunk in step.prefills:
        parts += [torch.tensor([chunk.start, chunk.end, chunk.past, len(chunk.blocks)])]
        parts.append(chunk.blocks)
    return torch.cat([part.to(torch.int64) for part in parts])


def decode_step(payload: Tensor) -> StepInput:
    """``encode_step``'s inverse (the token ids left empty)."""
    tokens, prefills, rows, count, width = payload[:5].tolist()
    at = 5

    def take(n: int) -> Tensor:
        nonlocal at
        at += n
        return payload[at - n : at]

    positions, cache_index, logits_rows = take(tokens), take(tokens), take(rows)
    decode = None
    if count >= 0:
        tables = take(count * width).view(count, width)
        decode = DecodeRows(count, tables, take(count))
    chunks = []
    for _ in range(prefills):
        start, end, past, blocks = take(4).tolist()
        chunks.append(PrefillRows(start, end, take(blocks), past))
    return StepInput(
        torch.empty(0, dtype=torch.int64), positions, cache_index, decode, chunks, logits_rows
    )


@dataclass
class Pending:
    """A step on its way through the stages."""

    sends: list
    receive: object
    logits: Tensor


class PipelineRunner(ModelRunner):
    """Rank 0: stage 0's blocks here, the rest in other processes; ``depth`` = stages."""

    def __init__(self, opened, options: RunnerOptions, spec: PipelineSpec, tokenizer=None):
        join(spec)
        super().__init__(opened, options, tokenizer, layers=spec.layers)
        self.depth = spec.world_size
        self.last = spec.world_size - 1

    def submit(self, step: StepInput) -> Pending:
        hidden = self.model(step, self.cache)
        payload = encode_step(step)
        rows = int(step.logits_rows.shape[0])
        header = torch.tensor([STEP, hidden.shape[0], payload.shape[0], rows])
        logits = torch.empty(rows, self.config.vocab_size)
        try:
            sends = [dist.isend(t.contiguous(), 1) for t in (header, payload, hidden)]
            receive = dist.irecv(logits, self.last)
        except RuntimeError as err:
            raise StageLost(f"a pipeline stage is gone: {err}") from err
        return Pending(sends, receive, logits)

    def result(self, pending: Pending) -> Tensor:
        try:
            for work in pending.sends:
                work.wait()
            pending.receive.wait()
        except RuntimeError as err:
            raise StageLost(f"a pipeline stage is gone: {err}") from err
        return pending.logits

    def forward(self, step: StepInput) -> Tensor:
        return self.result(self.submit(step))

    def stop(self) -> None:
        """Tell the stages to exit (each passes it on), then leave the group."""
        with contextlib.suppress(RuntimeError):  # a stage already gone: nothing to stop
            dist.send(torch.tensor([STOP, 0, 0, 0]), 1)
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()


def serve_stage(
    spec: PipelineSpec, opened, options: RunnerOptions, ready, logs: ChildLogging
) -> None:
    """A stage process (rank >= 1): load, say so on ``ready`` (a pipe), then run steps until
    told to stop or until a neighbour is gone. It logs as its parent does (``logs``)."""
    from maas.messages import EngineLoadError

    logs.apply()

    try:
        join(spec)
        runner = ModelRunner(opened, options, layers=spec.layers)
    except Exception as err:  # reported to the server, which fails the load
        ready.send(EngineLoadError(f"stage {spec.rank}: {type(err).__name__}: {err}"))
        return
    ready.send(runner.memory_bytes)
    ready.close()
    serve_loaded(spec, runner)


def serve_loaded(spec: PipelineSpec, runner: ModelRunner) -> None:
    """Run steps until told to stop or until a neighbour is gone (the server then reloads
    the whole pipeline)."""
    try:
        _run(spec, runner)
    except RuntimeError as err:
        log.error("pipeline stage %d stops: %s", spec.rank, err)
        return
    dist.destroy_process_group()


def _run(spec: PipelineSpec, runner: ModelRunner) -> None:
    previous, last = spec.rank - 1, spec.rank == spec.world_size - 1
    hidden_dtype = runner.model.dtype
    size = runner.config.hidden_size
    sending: list = []
    while True:
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.recv(header, previous)
        kind, tokens, length, rows = header.tolist()
        if kind == STOP:
            if not last:
                dist.send(header, spec.rank + 1)
            return
        payload = torch.empty(length, dtype=torch.int64)
        dist.recv(payload, previous)
        hidden = torch.empty(tokens, size, dtype=hidden_dtype)
        dist.recv(hidden, previous)
        out = runner.model(decode_step(payload), runner.cache, hidden)
        for work in sending:  # the previous step's sends are done before this one's
            work.wait()
        if last:
            sending = [dist.isend(out.contiguous(), 0)]
        else:
            nxt = spec.rank + 1
            sending = [dist.isend(t, nxt) for t in (header, payload, out.contiguous())]
