"""What an inspected model folder tells the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maas.registry.manifest import GENERATION_TASKS, TensorSpec


@dataclass
class FormatInfo:
    format: str
    runtime: str
    default_task: str | None
    """The task to register when the user gives none; None means the user must say."""
    tasks: tuple[str, ...] | None
    """Tasks this model can serve; None means any."""
    architecture: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    labels: list[str] | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    context_length: int | None = None
    generation_config: dict[str, Any] | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    weight_files: list[str] = field(default_factory=list)
    """Files holding the weights (encrypted at rest when a master key is configured)."""


LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Architectures maas's own engine runs (the rest of the causal LMs go to transformers)."""


def generation_tasks(chat_template: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(default task, allowed tasks) for a text generator: chat when it has a template."""
    return ("chat" if chat_template else "text-generation"), GENERATION_TASKS
