"""Distributed training strategies beyond data parallel, as teams (see distributed.py) that run
an epoch their own way: ``pipeline`` (model parallel), ``hybrid`` (data-parallel groups of
pipelines) and ``parameter-server`` (synchronous, or asynchronous with bounded staleness).

**pipeline**: the model's layers (``pipeline_layers``: the small CNN's conv blocks, then its
head) are cut into ``stages`` runs of about equal bytes (maas.distributed.plan), one per rank,
driven by ``torch.distributed.pipelining`` (GPipe or 1F1B) over ``micro_batches`` of each
batch. The loss is each micro-batch's summed cross-entropy over the batch's size, so the
gradients are those of the batch's mean whatever the split, and every rank steps its own
stage's parameters: the same update as one process. Every rank builds the model once (the
same seed gives the same initial weights as one process), then frees every layer but its
stage's (they go to the meta device), so its optimiser, its state and its memory are its
stage's alone. Validation runs forward through the stages; checkpoints are written a part
per stage (``checkpoint.write_part``) and resumed the same way; at the end each stage sends
its best weights to the worker, which joins them into the new version.

**hybrid**: ``world_size / stages`` pipelines, each on its share of every batch; after each
step every stage's gradients are summed (all-reduce) over the group of that stage's ranks,
which is data parallelism across the pipelines; after each epoch pipeline 0's weights and
buffers are copied to the others. (``DistributedDataParallel`` around a stage
does the same but, as a stage runs several micro-batch backwards a step, its bucket rebuild
fails an internal check, and with ``static_graph`` its first step's gradients differed from
one process's.) Rank r is stage ``r % stages`` of pipeline ``r // stages``.

**parameter-server**: in parameter_server.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from maas.distributed.classic import Chain
from maas.errors import InvalidRequest
from maas.training.distributed import DistributedTeam


def team_spec(params) -> dict | None:
    """How each rank of a job with these ``params`` builds its team
    (``distributed.make_team``); None: data parallel."""
    if params.strategy in ("pipeline", "hybrid"):
        return {
            "strategy": "pipeline",
            "stages": params.pipeline_stages or params.world_size,
            "micro_batches": params.micro_batches,
            "schedule": params.pipeline_schedule,
        }
    if params.strategy == "parameter-server":
        return {
            "strategy": "parameter-server",
            "mode": params.ps_mode,
            "max_staleness": params.max_staleness,
        }
    return None


def check_strategy(params, batch_size: int | None, layers: int | None, what: str) -> None:
    """Refuse a ``strategy`` that ``params`` (a train or fine-tune job's: ``strategy``,
    ``world_size``, ``pipeline_stages``, ``micro_batches``, ``pipeline_schedule``) cannot
    run: ``what`` has ``layers`` layers to split (None: not known yet) and batches of
    ``batch_size`` (None: not known yet)."""
    strategy, world = params.strategy, params.world_size

    def refuse(message: str, param: str = "params.strategy") -> None:
        raise InvalidRequest(message, param=param)

    if strategy != "data" and world < 2:
        refuse(f"strategy {strategy} needs world_size of at least 2", "params.world_size")
    if strategy in ("pipeline", "hybrid"):
        stages = world if strategy == "pipeline" else params.pipeline_stages
        if strategy == "hybrid" and (stages is None or world % stages or world // stages < 2):
            refuse(
                "strategy hybrid needs pipeline_stages dividing world_size into 2 or more "
                "pipelines (for example world_size 4, pipeline_stages 2)",
                "params.pipeline_stages",
            )
        if strategy == "pipeline" and params.pipeline_stages not in (None, world):
            refuse("strategy pipeline runs world_size stages", "params.pipeline_stages")
        if layers is not None and stages > layers:
            refuse(
                f"{what} has {layers} layers to split; {stages} stages are too many",
                "params.world_size" if strategy == "pipeline" else "params.pipeline_stages",
            )
        replicas = world // stages
        if params.pipeline_schedule == "1f1b" and params.micro_batches < stages:
            refuse(
                f"the 1f1b schedule needs at least as many micro_batches as stages ({stages})",
                "params.micro_batches",
            )
        if batch_size is not None and batch_size < params.micro_batches * replicas:
            refuse(
                f"batch_size {batch_size} is too small for {params.micro_batches} "
                f"micro-batches in each of {replicas} pipelines",
                "params.micro_batches",
            )
    elif params.pipeline_stages is not None:
        refuse("pipeline_stages is for the pipeline and hybrid strategies")


def _trained(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser moves (a LoRA adapter's, not the frozen base's)."""
    return [p for p in layer.parameters() if p.requires_grad]


