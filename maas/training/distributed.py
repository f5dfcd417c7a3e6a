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

from maas.training import checkpoint
from maas.training.checkpoint import TrainingState

JOIN_SECONDS = 30


class Halted(Exception):
    """The worker asked the team to stop; every rank stops at the same step."""


class Team:
    """A process training alone: rank 0 of 1."""

    rank, world = 0, 1
    reporting_rank = 0
    """The rank whose step losses are reported."""
    checkpoint_part = ""
    """The part of a checkpoint this rank writes and reads (``""``: the whole model)."""

    @property
    def writes_checkpoint(self) -> bool:
        return self.rank == 0

    def keep_own_part(self, model: torch.nn.Module, layers=None) -> str | None:
        """Free the parts of ``model`` (its ``layers`` in run order, by default its
        ``pipeline_layers``) this rank does not train: they go to the meta device, before
        its optimiser is made. A line saying what it holds, or None: all of it."""
        return None

    def share(self, batch: list) -> list | None:
        """This rank's share of a batch; None when the batch is too small to give every
        share one sample (every rank skips it alike)."""
        return batch

    def save_checkpoint(self, folder, state, model, best, optimizer, scheduler, generator):
        """A checkpoint: each rank that writes one writes its part, then rank 0 commits it."""
        if self.rank == 0:
            checkpoint.begin(folder)
        self.barrier()
        if self.writes_checkpoint:
            part = self.checkpoint_part
            checkpoint.write_part(folder, part, model, best, optimizer, generator)
        self.barrier()
        if self.rank == 0:
            checkpoint.commit(folder, state, scheduler)

    def result_part(self, best: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """This rank's share of the weights the job keeps (None: another rank's are)."""
        return best if self.rank == 0 else None

    def epoch_metrics(self) -> dict[str, float]:
        """What the strategy measured over the epoch, for its row (rank 0's count)."""
        return {}

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def check(self) -> None:
        """Raise Halted (on every rank alike) when the job must stop."""

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""

    def sum(self, values: list[float]) -> list[float]:
        return values

    def agree(self, flag: bool) -> bool:
        """Rank 0's answer, on every rank."""
        return flag

    def validate(self, model: torch.nn.Module, split, loss_fn) -> dict[str, float]:
        """Validation loss and accuracy of a classifier, the same on every rank."""
        return classifier_metrics(model, split, loss_fn)

    def report(self, context, *args: Any, **kwargs: Any) -> None:
        if self.rank == 0:
            context.report(*args, **kwargs)


class DistributedTeam(Team):
    def __init__(self, rank: int, world: int, stop) -> None:
        self.rank, self.world, self._stop = rank, world, stop

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(model)

    def share(self, batch: list) -> list | None:
        return batch[self.rank :: self.world] if len(batch) >= self.world else None

    def check(self) -> None:
        flag = torch.tensor([1 if self._stop.is_set() else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise Halted

    def barrier(self) -> None:
        dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        summed = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(summed)
        return summed.tolist()

    def agree(self, flag: bool) -> bool:
        decided = torch.tensor([1 if flag else 0])
        dist.broadcast(decided, src=0)
        return bool(decided.item())

    def validate(self, model: torch.nn.Module, split, loss_fn) -> dict[str, float]:
        """Rank 0 validates (it holds the whole model); every rank gets its figures."""
        shared = [classifier_metrics(model, split, loss_fn) if self.rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]


@torch.no_grad()
def classifier_metrics(model: torch.nn.Module, split, loss_fn) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``split`` (inputs, labels), in chunks of 512."""
    inputs, labels = split
    if not len(labels):
        return {}
    model.eval()
    logits = torch.cat([model(inputs[i : i + 512]) for i in range(0, len(labels), 512)])
    return {
        "val_loss": float(loss_fn(logits, labels)),
        "val_accuracy": float((logits.argmax(-1) == labels).float().mean()),
    }


class QueueReporter:
    """What a rank has for a job context: rank 0's reports go to the worker through a queue;
    stopping is the team's business (``Team.check``)."""

    def __init__(self, queue, workdir: Path) -> None:
        self.queue, self.workdir = queue, workdir

    def report(self, progress: float | None = None, **fields: Any) -> None:
        self.queue.put(("report", {"progress": progress, **fields}))

    def check(self) -> None:
        """The worker's stop reaches the ranks through the team's flag."""


def train_together(
    context, world_size: int, entry: str, args: tuple, team: dict | None = None
) -> tuple[Any, dict]:
    """Run ``world_size`` ranks of ``entry`` and relay rank 0's reports to ``context`` until
    they finish; if the job must stop (``context`` raises), stop the ranks first. ``team``
    names another strategy than data parallel (see ``make_team``). With
    ``MAAS_RAY_ADDRESS`` set, the ranks are Ray actors on the cluster's nodes
    (``_together_on_ray``)."""
    if context.settings.ray_address:
        return _together_on_ray(context, world_size, entry, args, team)
    processes = _rank_processes()
    reports, stop = processes.Queue(), processes.Event()
    port = _free_port()
    ranks = [
        processes.Process(
            target=_rank,
            args=(
                rank,
                world_size,
                f"127.0.0.1:{port}",
                entry,
                args,
                str(context.workdir),
                reports,
                stop,
                team,
            ),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()

    def ended() -> str | None:
        codes = [p.exitcode for p in ranks if p.exitcode is not None]
        if any(codes) or len(codes) == len(ranks):
            return f"training processes ended without a result (exit codes {codes})"
        return None

    try:
        return _relay(context, reports, queues.Empty, ended, world_size)
    except BaseException:
        stop.set()
        raise
    finally:
        for process in ranks:
            process.join(timeout=JOIN_SECONDS)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)


RANK_MODULES = (
    "maas.training.distributed",
    "maas.training.train",
    "maas.training.strategies",
    "maas.training.parameter_server",
    "maas.training.fine_tune",
    "transformers",
    "peft",
)
"""What the ranks' fork server imports once, before its first fork (a module missing from
this install, such as peft without the training extra, is skipped)."""


def _rank_processes():
    """Ranks are forks of multiprocessing's fork server, a process started by this worker's
    first team that imported torch and ``RANK_MODULES``; spawned afresh, every rank imported
    them itself, all ranks at once on the machine's cores (1.3 s for torch alone on two
    cores, 2.5 s more for a fine-tuning rank's transformers and peft). Its ranks are as
    spawned ones otherwise: a clean process without the worker's threads or state (the
    server is single-threaded, so forking it is safe), taking everything they need as
    arguments; the environment is the server's, as it was at its start. The server stays
    until the worker exits, for the next team."""
    processes = torch.multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(list(RANK_MODULES))
    return processes


def _relay(context, reports, empty: type[Exception], ended, world: int) -> tuple[Any, dict]:
    """Pass the ranks' reports on to ``context`` until all ``world`` are done; ``ended()``
    says why the ranks stopped without a result (None while they run)."""
    done: dict[int, dict] = {}
    while True:
        try:
            kind, payload = reports.get(timeout=0.5)
        except empty:
            why = ended()
            if why:
                raise RuntimeError(why) from None
            context.check()
            continue
        if kind == "report":
            context.report(**payload)
        elif kind == "error":
            raise RuntimeError(payload)
        else:  # "done": safetensors bytes, which cannot run code when read
            done[payload["rank"]] = payload
            if len(done) == world:
                return _result(done)


def _result(done: dict[int, dict]) -> tuple[TrainingState, dict]:
    """Rank 0's training state and the weights the ranks kept, merged (a pipeline's stages
    each send their own layers')."""
    best: dict[str, torch.Tensor] = {}
    for rank in sorted(done):
        if done[rank]["best"] is not None:
            best.update(safetensors.torch.load(done[rank]["best"]))
    return TrainingState(**done[0]["state"]), best


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


def _together_on_ray(context, world: int, entry: str, args: tuple, team) -> tuple[Any, dict]:
    """``train_together`` with each rank a Ray actor in its own placement-group bundle."""
    import ray
    from ray.util.queue import Empty, Queue

    from maas.distributed import ray_cluster

    ray_cluster.connect(context.settings.ray_address)
    group = ray_cluster.place(world)
    reports, stop = Queue(), ray_cluster.Flag()
    actor = ray.remote(RankActor)
    ranks = [actor.options(**ray_cluster.in_bundle(group, r)).remote() for r in range(world)]
    runs = []
    try:
        where = ray.get([rank.where.remote() for rank in ranks])
        context.report(
            message="training processes on Ray: "
            + ", ".join(f"rank {r} on {w.label}" for r, w in enumerate(where))
        )
        address = f"{where[0].ip}:{ray.get(ranks[0].free_port.remote(where[0].ip))}"
        workdir = str(context.workdir)
        runs = [
            rank.run.remote(r, world, address, entry, args, workdir, reports, stop, team)
            for r, rank in enumerate(ranks)
        ]

        def ended() -> str | None:
            done, _ = ray.wait(runs, num_returns=len(runs), timeout=0)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as err:  # an actor or its node died
                    return f"a training process on Ray failed: {err}"
            return "training processes ended without a result" if len(done) == len(runs) else None

        return _relay(context, reports, Empty, ended, world)
    except BaseException:
        stop.set()
        raise
    finally:
        if runs:
            ray.wait(runs, num_returns=len(runs), timeout=JOIN_SECONDS)
        for rank in ranks:
            ray.kill(rank)
        stop.close()
        ray.kill(reports.actor)
        ray_cluster.release(group)


class RankActor:
    """A training rank on a Ray node (wrapped with ``ray.remote`` when used)."""

    def where(self):
        from maas.distributed.ray_cluster import here

        return here()

    def free_port(self, host: str) -> int:
        from maas.distributed.ray_cluster import free_port

        return free_port(host)

    def run(self, *args) -> None:
        _rank(*args)


def make_team(rank: int, world: int, stop, spec: dict | None) -> DistributedTeam:
    """This rank's team: data parallel, or a strategy of strategies.py."""
    if spec is None:
        return DistributedTeam(rank, world, stop)
    from maas.training import strategies

    options = {k: v for k, v in spec.items() if k != "strategy"}
    if spec["strategy"] == "pipeline":
        return strategies.PipelineTeam(rank, world, stop, **options)
    from maas.training.parameter_server import ParameterServerTeam

    return ParameterServerTeam(rank, world, stop, **options)


def _rank(rank, world, address, entry, args, workdir, reports, stop, spec=None) -> None:
    module, function = entry.split(":")
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{address}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        team = make_team(rank, world, stop, spec)
        run = getattr(importlib.import_module(module), function)
        state, best = run(QueueReporter(reports, Path(workdir)), team, *args)
        part = team.result_part(best)
        # The weights as bytes (a shared tensor would die with this process); every rank
        # says it is done, so the worker knows when it has every part.
        done = {
            "rank": rank,
            "state": state.__dict__ if rank == 0 else None,
            "best": None if part is None else safetensors.torch.save(_contiguous(part)),
        }
        reports.put(("done", done))
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
