"""The caller behind an API key, as every route sees it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Role(StrEnum):
    """What a key may do. Each role includes everything below it."""

    user = "user"
    """Inference on the models the key is allowed."""
    maintainer = "maintainer"
    """Models, versions, aliases and keys of its own tenant."""
    admin = "admin"
    """Everything, across tenants."""

    @property
    def rank(self) -> int:
        return list(Role).index(self)


INDUSTRIES = (
    "finance",
    "healthcare",
    "manufacturing",
    "retail",
    "education",
    "government",
    "energy",
    "telecom",
    "logistics",
    "media",
    "other",
)
"""The industry labels a tenant can carry; adoption analytics group by them."""

PLATFORM_TENANT = "platform"
"""The tenant of the operator's own keys (the first admin key belongs to it)."""


class Limits(BaseModel):
    """Per-key limits; None means no limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1, le=10**9)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10**15)
    max_concurrent: int | None = Field(default=None, ge=1, le=10**6)
    monthly_token_budget: int | None = Field(default=None, ge=0, le=10**15)
    """Prompt plus completion tokens per calendar month (UTC)."""
    monthly_cost_budget: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False)
    """What the key may spend per calendar month (UTC), in the price table's currency, at
    the prices ``maas prices set`` gives its models."""


@dataclass(frozen=True)
class Budget:
    """A monthly budget a key draws from: its own or one of a key above it."""

    key_id: str
    unit: Literal["tokens", "cost"]
    amount: float


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    tenant_id: int
    tenant: str
    industry: str
    role: Role
    allowed_models: frozenset[str] | None
    """Model names this key may use; None means all its tenant can see."""
    expires_at: datetime | None
    limits: Limits
    budgets: tuple[Budget, ...] = ()
    """The monthly budgets (tokens or cost) of this key and of every key above it (the key
    that created it, and so on): what this key uses counts against all of them, so minting
    keys never multiplies a budget."""

    def has_role(self, role: Role) -> bool:
        return self.role.rank >= role.rank

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin
