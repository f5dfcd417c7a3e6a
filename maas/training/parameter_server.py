"""The ``parameter-server`` training strategy, as a team (see distributed.py) that runs an
epoch its own way.

Rank 0 holds the parameters and the optimizer and computes nothing;
ranks 1..N are workers. Synchronous: every batch, the server sends the parameters to each
worker, each computes the gradient of its share of the batch and pushes it back, and the
server sums them and steps: data parallel's update. Asynchronous: each worker takes whole
batches in turn (batch i goes to worker i mod N), pushes the gradient of the parameters it
last pulled, and the server applies each as it arrives; staleness (updates applied since the
gradient's parameters were pulled) is measured, and a gradient staler than
``max_staleness`` is refused and computed again on fresh parameters. Stop requests and the
end of an epoch travel in the server's replies, so no rank waits on a collective the others
never reach.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from maas.training.distributed import DistributedTeam, Halted

OK, HALT = 0, 1


class ParameterServerTeam(DistributedTeam):
    """Rank 0 the server, ranks 1..world-1 the workers (see the module)."""

    def __init__(self, rank, world, stop, *, mode: str, max_staleness: int | None):
        super().__init__(rank, world, stop)
        self.mode, self.max_staleness = mode, max_staleness
        self.workers = world - 1
        self.reporting_rank = 0
        self.staleness: list[int] = []
        self.refused = 0
        self.last_update: tuple[float, int, int, int] = (0.0, 0, 0, 0)
        """The server's last applied update: (loss sum, right, count, tokens)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        self.model = model
        self._params = [p for p in model.parameters() if p.requires_grad]
        return model

    def epoch_metrics(self) -> dict[str, float]:
        """What the server measured this epoch (then forgotten)."""
        if self.rank != 0 or self.mode != "async":
            return {}
        row = {
            "staleness_mean": sum(self.staleness) / max(1, len(self.staleness)),
            "staleness_max": float(max(self.staleness, default=0)),
            "refused_gradients": float(self.refused),
        }
        self.staleness, self.refused = [], 0
        return row

    def epoch(self, model, optimizer, train, order, batch_size: int, on_step: Callable):
        """A classifier's epoch: batches of sample indices, the gradient of a share's summed
        cross-entropy over the batch's size."""
        inputs, labels = train
        model.train()
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

        def gradient(share, scale: float) -> tuple[float, int, int, int]:
            self.model.zero_grad(set_to_none=True)
            logits = self.model(inputs[share])
            loss = nn.functional.cross_entropy(logits, labels[share], reduction="sum")
            (loss * scale).backward()
            right = int((logits.detach().argmax(-1) == labels[share]).sum())
            return float(loss.detach()), right, len(share), len(share)

        return self.run_epoch(optimizer, batches, gradient, len, on_step)

    def run_epoch(
        self, optimizer, batches: list, gradient: Callable, size: Callable, on_step: Callable
    ) -> tuple[float, int, int]:
        """One epoch over ``batches`` (lists of samples). A worker's ``gradient(share,
        scale)`` leaves in the parameters' ``.grad`` the gradient of its share's summed loss
        times ``scale`` and returns (loss sum, right, count, tokens); ``size(batch)`` is what
        a batch's mean divides by (its samples, or its learnt tokens). The server calls
        ``on_step(mean loss, count so far)`` after each update, with ``last_update`` set to
        that update's (loss sum, right, count, tokens). Returns this rank's (loss sum,
        right, count): the workers'; zeros on the server."""
        batches = [b for b in batches if len(b) >= (self.workers if self.mode == "sync" else 1)]
        if self.rank == 0:
            serve = self._serve_sync if self.mode == "sync" else self._serve_async
            serve(optimizer, batches, on_step)
            return 0.0, 0, 0
        work = self._work_sync if self.mode == "sync" else self._work_async
        return work(batches, gradient, size)

    # --- the server

    def _vector(self) -> torch.Tensor:
        return parameters_to_vector(self._params).detach()

    def _control(self, status: int, version: int, dst: int, accepted: bool = True) -> None:
        """The server's reply: go on (with the parameters of ``version``) or halt; and whether
        the worker's last gradient was applied."""
        dist.send(torch.tensor([status, version, int(accepted)]), dst)
        if status == OK and version >= 0:
            dist.send(self._vector(), dst)

    def _recv_push(self, src: int | None) -> tuple[int, torch.Tensor, torch.Tensor]:
        header = torch.empty(5, dtype=torch.float64)  # version, loss, right, count, tokens
        sender = dist.recv(header, src)
        gradient = torch.empty(sum(p.numel() for p in self._params))
        dist.recv(gradient, sender)
        return sender, header, gradient

    def _apply(self, optimizer, gradient: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)
        offset = 0
        for p in self._params:
            p.grad = gradient[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()

    def _serve_sync(self, optimizer, batches, on_step) -> None:
        seen = 0
        for _ in batches:
            status = HALT if self._stop.is_set() else OK
            for worker in range(1, self.world):
                self._control(status, 0, worker)
            if status == HALT:
                raise Halted
            total, figures = None, torch.zeros(4, dtype=torch.float64)
            for worker in range(1, self.world):  # in rank order: a fixed summation order
                _, header, gradient = self._recv_push(worker)
                total = gradient if total is None else total + gradient
                figures += header[1:]
            self._apply(optimizer, total)
            self.last_update = (float(figures[0]), *(int(x) for x in figures[1:]))
            seen += self.last_update[2]
            on_step(self.last_update[0] / max(1, self.last_update[2]), seen)

    def _serve_async(self, optimizer, batches, on_step) -> None:
        version, applied, seen = 0, 0, 0
        owed = {w: len(batches[w - 1 :: self.workers]) for w in range(1, self.world)}
        """Gradients each worker has still to get applied this epoch."""
        for worker in range(1, self.world):  # everyone starts from the same parameters
            self._control(OK, version, worker)
        while applied < len(batches):
            sender, header, gradient = self._recv_push(None)
            stale = version - int(header[0])
            accepted = self.max_staleness is None or stale <= self.max_staleness
            if accepted:
                self._apply(optimizer, gradient)
                version, applied, seen = version + 1, applied + 1, seen + int(header[3])
                owed[sender] -= 1
                self.staleness.append(stale)
                self.last_update = (float(header[1]), *(int(x) for x in header[2:]))
                on_step(float(header[1]) / max(1, int(header[3])), seen)
            else:
                self.refused += 1  # computed again on fresh parameters
            if self._stop.is_set():
                self._control(HALT, version, sender)
                self._halt_the_rest(sender, owed)
                raise Halted
            self._control(OK, version, sender, accepted)
        for worker in range(1, self.world):  # the epoch is over: each waits for this
            self._control(OK, -1, worker)

    def _halt_the_rest(self, told: int, owed: dict[int, int]) -> None:
        """Tell the other workers to stop: those done with their batches at once, the others
        at their next push."""
        for worker, left in owed.items():
            if worker != told and left == 0:
                self._control(HALT, 0, worker)
        working = {w for w, left in owed.items() if w != told and left > 0}
        while working:
            sender, _, _ = self._recv_push(None)
            self._control(HALT, 0, sender)
            working.discard(sender)

    # --- the workers

    def _pull(self) -> tuple[int, bool]:
        """The server's word: the version of the fresh parameters it sent (-1 at the epoch's
        end) and whether the last gradient was applied; Halted when the job stops."""
        control = torch.empty(3, dtype=torch.int64)
        dist.recv(control, 0)
        status, version, accepted = control.tolist()
        if status == HALT:
            raise Halted
        if version >= 0:
            vector = torch.empty(sum(p.numel() for p in self._params))
            dist.recv(vector, 0)
            vector_to_parameters(vector, self._params)
        return version, bool(accepted)

    def _push(self, version: int, figures: tuple[float, int, int, int]) -> None:
        """A gradient, after its header: the version it was computed on and (loss sum,
        right, count, tokens)."""
        header = torch.tensor([version, *figures], dtype=torch.float64)
        dist.send(header, 0)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        dist.send(torch.cat([g.reshape(-1) for g in grads]), 0)

    def _work_sync(self, batches, gradient: Callable, size: Callable):
        index = self.rank - 1
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in batches:
            self._pull()
            share = batch[index :: self.workers]
            figures = gradient(share, 1 / size(batch))
            self._push(0, figures)
            loss, right, count, _ = figures
            loss_sum, correct, seen = loss_sum + loss, correct + right, seen + count
        return loss_sum, correct, seen

    def _work_async(self, batches, gradient: Callable, size: Callable):
        loss_sum, correct, seen = 0.0, 0, 0
        version, _ = self._pull()
        for batch in batches[self.rank - 1 :: self.workers]:
            accepted = False
            while not accepted:  # again on fresh parameters if it was refused as too stale
                figures = gradient(batch, 1 / size(batch))
                self._push(version, figures)
                loss, right, count, _ = figures
                version, accepted = self._pull()
            loss_sum, correct, seen = loss_sum + loss, correct + right, seen + count
        while version >= 0:  # done: wait for the epoch's end (or a halt)
            version, _ = self._pull()
        return loss_sum, correct, seen
