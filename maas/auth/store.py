"""Tenants and API keys in the database. Every call takes the viewer (None: the local CLI)."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from maas.auth import policy
from maas.auth.keys import generate_key, hash_key
from maas.auth.principal import INDUSTRIES, PLATFORM_TENANT, Budget, Limits, Principal, Role
from maas.db import make_session_factory, write_transaction
from maas.db.tables import ApiKey, Tenant
from maas.errors import Conflict, InvalidRequest, NotFound
from maas.registry.names import validate_model_name


class TenantRecord(BaseModel):
    name: str
    industry: str
    description: str
    created_at: datetime
    parent: str | None = None
    """The organisation this department belongs to; None for an organisation."""


class KeyRecord(BaseModel):
    """A key as shown to people: never the secret or its hash."""

    key_id: str
    name: str
    tenant: str
    role: Role
    allowed_models: list[str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime
    created_by: str | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    monthly_token_budget: int | None
    monthly_cost_budget: float | None = None
    """In the price table's currency."""


class KeySpec(BaseModel):
    """What a caller asks for when creating a key."""

    name: str = Field(max_length=128)
    role: Role = Role.user
    tenant: str | None = None
    """Defaults to the creator's tenant (the platform tenant for the local CLI)."""
    allowed_models: list[str] | None = None
    expires_at: datetime | None = None
    limits: Limits = Limits()


class TenantStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions = make_session_factory(engine)

    def create(
        self,
        name: str,
        industry: str | None,
        description: str = "",
        parent: str | None = None,
    ) -> TenantRecord:
        """An organisation, or with ``parent`` one of its departments (in the parent's
        industry; departments have no departments of their own)."""
        validate_model_name(name, kind="tenant")
        if len(name) > 64:
            raise InvalidRequest("a tenant name has at most 64 characters", param="name")
        if industry is not None and industry not in INDUSTRIES:
            raise InvalidRequest(
                f"unknown industry {industry!r}; use one of: {', '.join(INDUSTRIES)}",
                param="industry",
            )
        with write_transaction(self._sessions) as session:
            if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
                raise Conflict(f"tenant {name!r} already exists", param="name")
            organisation = _organisation(session, parent, industry)
            if organisation is not None:
                industry = organisation.industry
            elif industry is None:
                raise InvalidRequest("an organisation needs an industry", param="industry")
            row = Tenant(
                name=name,
                industry=industry,
                description=description,
                parent_id=organisation.id if organisation is not None else None,
            )
            session.add(row)
            session.flush()
            return _tenant_record(row)

    def ensure_platform(self) -> TenantRecord:
        try:
            return self.get(PLATFORM_TENANT, None)
        except NotFound:
            return self.create(PLATFORM_TENANT, "other", "the operator's own tenant")

    def list(self, viewer: Principal | None) -> list[TenantRecord]:
        with self._sessions() as session:
            query = select(Tenant).order_by(Tenant.name)
            if viewer is not None and not viewer.is_admin:
                query = query.where(Tenant.id == viewer.tenant_id)
            return [_tenant_record(row) for row in session.scalars(query)]

    def get_id(self, name: str) -> int:
        with self._sessions() as session:
            tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == name))
        if tenant_id is None:
            raise NotFound(f"tenant {name!r} not found", param="tenant")
        return tenant_id

    def get(self, name: str, viewer: Principal | None) -> TenantRecord:
        with self._sessions() as session:
            row = session.scalar(select(Tenant).where(Tenant.name == name))
            if row is None or not policy.can_see_tenant(viewer, row.id):
                raise NotFound(f"tenant {name!r} not found", param="tenant")
            return _tenant_record(row)


class KeyStore:
    def __init__(self, engine: Engine, server_secret: bytes) -> None:
        self._sessions = make_session_factory(engine)
        self._secret = server_secret

    def count(self) -> int:
        """Keys ever created, revoked ones included."""
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(ApiKey)) or 0

    def create(
        self, spec: KeySpec, creator: Principal | None, *, only_if_none: bool = False
    ) -> tuple[KeyRecord, str] | None:
        """Create a key; returns its record and the plaintext key (shown once, never stored).

        ``only_if_none`` creates it only when no key exists yet (checked under the write lock,
        so two servers starting together make one first key)."""
        if not spec.name.strip():
            raise InvalidRequest("a key needs a name", param="name")
        new = generate_key()
        with write_transaction(self._sessions) as session:
            if only_if_none and session.scalar(select(func.count()).select_from(ApiKey)):
                return None
            tenant = _tenant_for(session, spec.tenant, creator)
            policy.check_grant(creator, spec, tenant.id)
            row = ApiKey(
                key_id=new.key_id,
                secret_hash=hash_key(self._secret, new.plaintext),
                name=spec.name.strip(),
                tenant_id=tenant.id,
                role=spec.role.value,
                allowed_models=_sorted_or_none(spec.allowed_models),
                expires_at=spec.expires_at,
                requests_per_minute=spec.limits.requests_per_minute,
                tokens_per_minute=spec.limits.tokens_per_minute,
                max_concurrent=spec.limits.max_concurrent,
                monthly_token_budget=spec.limits.monthly_token_budget,
                monthly_cost_budget=spec.limits.monthly_cost_budget,
                created_by=creator.key_id if creator else None,
            )
            row.tenant = tenant
            session.add(row)
            session.flush()
            return _key_record(row), new.plaintext

    def list(self, viewer: Principal | None) -> list[KeyRecord]:
        with self._sessions() as session:
            query = select(ApiKey).join(ApiKey.tenant).order_by(ApiKey.created_at, ApiKey.id)
            if viewer is not None and not viewer.is_admin:
                query = query.where(ApiKey.tenant_id == viewer.tenant_id)
            return [_key_record(row) for row in session.scalars(query)]

    def get(self, key_id: str, viewer: Principal | None) -> KeyRecord:
        with self._sessions() as session:
            return _key_record(_visible_key(session, key_id, viewer))

    def revoke(self, key_id: str, viewer: Principal | None) -> KeyRecord:
        """Revoke a key and every key it created, directly or further down."""
        with write_transaction(self._sessions) as session:
            row = _visible_key(session, key_id, viewer)
            policy.check_manage_key(viewer, Role(row.role))
            now = datetime.now(UTC)
            for key in session.scalars(
                select(ApiKey).where(ApiKey.key_id.in_(_subtree(session, key_id)))
            ):
                if key.revoked_at is None:
                    key.revoked_at = now
            session.flush()
            return _key_record(row)

    def subtree(self, key_id: str) -> list[str]:
        """A key and every key created under it."""
        with self._sessions() as session:
            return _subtree(session, key_id)

    def lookup(self, key_id: str) -> tuple[str, Principal, datetime | None] | None:
        """(secret hash, principal, revoked_at) of a key, for the authenticator."""
        with self._sessions() as session:
            row = session.scalar(select(ApiKey).join(ApiKey.tenant).where(ApiKey.key_id == key_id))
            if row is None:
                return None
            return row.secret_hash, _principal(row, _budgets(session, row)), row.revoked_at

    def touch(self, last_used: dict[str, datetime]) -> None:
        """Record when keys were last used (called in batches by the usage recorder)."""
        if not last_used:
            return
        with write_transaction(self._sessions) as session:
            for row in session.scalars(select(ApiKey).where(ApiKey.key_id.in_(list(last_used)))):
                when = last_used[row.key_id]
                if row.last_used_at is None or row.last_used_at < when:
                    row.last_used_at = when


