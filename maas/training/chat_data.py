"""Chat examples for fine-tuning: each conversation of a ``fine-tune`` file (OpenAI's chat
JSONL) as token ids and labels, with the loss on the assistant's turns only.

The conversation is written by the model's own chat template, exactly as serving writes a
prompt. Each assistant turn's text is what the template adds between the prompt before it
(rendered with the generation prompt, as serving renders it) and the conversation up to and
including it: the reply and the template's end-of-turn marker, so the model learns to stop.
The pieces are encoded one by one, so every prompt is the very token sequence serving will
feed. An assistant message with ``"weight": 0`` is context only (OpenAI's rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maas.runtime.llm.tokenizer import ChatTokenizer

IGNORE = -100
"""The label of a position that takes no loss (``torch.nn.functional.cross_entropy``'s
``ignore_index``)."""


@dataclass(frozen=True)
class ChatExample:
    ids: list[int]
    labels: list[int]
    """``ids[i]`` where the model must learn to write token i, else IGNORE."""

    @property
    def learnt(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass(frozen=True)
class ChatData:
    examples: list[ChatExample]
    tokens: int
    """Tokens in all examples (OpenAI counts trained tokens as these times epochs)."""
    truncated: int
    """Examples cut to ``max_length`` tokens."""
    dropped: list[str]
    """Why examples were left out (``line 3: ...``): nothing left to learn once cut."""


class TemplateMismatch(ValueError):
    """The chat template does not write a conversation as its prompts followed by replies,
    so the assistant's part cannot be found."""


def read_chats(path: Path) -> list[tuple[int, list[dict[str, Any]]]]:
    """(line number, messages) of each non-blank line; the file passed upload validation."""
    chats = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                chats.append((number, json.loads(line)["messages"]))
    return chats


def encode_chats(
    chats: list[tuple[int, list[dict[str, Any]]]], tokenizer: ChatTokenizer, max_length: int
) -> ChatData:
    examples, dropped = [], []
    tokens = truncated = 0
    for number, messages in chats:
        example = encode_chat(messages, tokenizer)
        cut = len(example.ids) > max_length
        if cut:
            truncated += 1
            example = ChatExample(example.ids[:max_length], example.labels[:max_length])
        if example.learnt == 0:
            within = f" within its first {max_length} tokens" if cut else ""
            dropped.append(f"line {number}: no assistant token to learn from{within}")
            continue
        examples.append(example)
        tokens += len(example.ids)
    return ChatData(examples, tokens, truncated, dropped)


def encode_chat(messages: list[dict[str, Any]], tokenizer: ChatTokenizer) -> ChatExample:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = tokenizer.render_chat(plain, add_generation_prompt=False)
    ids: list[int] = []
    labels: list[int] = []
    done = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(plain[:index], add_generation_prompt=True)
        upto = tokenizer.render_chat(plain[: index + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= done):
            raise TemplateMismatch(
                "the model's chat template does not write a conversation as its prompts "
                "followed by the replies, so the assistant's tokens cannot be told apart"
            )
        context = tokenizer.encode_rendered(full[done : len(prompt)])
        reply = tokenizer.encode_rendered(full[len(prompt) : len(upto)])
        learn = message.get("weight", 1) != 0
        ids += context + reply
        labels += [IGNORE] * len(context) + (reply if learn else [IGNORE] * len(reply))
        done = len(upto)
    rest = tokenizer.encode_rendered(full[done:])
    return ChatExample(ids + rest, labels + [IGNORE] * len(rest))


def collate(
    examples: list[ChatExample], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels), right-padded to the longest example (or to
    ``length``); the labels are shifted already: ``labels[:, i]`` is what position i must
    predict."""
    longest = length or max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        mask[row, :n] = 1
        labels[row, : n - 1] = torch.tensor(example.labels[1:])
    return ids, mask, labels
