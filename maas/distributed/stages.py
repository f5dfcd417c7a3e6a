"""Starting and watching the processes of a pipeline's later stages (ranks 1..K-1) on this
machine; rank 0 is the engine process itself (maas.engine.process)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
from dataclasses import replace
from multiprocessing.connection import wait

from maas.distributed.pipeline import PipelineSpec, serve_stage
from maas.distributed.plan import SplitPlan, llama_plan
from maas.errors import Unavailable
from maas.logs import ChildLogging
from maas.messages import EngineLoadError
from maas.runtime.llm.options import RunnerOptions
from maas.runtime.llm.quantized import stored_method
from maas.runtime.llm.weights import read_config

log = logging.getLogger(__name__)


def plan_for(opened, stages: int, dtype: str) -> SplitPlan:
    """The split of a version's model into ``stages``."""
    config = read_config(opened)
    stored = stored_method(opened)
    return llama_plan(config, stages, model=opened.record.reference, dtype=dtype, stored=stored)


def stage_options(options: RunnerOptions, stages: int) -> RunnerOptions:
    """Each stage's options: the threads (the machine's cores by default) shared among the
    stages, which compute at the same time."""
    threads = max(1, (options.threads or os.cpu_count() or 1) // stages)
    return replace(options, threads=threads)


def free_address() -> str:
    """host:port of a free port on the loopback interface, for rank 0's store."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


class StageProcesses:
    """Ranks 1..K-1 of a pipeline, each a process loading its own stage of ``plan``."""

    def __init__(self, opened, options: RunnerOptions, plan: SplitPlan, address: str) -> None:
        context = multiprocessing.get_context("spawn")
        world = len(plan.stages)
        self.plan = plan
        self.processes = []
        self._pipes = []
        for stage in plan.stages[1:]:
            spec = PipelineSpec(stage.index, world, address, stage.unit_range)
            mine, theirs = context.Pipe(duplex=False)
            process = context.Process(
                target=serve_stage,
                args=(spec, opened, options, theirs, ChildLogging.of_parent()),
                name=f"stage-{stage.index}-{opened.record.reference}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self._pipes.append(mine)
        self.memory_bytes = [0] * len(self.processes)

    def wait_any_exit(self) -> None:
        """Block until one of the stages has exited."""
        wait([process.sentinel for process in self.processes])

    def check_ready(self, timeout: float) -> bool:
        """Take the stages' load reports that have come within ``timeout`` s; True once all
        have. Raises ``Unavailable`` if one failed or died while loading."""
        deadline = time.monotonic() + timeout
        while any(pipe is not None for pipe in self._pipes):
            waiting = [p for p in self._pipes if p is not None]
            left = deadline - time.monotonic()
            if left <= 0 or not wait(waiting, left):
                return False
            for index, pipe in enumerate(self._pipes):
                if pipe is None or not pipe.poll():
                    continue
                try:
                    reply = pipe.recv()
                except EOFError:
                    code = self.processes[index].exitcode
                    raise Unavailable(
                        f"pipeline stage {index + 1} exited while loading (exit code {code})"
                    ) from None
                if isinstance(reply, EngineLoadError):
                    raise Unavailable(f"failed to load: {reply.message}")
                self.memory_bytes[index] = reply
                pipe.close()
                self._pipes[index] = None
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Wait for the stages to exit (rank 0 told them to), killing those that do not."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
        for pipe in self._pipes:
            if pipe is not None:
                pipe.close()

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()


class RayStages:
    """Ranks 1..K-1 of a pipeline as Ray actors, one placement-group bundle each, spread over
    the cluster's nodes; rank 0 (the engine process) runs on this machine."""

    def __init__(self, opened, options: RunnerOptions, plan: SplitPlan, ray_address: str):
        import ray

        from maas.distributed import ray_cluster

        ray_cluster.connect(ray_address)
        world = len(plan.stages)
        self._group = ray_cluster.place(world - 1)
        actor = ray.remote(StageActor)
        self.actors = [
            actor.options(**ray_cluster.in_bundle(self._group, i)).remote()
            for i in range(world - 1)
        ]
        where = ray.get([a.where.remote() for a in self.actors])
        host = ray.util.get_node_ip_address()
        self.address = f"{host}:{ray_cluster.free_port(host)}"
        self.interface = "lo" if host.startswith("127.") else ""
        self.plan = plan.placed(["local", *(w.label for w in where)])
        self._loads = [
            a.load.remote(
                PipelineSpec(s.index, world, self.address, s.unit_range, self.interface),
                opened,
                options,
            )
            for a, s in zip(self.actors, plan.stages[1:], strict=True)
        ]
        self.runs = [a.run.remote() for a in self.actors]
        self.memory_bytes = [0] * len(self.actors)
        self.processes = self.actors

    def check_ready(self, timeout: float) -> bool:
        import ray

        done, _ = ray.wait(self._loads, num_returns=len(self._loads), timeout=timeout)
        for ref in done:
            try:
                self.memory_bytes[self._loads.index(ref)] = ray.get(ref)
            except Exception as err:
                raise Unavailable(f"a pipeline stage on Ray failed to load: {err}") from None
        return len(done) == len(self._loads)

    def wait_any_exit(self) -> None:
        import ray

        ray.wait(self.runs, num_returns=1, timeout=None)

    def stop(self, timeout: float = 30.0) -> None:
        import ray

        from maas.distributed import ray_cluster

        ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
        self.kill()
        ray_cluster.release(self._group)

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


class StageActor:
    """A pipeline stage on a Ray node (wrapped with ``ray.remote`` when used)."""

    def where(self):
        from maas.distributed.ray_cluster import here

        return here()

    def load(self, spec: PipelineSpec, opened, options: RunnerOptions) -> int:
        from maas.distributed.pipeline import join
        from maas.runtime.llm.runner import ModelRunner

        self.spec = spec
        join(spec)
        self.runner = ModelRunner(opened, options, layers=spec.layers)
        return self.runner.memory_bytes

    def run(self) -> None:
        from maas.distributed.pipeline import serve_loaded

        serve_loaded(self.spec, self.runner)
