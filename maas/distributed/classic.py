"""Pipeline-parallel inference of a classic torch model: its layers in K stages, each a process.

A built-in architecture that runs as a sequence of layers says so with ``pipeline_layers()``
(the small CNN: its conv blocks, then its head); an ``nn.Sequential`` is one by construction.
The layers are cut into K stages of about 1/K of the bytes (maas.distributed.plan). Each stage
process builds the architecture on the meta device, materialises only its own layers and reads
only their tensors from the version's safetensors file, then joins a gloo group over 127.0.0.1.

The server sends a batch to stage 0 over a pipe, cut into up to K micro-batches; stage 0 runs
them one after the other and sends each on as soon as it is done, so that stage 1 works on the
first while stage 0 works on the second (GPipe's forward). Activations travel as a header
(kind, dtype, shape) and the tensor; the last stage sends each micro-batch's output back over
a pipe, and ``predict`` puts them together. An error in a stage travels down as an error
header, so the batch fails with the stage's message and the pipeline goes on; a stage that
dies breaks the pipes or its neighbours' connections, and the deployment reports itself dead,
so the pool loads it again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from maas.distributed.pipeline import PipelineSpec, join
from maas.distributed.plan import SplitPlan, module_units, split
from maas.errors import StageLost, Unavailable, UnsupportedFormat
from maas.logs import ChildLogging
from maas.registry.manifest import Manifest
from maas.registry.records import OpenedVersion
from maas.runtime.base import Runtime, RuntimeOptions

log = logging.getLogger(__name__)

STOP, TENSOR, ERROR = 0, 1, 2
HEADER = 8
"""int64 words: kind, dtype code, number of dimensions, then up to 5 sizes."""
DTYPE_CODES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]
START_TIMEOUT = 300.0
REPLY_POLL = 0.2
"""Seconds between checks that the stages are alive while a batch is out."""


def pipeline_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers ``module`` runs one after the other, named as in its state dict."""
    if hasattr(module, "pipeline_layers"):
        return module.pipeline_layers()
    if isinstance(module, nn.Sequential):
        return list(module.named_children())
    raise UnsupportedFormat(
        f"{type(module).__name__} cannot be split into pipeline stages: its forward is not a "
        "sequence of layers (architectures that are say so with pipeline_layers())"
    )


class Chain(nn.ModuleList):
    """Layers run one after the other, each taking what the one before gave: one tensor or a
    tuple of them (the text classifiers' steps pass the token mask along)."""

    def forward(self, *inputs):
        value = inputs if len(inputs) > 1 else inputs[0]
        for layer in self:
            value = layer(*value) if isinstance(value, tuple) else layer(value)
        return value


def build_meta(manifest: Manifest) -> nn.Module:
    """The version's architecture with no memory behind its weights."""
    from maas.runtime.architectures import build

    config = manifest.config
    with torch.device("meta"):
        return build(config["architecture"], config.get("arguments", {}))


def check_splittable(manifest: Manifest) -> None:
    """Raise ``UnsupportedFormat`` saying why a classic version cannot run in stages."""
    if manifest.runtime != "torch" or "architecture" not in manifest.config:
        raise UnsupportedFormat(
            f"a model of the {manifest.runtime} runtime cannot be split into pipeline stages: "
            "they split maas's built-in torch architectures and Llama-family LLMs"
        )
    if len(manifest.inputs) != 1:
        raise UnsupportedFormat("a model split into pipeline stages takes one input tensor")
    if manifest.config.get("quantization"):
        raise UnsupportedFormat(
            f"a {manifest.config['quantization']} version cannot be split into pipeline "
            "stages yet: split its float parent"
        )
    pipeline_layers(build_meta(manifest))


def classic_plan(opened: OpenedVersion, stages: int) -> SplitPlan:
    check_splittable(opened.manifest)
    module = build_meta(opened.manifest)
    units = module_units(pipeline_layers(module), module)
    return split(units, stages, model=opened.record.reference, dtype="float32")


