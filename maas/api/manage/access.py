"""Tenants, API keys and usage over HTTP."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from maas.api import governance
from maas.api.deps import AdminKey, CurrentKey, KeysDep, MaintainerKey, TenantsDep
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.hardening import StrictJSONRoute
from maas.auth.principal import Limits, Role
from maas.auth.store import KeyRecord, KeySpec, TenantRecord
from maas.errors import InvalidRequest
from maas.metering.usage import UsageRow, aggregate

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/api/v1",
    tags=["access"],
    dependencies=[Depends(governance.current_key)],
    responses=error_responses("/api/v1", *KEYED_STATUSES),
    route_class=StrictJSONRoute,
)


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    industry: str | None = Field(default=None, max_length=32)
    """Required for an organisation; a department takes its organisation's."""
    description: str = Field(default="", max_length=10_000)
    parent: str | None = Field(default=None, max_length=64)
    """The organisation a new department belongs to."""


class TenantsPublic(BaseModel):
    data: list[TenantRecord]
    count: int


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    role: Role = Role.user
    tenant: str | None = Field(default=None, max_length=64)
    """Defaults to the creating key's tenant."""
    allowed_models: list[Annotated[str, Field(max_length=128)]] | None = Field(
        default=None, max_length=10_000
    )
    expires_in_days: float | None = Field(default=None, gt=0, le=36_500)
    requests_per_minute: int | None = Field(default=None, ge=1, le=10**9)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10**15)
    max_concurrent: int | None = Field(default=None, ge=1, le=10**6)
    monthly_token_budget: int | None = Field(default=None, ge=0, le=10**15)
    monthly_cost_budget: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False)
    """What the key may spend per calendar month, in the price table's currency."""

    def spec(self) -> KeySpec:
        expires_at = None
        if self.expires_in_days is not None:
            expires_at = datetime.now(UTC) + timedelta(days=self.expires_in_days)
        limits = Limits(
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            max_concurrent=self.max_concurrent,
            monthly_token_budget=self.monthly_token_budget,
            monthly_cost_budget=self.monthly_cost_budget,
        )
        return KeySpec(
            name=self.name,
            role=self.role,
            tenant=self.tenant,
            allowed_models=self.allowed_models,
            expires_at=expires_at,
            limits=limits,
        )


class KeyCreated(KeyRecord):
    key: str
    """The API key itself. It is shown only in this response; store it now."""


class KeysPublic(BaseModel):
    data: list[KeyRecord]
    count: int


class UsagePublic(BaseModel):
    data: list[UsageRow]
    group_by: list[str]


@router.post(
    "/tenants", status_code=201, responses=error_responses(router.prefix, 400, 403, 409, 413)
)
def create_tenant(body: TenantCreate, key: AdminKey, tenants: TenantsDep) -> TenantRecord:
    return tenants.create(body.name, body.industry, body.description, body.parent)


@router.get("/tenants", responses=error_responses(router.prefix, 403))
def list_tenants(key: MaintainerKey, tenants: TenantsDep) -> TenantsPublic:
    data = tenants.list(key)
    return TenantsPublic(data=data, count=len(data))


@router.get("/tenants/{name}", responses=error_responses(router.prefix, 400, 403, 404))
def get_tenant(name: str, key: MaintainerKey, tenants: TenantsDep) -> TenantRecord:
    return tenants.get(name, key)


@router.post("/keys", status_code=201, responses=error_responses(router.prefix, 400, 403, 404, 413))
def create_key(body: KeyCreate, key: MaintainerKey, keys: KeysDep) -> KeyCreated:
    record, plaintext = keys.create(body.spec(), key)
    return KeyCreated(**record.model_dump(), key=plaintext)


@router.get("/keys", responses=error_responses(router.prefix, 403))
def list_keys(key: MaintainerKey, keys: KeysDep) -> KeysPublic:
    data = keys.list(key)
    return KeysPublic(data=data, count=len(data))


@router.get("/keys/{key_id}", responses=error_responses(router.prefix, 400, 403, 404))
def get_key(key_id: str, key: MaintainerKey, keys: KeysDep) -> KeyRecord:
    return keys.get(key_id, key)


@router.delete("/keys/{key_id}", responses=error_responses(router.prefix, 400, 403, 404))
def revoke_key(key_id: str, key: MaintainerKey, keys: KeysDep, request: Request) -> KeyRecord:
    record = keys.revoke(key_id, key)
    for revoked in keys.subtree(key_id):  # it and the keys made under it
        request.app.state.authenticator.forget(revoked)
    return record


@router.get("/usage", responses=error_responses(router.prefix, 400))
async def usage(
    key: CurrentKey,
    request: Request,
    group_by: Annotated[list[str], Query()] = ["tenant", "model", "day"],  # noqa: B006
    since: date | None = None,
    until: date | None = None,
) -> UsagePublic:
    """Requests and tokens per group; admins see all, maintainers their tenant, users their key."""
    names = [name.strip() for item in group_by for name in item.split(",") if name.strip()]
    if not names:
        raise InvalidRequest("group_by needs at least one of the grouping names", param="group_by")
    state = request.app.state

    def read() -> list[UsageRow]:
        try:
            state.recorder.flush()  # include the requests made up to now
        except Exception:  # the background writer will retry; report what is stored
            log.exception("flushing usage records before a usage query failed")
        return aggregate(state.registry.engine, names, since=since, until=until, viewer=key)

    return UsagePublic(data=await run_in_threadpool(read), group_by=names)
