"""Structs that cross a process, thread or actor boundary."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class UsageEvent:
    """One metered request, handed from the request path to the usage recorder."""

    at: datetime
    key_id: str | None
    tenant: str | None
    industry: str | None
    model: str | None
    version: int | None
    endpoint: str
    """Route template with method, e.g. ``POST /v1/chat/completions``."""
    status: int
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    items: int = 0
    """Inputs processed where tokens do not apply (images, rows)."""

    def to_row(self) -> dict[str, Any]:
        return {**asdict(self), "day": self.at.date().isoformat()}