class StageModule(nn.Module):
    """A run of a model's layers, weights read from the version (only theirs)."""

    def __init__(self, opened: OpenedVersion, names: tuple[str, ...]) -> None:
        super().__init__()
        from maas.runtime.safetensors_ranges import SafetensorsFile

        layers = dict(pipeline_layers(build_meta(opened.manifest)))
        self.names = names
        self.layers = Chain(layers[name].to_empty(device="cpu") for name in names)
        path = opened.manifest.config.get("weights", "model.safetensors")
        with opened.open_file(path) as plain:
            weights = SafetensorsFile(plain)
            try:
                for name, layer in zip(names, self.layers, strict=True):
                    state = {}
                    for key in layer.state_dict():
                        tensor = weights.get(f"{name}.{key}")
                        if tensor is None:
                            raise UnsupportedFormat(f"the weights have no tensor {name}.{key}")
                        state[key] = tensor
                    layer.load_state_dict(state, strict=True)
            finally:
                weights.close()
        self.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _send(tensor: torch.Tensor, dst: int):
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[0], header[1], header[2] = TENSOR, DTYPE_CODES.index(tensor.dtype), tensor.dim()
    header[3 : 3 + tensor.dim()] = torch.tensor(tensor.shape)
    return [dist.isend(header, dst), dist.isend(tensor.contiguous(), dst)]


def _send_stop(dst: int) -> None:
    dist.send(torch.zeros(HEADER, dtype=torch.int64), dst)  # kind 0: STOP


def _send_error(message: str, dst: int) -> None:
    """An error travels as its UTF-8 bytes, so the last stage can tell the server why."""
    data = torch.frombuffer(bytearray(message.encode()[:4096] or b"?"), dtype=torch.uint8)
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[0], header[2], header[3] = ERROR, 1, data.numel()
    dist.send(header, dst)
    dist.send(data, dst)


def _recv(src: int) -> tuple[int, torch.Tensor | str | None]:
    """(TENSOR, the tensor), (ERROR, its message) or (STOP, None)."""
    header = torch.empty(HEADER, dtype=torch.int64)
    dist.recv(header, src)
    kind, code, dims = header[:3].tolist()
    if kind == STOP:
        return kind, None
    shape = header[3 : 3 + dims].tolist()
    tensor = torch.empty(shape, dtype=torch.uint8 if kind == ERROR else DTYPE_CODES[code])
    dist.recv(tensor, src)
    if kind == ERROR:
        return kind, bytes(tensor.numpy()).decode(errors="replace")
    return kind, tensor


@dataclass(frozen=True)
class StageArgs:
    spec: PipelineSpec
    names: tuple[str, ...]
    threads: int
    logs: ChildLogging
    """How the stage logs: as the server does (maas/logs.py)."""


def serve_stage(args: StageArgs, opened: OpenedVersion, inbox, outbox, ready) -> None:
    """A stage process: load its layers, report, then run micro-batches until told to stop.
    Stage 0 reads batches from ``inbox``; the last stage writes outputs to ``outbox``."""
    args.logs.apply()
    torch.set_num_threads(args.threads)
    rank, world = args.spec.rank, args.spec.world_size
    try:
        join(args.spec)
        module = StageModule(opened, args.names)
    except Exception as err:
        ready.send(f"stage {rank}: {type(err).__name__}: {err}")
        return
    ready.send(None)
    ready.close()
    try:
        if rank == 0:
            _first(module, world, inbox, outbox)
        else:
            _later(module, rank, world, outbox)
    except (RuntimeError, EOFError, OSError) as err:  # a neighbour or the server is gone
        log.error("pipeline stage %d stops: %s", rank, err)
        return
    with contextlib.suppress(RuntimeError):
        dist.destroy_process_group()


def _first(module: StageModule, world: int, inbox, outbox) -> None:
    while True:
        message = inbox.recv()
        if message is None:
            if world > 1:
                _send_stop(1)
            return
        pending = []
        for micro in message:
            try:
                out = module(torch.from_numpy(micro))
            except Exception as err:  # the batch fails with this message; the stage goes on
                log.warning("pipeline stage 0 failed a micro-batch: %s", err)
                _pass(("error", f"{type(err).__name__}: {err}"), 0, world, outbox, pending)
                continue
            _pass(("ok", out), 0, world, outbox, pending)
        for work in pending:
            work.wait()


def _later(module: StageModule, rank: int, world: int, outbox) -> None:
    pending: list = []
    while True:
        kind, received = _recv(rank - 1)
        for work in pending:  # the previous micro-batch's sends are done before this one's
            work.wait()
        pending = []
        if kind == STOP:
            if rank < world - 1:
                _send_stop(rank + 1)
            return
        if kind == ERROR:
            _pass(("error", received), rank, world, outbox, pending)
            continue
        try:
            out = module(received)
        except Exception as err:
            log.warning("pipeline stage %d failed a micro-batch: %s", rank, err)
            _pass(("error", f"{type(err).__name__}: {err}"), rank, world, outbox, pending)
            continue
        _pass(("ok", out), rank, world, outbox, pending)