def _sorted_or_none(names: list[str] | None) -> list[str] | None:
    return None if names is None else sorted(set(names))


def _tenant_for(session: Session, name: str | None, creator: Principal | None) -> Tenant:
    if name is None:
        name = creator.tenant if creator else PLATFORM_TENANT
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None or not policy.can_see_tenant(creator, tenant.id):
        raise NotFound(f"tenant {name!r} not found", param="tenant")
    return tenant


def _visible_key(session: Session, key_id: str, viewer: Principal | None) -> ApiKey:
    row = session.scalar(select(ApiKey).join(ApiKey.tenant).where(ApiKey.key_id == key_id))
    if row is None or not policy.can_see_tenant(viewer, row.tenant_id):
        raise NotFound(f"key {key_id!r} not found", param="key_id")
    return row


def _organisation(session: Session, parent: str | None, industry: str | None) -> Tenant | None:
    """The tenant a new department belongs to, checked; None for a new organisation."""
    if parent is None:
        return None
    row = session.scalar(select(Tenant).where(Tenant.name == parent))
    if row is None:
        raise NotFound(f"tenant {parent!r} not found", param="parent")
    if row.parent_id is not None:
        raise InvalidRequest(
            f"{parent!r} is a department: departments belong to an organisation",
            param="parent",
        )
    if industry is not None and industry != row.industry:
        raise InvalidRequest(
            f"a department is in its organisation's industry ({row.industry}), not {industry}",
            param="industry",
        )
    return row


def _tenant_record(row: Tenant) -> TenantRecord:
    return TenantRecord(
        name=row.name,
        industry=row.industry,
        description=row.description,
        created_at=row.created_at,
        parent=row.parent.name if row.parent is not None else None,
    )


def _key_record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,
        name=row.name,
        tenant=row.tenant.name,
        role=Role(row.role),
        allowed_models=row.allowed_models,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        created_at=row.created_at,
        created_by=row.created_by,
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        max_concurrent=row.max_concurrent,
        monthly_token_budget=row.monthly_token_budget,
        monthly_cost_budget=row.monthly_cost_budget,
    )


def _subtree(session: Session, key_id: str) -> list[str]:
    found, frontier = [key_id], [key_id]
    while frontier:
        frontier = list(
            session.scalars(select(ApiKey.key_id).where(ApiKey.created_by.in_(frontier)))
        )
        found += frontier
    return found


def _budgets(session: Session, row: ApiKey) -> tuple[Budget, ...]:
    """Budgets of the key and of the keys above it."""
    budgets, seen = [], set()
    while row is not None and row.key_id not in seen:
        seen.add(row.key_id)
        if row.monthly_token_budget is not None:
            budgets.append(Budget(row.key_id, "tokens", row.monthly_token_budget))
        if row.monthly_cost_budget is not None:
            budgets.append(Budget(row.key_id, "cost", row.monthly_cost_budget))
        if row.created_by is None:
            break
        row = session.scalar(select(ApiKey).where(ApiKey.key_id == row.created_by))
    return tuple(budgets)


def _principal(row: ApiKey, budgets: tuple[Budget, ...] = ()) -> Principal:
    return Principal(
        key_id=row.key_id,
        name=row.name,
        tenant_id=row.tenant_id,
        tenant=row.tenant.name,
        industry=row.tenant.industry,
        role=Role(row.role),
        allowed_models=frozenset(row.allowed_models) if row.allowed_models is not None else None,
        expires_at=row.expires_at,
        limits=Limits(
            requests_per_minute=row.requests_per_minute,
            tokens_per_minute=row.tokens_per_minute,
            max_concurrent=row.max_concurrent,
            monthly_token_budget=row.monthly_token_budget,
            monthly_cost_budget=row.monthly_cost_budget,
        ),
        budgets=budgets,
    )