def _added(totals: list, scores: list) -> list:
    return [a + b for a, b in zip(totals, scores, strict=True)]


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (a micro-batch's part of a classifier's loss)."""
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def _bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers ``model`` holds in memory (not on meta)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def stage_layers(
    model: nn.Module, stages: int, layers: list[tuple[str, nn.Module]] | None = None
) -> list[list[tuple[str, nn.Module]]]:
    """The model's layers (by default its ``pipeline_layers``) in ``stages`` runs of about
    equal bytes."""
    from maas.distributed.classic import pipeline_layers
    from maas.distributed.plan import module_units, split

    layers = layers if layers is not None else pipeline_layers(model)
    units = module_units(layers, model)
    plan = split(units, stages, model=type(model).__name__, dtype="float32")
    return [layers[stage.first_unit : stage.first_unit + len(stage.units)] for stage in plan.stages]


class PipelineTeam(DistributedTeam):
    """One rank of ``world / stages`` pipelines of ``stages`` stages each."""

    def __init__(self, rank, world, stop, *, stages: int, micro_batches: int, schedule: str):
        super().__init__(rank, world, stop)
        self.stages, self.micro_batches, self.schedule_name = stages, micro_batches, schedule
        self.replicas = world // stages
        self.replica, self.stage = divmod(rank, stages)
        self.first, self.last = self.stage == 0, self.stage == stages - 1
        self.reporting_rank = stages - 1  # the last stage of pipeline 0 sees the losses
        pipelines = [list(range(r * stages, (r + 1) * stages)) for r in range(self.replicas)]
        groups = [dist.new_group(ranks) for ranks in pipelines]  # every rank makes every group
        self.pipeline_group = groups[self.replica]
        replicas = [[r * stages + s for r in range(self.replicas)] for s in range(stages)]
        data_groups = [dist.new_group(ranks) for ranks in replicas]
        self.data_group = data_groups[self.stage]
        self._scale, self._loss_of = 1.0, _ce

    @property
    def checkpoint_part(self) -> str:
        return f"stage-{self.stage}"

    @property
    def writes_checkpoint(self) -> bool:
        return self.replica == 0  # the other pipelines' copies of the stage are the same

    def keep_own_part(self, model: nn.Module, layers=None) -> str:
        """Cut the model into its stages (its ``layers`` in run order, by default its
        ``pipeline_layers``) and free every layer but this rank's stage's."""
        self.runs = stage_layers(model, self.stages, layers)
        total = _bytes(model)
        for stage, run in enumerate(self.runs):
            if stage != self.stage:
                for _, layer in run:
                    layer.to_empty(device="meta")
        names = ", ".join(name for name, _ in self.runs[self.stage])
        return (
            f"rank {self.rank} holds stage {self.stage + 1} of {self.stages} ({names}): "
            f"{_bytes(model):,} of the model's {total:,} parameter bytes"
        )

    def result_part(self, best: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return best if self.replica == 0 else None

    def share(self, batch: list) -> list | None:
        """This pipeline's share of a batch (every stage of it takes the same)."""
        return batch[self.replica :: self.replicas] if len(batch) >= self.replicas else None

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.model = model
        self._module = Chain(layer for _, layer in self.runs[self.stage])
        self._schedules: dict[tuple[int, bool], object] = {}
        self._kinds = (PipelineStage, Schedule1F1B, ScheduleGPipe)
        return model

    def _schedule_for(self, size: int, evaluating: bool = False):
        """The schedule for a share of ``size`` samples. A stage learns its micro-batches'
        shapes at its first step and keeps them, so each share size gets its own schedule,
        cut into equal micro-batches: the most that divide it, up to ``micro_batches`` (an
        epoch's last, smaller batch may need fewer; 1F1B needs as many as stages, else GPipe
        runs it). Validation has schedules of its own (forward only)."""
        schedule = self._schedules.get((size, evaluating))
        if schedule is None:
            stage_kind, one_f_one_b, gpipe = self._kinds
            count = next(n for n in range(min(self.micro_batches, size), 0, -1) if size % n == 0)
            stage = stage_kind(
                self._module,
                self.stage,
                self.stages,
                torch.device("cpu"),
                group=self.pipeline_group,
            )
            training_1f1b = self.schedule_name == "1f1b" and count >= self.stages
            kind = one_f_one_b if training_1f1b and not evaluating else gpipe
            schedule = kind(stage, count, loss_fn=self._loss, scale_grads=False)
            self._schedules[size, evaluating] = schedule
        return schedule

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A micro-batch's part of the global batch's mean loss (the pipelines' gradients are
        then summed)."""
        return self._loss_of(output, target) * self._scale

    def _sum_pipelines(self) -> None:
        """Each stage's gradients summed over the pipelines (data parallel across them)."""
        if self.replicas == 1:
            return
        for _, layer in self.runs[self.stage]:
            for p in _trained(layer):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.data_group)

    def train_step(
        self, inputs: tuple, target: torch.Tensor, scale: float, loss: Callable
    ) -> tuple[torch.Tensor | None, float]:
        """Forward and backward of this pipeline's share of a batch (``inputs`` go to stage
        0, ``target`` to the last stage), its gradients summed with the other pipelines'.
        ``loss(output, target)`` is a micro-batch's summed loss, scaled by ``scale`` to its
        part of the batch's mean. The last stage gets the outputs and the summed loss."""
        self._scale, self._loss_of = scale, loss
        schedule = self._schedule_for(len(target))
        losses: list[torch.Tensor] = []
        output = None
        if self.first:
            schedule.step(*inputs)
        elif self.last:
            output = schedule.step(target=target, losses=losses)
        else:
            schedule.step()
        self._sum_pipelines()
        if not self.last:
            return None, 0.0
        return output.detach(), float(sum(part.detach() for part in losses)) / scale

    @torch.no_grad()
    def measure(self, chunks: list[tuple[tuple, torch.Tensor]], loss: Callable, score: Callable):
        """Forward only through pipeline 0's stages, chunk by chunk (``(inputs, target)``);
        the last stage's ``score(output, target)`` lists summed over the chunks, on every
        rank."""
        shared: list = [None]
        if self.replica == 0:
            self._module.eval()
            self._scale, self._loss_of = 1.0, loss
            totals = None
            for inputs, target in chunks:
                schedule = self._schedule_for(len(target), evaluating=True)
                if self.first:
                    schedule.eval(*inputs)
                elif self.last:
                    scores = score(schedule.eval(target=target), target)
                    totals = scores if totals is None else _added(totals, scores)
                else:
                    schedule.eval()
            shared[0] = totals
        dist.broadcast_object_list(shared, src=self.stages - 1)
        return shared[0]

    def epoch(self, model, optimizer, train, order, batch_size: int, on_step: Callable):
        inputs, labels = train
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < self.replicas:
                continue  # too few to give every pipeline a sample; skipped by all alike
            self.check()
            share = batch[self.replica :: self.replicas]
            optimizer.zero_grad(set_to_none=True)
            logits, part = self.train_step((inputs[share],), labels[share], 1 / len(batch), _ce)
            optimizer.step()
            if self.last:
                loss_sum += part
                correct += int((logits.argmax(-1) == labels[share]).sum())
                seen += len(share)
                reporting = self.rank == self.reporting_rank  # one pipeline's last stage
                on_step(part / len(share) if reporting else None, seen)
            else:
                on_step(None, seen)
        self._align_replicas()
        return loss_sum, correct, seen

    def validate(self, model: nn.Module, split, loss_fn) -> dict[str, float]:
        """Validation through the stages in chunks of 512, as one process validates."""
        inputs, labels = split
        if not len(labels):
            return {}
        chunks = [((inputs[i : i + 512],), labels[i : i + 512]) for i in range(0, len(labels), 512)]

        def score(logits, target):
            right = int((logits.argmax(-1) == target).sum())
            return [float(_ce(logits, target)), right, len(target)]

        loss_sum, right, count = self.measure(chunks, _ce, score)
        return {"val_loss": loss_sum / count, "val_accuracy": right / count}

    def _align_replicas(self) -> None:
        """Pipeline 0's copy of this stage's weights and buffers to the other pipelines'
        (their gradients were summed alike; the buffers, such as batch-norm statistics,
        saw different samples)."""
        if self.replicas == 1:
            return
        for _, layer in self.runs[self.stage]:
            for tensor in [*_trained(layer), *layer.buffers()]:
                dist.broadcast(tensor.data, src=self.stage, group=self.data_group)