def _pass(result: tuple[str, object], rank: int, world: int, outbox, pending: list) -> None:
    """A micro-batch's result to the next stage, or from the last one to the server."""
    status, value = result
    if rank == world - 1:
        outbox.send((status, value.numpy() if status == "ok" else value))
    elif status == "ok":
        pending += _send(value, rank + 1)
    else:
        _send_error(value, rank + 1)


class PipelinedTorchRuntime(Runtime):
    """A built-in torch architecture split into ``stages`` processes (see the module)."""

    def __init__(self, opened: OpenedVersion, options: RuntimeOptions, stages: int) -> None:
        super().__init__(opened, options)
        self.stages = stages
        self.plan = classic_plan(opened, stages)
        self.processes: list = []
        self.on_dead: Callable[[], None] | None = None
        self._dead = False
        self._closing = False
        self._lock = threading.Lock()

    @property
    def dead(self) -> bool:
        return self._dead

    @property
    def memory_bytes(self) -> int:
        return self.plan.bytes

    def load(self) -> None:
        from maas.distributed.stages import free_address

        context = multiprocessing.get_context("spawn")
        address = free_address()
        threads = max(1, self.options.threads // self.stages)
        stage_inbox, self._to_stages = context.Pipe(duplex=False)  # (receiving, sending)
        self._from_stages, stage_outbox = context.Pipe(duplex=False)
        readies = []
        for stage in self.plan.stages:
            spec = PipelineSpec(stage.index, self.stages, address, stage.unit_range)
            mine, theirs = context.Pipe(duplex=False)
            process = context.Process(
                target=serve_stage,
                args=(
                    StageArgs(spec, stage.units, threads, ChildLogging.of_parent()),
                    self.opened,
                    stage_inbox if stage.index == 0 else None,
                    stage_outbox if stage.index == self.stages - 1 else None,
                    theirs,
                ),
                name=f"stage-{stage.index}-{self.opened.record.reference}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            readies.append(mine)
        stage_inbox.close()
        stage_outbox.close()
        try:
            self._wait_ready(readies)
        except BaseException:
            self._kill()
            raise
        threading.Thread(target=self._watch, name="stages-watch", daemon=True).start()

    def _wait_ready(self, readies) -> None:
        for index, ready in enumerate(readies):
            if not ready.poll(START_TIMEOUT):
                raise Unavailable(f"pipeline stage {index} did not load in {START_TIMEOUT:.0f}s")
            try:
                error = ready.recv()
            except EOFError:
                code = self.processes[index].exitcode
                raise Unavailable(
                    f"pipeline stage {index} exited while loading (exit code {code})"
                ) from None
            if error:
                raise Unavailable(f"failed to load: {error}")
            ready.close()

    def _watch(self) -> None:
        wait([process.sentinel for process in self.processes])
        if self._closing:
            return
        self._dead = True
        log.error("a pipeline stage of %s exited: reloading it", self.opened.record.reference)
        self._kill()
        if self.on_dead:
            self.on_dead()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        array = np.ascontiguousarray(inputs[self.inputs[0].name])
        micro = [m for m in np.array_split(array, min(self.stages, len(array))) if len(m)]
        with self._lock:
            if self._dead or self._closing:
                raise StageLost(f"{self.opened.record.reference} lost a pipeline stage; retry")
            try:
                self._to_stages.send(micro)
                replies = [self._reply() for _ in micro]
            except (EOFError, OSError):
                raise StageLost(
                    f"a pipeline stage of {self.opened.record.reference} stopped; it is "
                    "reloading, retry the request"
                ) from None
        errors = [message for status, message in replies if status == "error"]
        if errors:
            raise RuntimeError(errors[0])
        return {self.outputs[0].name: np.concatenate([out for _, out in replies])}

    def _reply(self):
        """The last stage's next reply; EOFError once a stage has died (the watcher says so
        even where the pipe's end lives on in another process)."""
        while not self._from_stages.poll(REPLY_POLL):
            if self._dead or self._closing:
                raise EOFError
        return self._from_stages.recv()

    def unload(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._to_stages.send(None)
        for process in self.processes:
            process.join(30)
        self._kill()
        for pipe in (self._to_stages, self._from_stages):
            pipe.close()

    def _kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
