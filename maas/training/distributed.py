"""Data-parallel training: ``world_size`` processes on this machine, ``torch.distributed``
with gloo over loopback and ``DistributedDataParallel``.

Every process holds the whole model and the same sample order; each takes its share of every
global batch (``batch[rank::world]``), and the gradients are summed across them with each
share's loss scaled to its part of the batch's mean, so a step equals one process's step on
the whole batch. Rank 0 reports (through a queue to the worker, which owns the job) and writes
checkpoints; a stop or cancel reaches every process at the same step (a flag all-reduced each
step). The launcher is a seam: a Ray cluster would start the same ranks on its nodes.

``train_together`` runs any job's loop this way: ``entry`` names a function
(``module:function``) that every rank calls as ``entry(reporter, team, *args)`` and that
returns where training stands and the weights to keep; rank 0's are the result.
"""

from __future__ import annotations

import importlib
import queue as queues
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from maas.training.checkpoint import TrainingState

JOIN_SECONDS = 30


class Halted(Exception):
    """The worker asked the team to stop; every rank stops at the same step."""


class Team:
    """A process training alone: rank 0 of 1."""

    rank, world = 0, 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def check(self) -> None:
        """Raise Halted (on every rank alike) when the job must stop."""

    def sum(self, values: list[float]) -> list[float]:
        return values

    def agree(self, flag: bool) -> bool:
        """Rank 0's answer, on every rank."""
        return flag

    def report(self, context, *args: Any, **kwargs: Any) -> None:
        if self.rank == 0:
            context.report(*args, **kwargs)


class DistributedTeam(Team):
    def __init__(self, rank: int, world: int, stop) -> None:
        self.rank, self.world, self._stop = rank, world, stop

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(model)

    def check(self) -> None:
        flag = torch.tensor([1 if self._stop.is_set() else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise Halted

    def sum(self, values: list[float]) -> list[float]:
        summed = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(summed)
        return summed.tolist()

    def agree(self, flag: bool) -> bool:
        decided = torch.tensor([1 if flag else 0])
        dist.broadcast(decided, src=0)
        return bool(decided.item())


class QueueReporter:
    """What a rank has for a job context: rank 0's reports go to the worker through a queue;
    stopping is the team's business (``Team.check``)."""

    def __init__(self, queue, workdir: Path) -> None:
        self.queue, self.workdir = queue, workdir

    def report(self, progress: float | None = None, **fields: Any) -> None:
        self.queue.put(("report", {"progress": progress, **fields}))

    def check(self) -> None:
        """The worker's stop reaches the ranks through the team's flag."""


def train_together(context, world_size: int, entry: str, args: tuple) -> tuple[Any, dict]:
    """Run ``world_size`` ranks of ``entry`` and relay rank 0's reports to ``context`` until
    they finish; if the job must stop (``context`` raises), stop the ranks first."""
    spawn = torch.multiprocessing.get_context("spawn")
    reports, stop = spawn.Queue(), spawn.Event()
    port = _free_port()
    ranks = [
        spawn.Process(
            target=_rank,
            args=(rank, world_size, port, entry, args, str(context.workdir), reports, stop),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    try:
        while True:
            try:
                kind, payload = reports.get(timeout=0.5)
            except queues.Empty:
                ended = [p.exitcode for p in ranks if p.exitcode is not None]
                if any(ended) or len(ended) == len(ranks):
                    raise RuntimeError(  # noqa: B904 - no error of the queue's to chain
                        f"training processes ended without a result (exit codes {ended})"
                    )
                context.check()
                continue
            if kind == "report":
                context.report(**payload)
            elif kind == "error":
                raise RuntimeError(payload)
            else:  # "done": safetensors bytes, which cannot run code when read
                return TrainingState(**payload["state"]), safetensors.torch.load(payload["best"])
    except BaseException:
        stop.set()
        raise
    finally:
        for process in ranks:
            process.join(timeout=JOIN_SECONDS)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)


def _rank(rank, world, port, entry, args, workdir, reports, stop) -> None:
    module, function = entry.split(":")
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        team = DistributedTeam(rank, world, stop)
        run = getattr(importlib.import_module(module), function)
        state, best = run(QueueReporter(reports, Path(workdir)), team, *args)
        if rank == 0:  # the weights as bytes: a shared tensor would die with this process
            best = {k: v.contiguous() for k, v in best.items()}
            reports.put(("done", {"state": state.__dict__, "best": safetensors.torch.save(best)}))
    except Halted:
        pass
    except Exception as err:  # the worker fails the job with it
        reports.put(("error", f"training process {rank}: {err}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
