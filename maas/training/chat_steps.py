"""The fine-tuning job's epochs: its steps as the team's strategy takes them (data
parallel, pipeline stages or a parameter server), the token-level loss over the assistant's
tokens, and validation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from maas.training.chat_data import IGNORE, ChatData, collate
from maas.training.checkpoint import TrainingState
from maas.training.distributed import Team

if TYPE_CHECKING:  # fine_tune imports this module
    from maas.training.fine_tune import FineTuneParams, Hyperparameters


@dataclass
class EpochLoop:
    """One epoch's steps as the team's strategy takes them, and their step events."""

    context: Any
    params: FineTuneParams
    hyper: Hyperparameters
    team: Team
    stepper: torch.nn.Module
    optimizer: Any
    train: ChatData
    pad: int
    length: int = 0
    total_steps: int = 1

    @property
    def pipelined(self) -> bool:
        return hasattr(self.team, "train_step")

    def epoch(self, state: TrainingState, batches: list[list], started: float) -> list:
        """The team's (loss, right, learnt tokens, tokens) over the epoch."""
        sums = [0.0, 0, 0, 0]

        def stepped(step: list) -> None:
            """Count a step's figures; rank 0 reports it when due."""
            nonlocal sums
            sums = [a + b for a, b in zip(sums, step, strict=True)]
            due = state.step % self.params.log_every_steps == 0 or state.step == self.total_steps
            if self.team.rank == 0 and due:
                loss = step[0] / step[2]
                self.context.report(
                    state.step / self.total_steps,
                    message=f"Step {state.step}/{self.total_steps}: training loss={loss:.4f}",
                    step=state.step,
                    metrics={
                        "step": state.step,
                        "total_steps": self.total_steps,
                        "train_loss": loss,
                        "train_mean_token_accuracy": step[1] / step[2],
                        "trained_tokens": state.epoch * self.train.tokens + sums[3],
                        "tokens_per_s": sums[3] / max(time.monotonic() - started, 1e-9),
                    },
                )

        if hasattr(self.team, "run_epoch"):
            self._served(state, batches, stepped)
            return self.team.sum(sums)  # the server counted them all; the workers nothing
        for batch in batches:
            self.context.check()
            self.team.check()
            state.step += 1
            share = self.team.share(batch)
            if share is None:
                continue  # too few to give every process one; skipped by all alike
            learnt = sum(example.learnt for example in batch)
            self.optimizer.zero_grad(set_to_none=True)
            if self.pipelined:
                mine = pipeline_step(self.team, share, self.pad, self.length, learnt)
            else:
                mine = self._gradient(share, self.team.world / learnt)
            self.optimizer.step()
            stepped(self.team.sum(mine))
        return sums

    def _gradient(self, share: list, scale: float) -> list:
        """Backward of the share's summed loss times ``scale``; its (loss, right, learnt,
        tokens)."""
        ids, mask, labels = collate(share, self.pad)
        logits = self.stepper(input_ids=ids, attention_mask=mask).logits
        total, right, n = token_loss(logits, labels)
        (total * scale).backward()
        return [float(total.detach()), right, n, int(mask.sum())]

    def _served(self, state: TrainingState, batches: list[list], stepped) -> None:
        """The epoch with a parameter server (rank 0) and its workers."""

        def gradient(share: list, scale: float) -> tuple:
            self.stepper.zero_grad(set_to_none=True)
            return tuple(self._gradient(share, scale))

        def updated(loss: float, seen: int) -> None:  # on the server, after each update
            state.step += 1
            stepped(list(self.team.last_update))

        def learnt(batch: list) -> int:
            return sum(example.learnt for example in batch)

        self.team.run_epoch(self.optimizer, batches, gradient, learnt, updated)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over the learnt positions, how many the argmax got right, and how
    many there are."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    total = torch.nn.functional.cross_entropy(
        flat_logits.float(), flat_labels, ignore_index=IGNORE, reduction="sum"
    )
    kept = flat_labels != IGNORE
    right = int((flat_logits.argmax(-1)[kept] == flat_labels[kept]).sum())
    return total, right, int(kept.sum())


class NothingToTrain:
    """The optimiser of a pipeline stage without LoRA weights (the embeddings alone, or the
    norm and head): the stage passes gradients back but has nothing to move."""

    state: dict = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": []}

    def load_state_dict(self, saved: dict) -> None:
        pass


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_loss(logits, labels)[0]


def longest(*datasets: ChatData | None) -> int:
    return max(len(e.ids) for data in datasets if data is not None for e in data.examples)


def pipeline_step(team, share: list, pad: int, length: int, learnt: int) -> list:
    """One step of a pipeline's share of a batch (padded to ``length``, so that every batch
    has the stages' shapes), each micro-batch's summed loss over the batch's learnt tokens;
    this rank's (loss, right, learnt, tokens): the last stage's, zeros on the others."""
    ids, mask, labels = collate(share, pad, length)
    logits, total = team.train_step((ids, mask), labels, 1 / learnt, token_loss_sum)
    if logits is None:
        return [0.0, 0, 0, 0]
    _, right, n = token_loss(logits, labels)
    return [total, right, n, int(mask.sum())]


def evaluate_in_stages(team, data: ChatData, batch_size: int, pad: int, length: int):
    """``_evaluate`` forward through the pipeline's stages."""
    chunks = []
    for start in range(0, len(data.examples), batch_size):
        ids, mask, labels = collate(data.examples[start : start + batch_size], pad, length)
        chunks.append(((ids, mask), labels))

    def score(logits, labels):
        total, right, n = token_loss(logits, labels)
        return [float(total), right, n]

    loss_sum, correct, learnt = team.measure(chunks, token_loss_sum, score)
    return {
        "full_valid_loss": loss_sum / learnt,
        "full_valid_mean_token_accuracy": correct / learnt,
    }


@torch.no_grad()
def evaluate(model, data: ChatData, batch_size: int, pad: int) -> dict[str, float]:
    model.eval()
    loss_sum = correct = learnt = 0
    for start in range(0, len(data.examples), batch_size):
        ids, mask, labels = collate(data.examples[start : start + batch_size], pad)
        total, right, n = token_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss_sum, correct, learnt = loss_sum + float(total), correct + right, learnt + n
    return {
        "full_valid_loss": loss_sum / learnt,
        "full_valid_mean_token_accuracy": correct / learnt,
    }
