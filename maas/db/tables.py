"""Tables. Rows are internal: the registry turns them into public records before they leave."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    """An organisation or department that owns keys and private models."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    industry: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    """The organisation a department belongs to; None for an organisation."""

    parent: Mapped[Tenant | None] = relationship(remote_side=[id], lazy="joined")


class Model(Base):
    """A named model; its versions hold the files."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    """The owning tenant; None means shared with every tenant."""
    task: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    """Version numbers are never reused, even after a version is removed."""
    serving: Mapped[dict | None] = mapped_column(JSON)
    """Batching settings for this model (max_batch_size, max_delay_ms, max_queue_rows)."""
    sampling: Mapped[dict | None] = mapped_column(JSON)
    """Default sampling parameters of a text-generation model (temperature, max_tokens...)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    tenant: Mapped[Tenant | None] = relationship()
    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model",
        order_by="ModelVersion.version",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    aliases: Mapped[list[Alias]] = relationship(
        back_populates="model",
        order_by="Alias.name",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class ModelVersion(Base):
    """An immutable version: a folder under the artifact root with a manifest."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(32))
    runtime: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(512))
    """Folder of the version, relative to the artifact root."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_files: Mapped[int] = mapped_column(Integer)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    """Hash of manifest.json, so an edited manifest is caught like an edited weight file."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")


class Alias(Base):
    """A movable name (``production``, ``staging``, ...) for one version of a model."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name", name="uq_aliases_model_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    model: Mapped[Model] = relationship(back_populates="aliases")
    target: Mapped[ModelVersion] = relationship()


class DataKey(Base):
    """The wrapped data key of one encrypted file: of a version, or an uploaded file."""

    __tablename__ = "data_keys"
    __table_args__ = (UniqueConstraint("version_id", "path", name="uq_data_keys_version_path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    file_id: Mapped[int | None] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), index=True
    )
    path: Mapped[str] = mapped_column(String(512))
    aad: Mapped[str] = mapped_column(String(600))
    """What the file and its wrapped key are bound to: ``<manifest id>/<path>``."""
    master_version: Mapped[int] = mapped_column(Integer)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)


class ApiKey(Base):
    """An API key. Only a keyed hash of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16), unique=True)
    """The public part of the key (``maas-<key_id>_<secret>``), used to find the row."""
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)
    """Model names this key may use; None means every model its tenant can see."""
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    monthly_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    monthly_cost_budget: Mapped[float | None] = mapped_column(Float)
    """In the price table's currency (model_prices.currency)."""
    created_by: Mapped[str | None] = mapped_column(String(16))
    """key_id of the key that created this one; None when made locally with the CLI."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    tenant: Mapped[Tenant] = relationship()


class UsageRecord(Base):
    """One request, as metered. Tenant and industry are copied so history stays as it was."""

    __tablename__ = "usage_records"
    __table_args__ = (
        # covers what adoption analytics reads, so its aggregation scans the index, not the
        # table (1.2 s instead of 1.5 to 1.7 s for 926,000 records; bench/analytics.py)
        Index(
            "ix_usage_records_adoption",
            "tenant",
            "model",
            "day",
            "status",
            "industry",
            "prompt_tokens",
            "completion_tokens",
        ),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    day: Mapped[str] = mapped_column(String(10), index=True)
    """UTC date, YYYY-MM-DD: grouping by day stays portable SQL."""
    key_id: Mapped[str | None] = mapped_column(String(16), index=True)
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    industry: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[int | None] = mapped_column(Integer)
    endpoint: Mapped[str] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    items: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    cost: Mapped[float | None] = mapped_column(Float)
    """At the price in force when it ran (``maas prices``); budgets in currency sum it."""


class MarketPotential(Base):
    """How many organisations of an industry could adopt: the Bass model's m, set by the
    operator (``maas analytics potential``) instead of estimated."""

    __tablename__ = "market_potentials"

    industry: Mapped[str] = mapped_column(String(32), primary_key=True)
    potential: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class AdoptionPoint(Base):
    """One period of a published adoption series (``maas analytics import``): how many
    organisations of an industry had adopted by then, or what share of them, and who says so."""

    __tablename__ = "adoption_points"
    __table_args__ = (UniqueConstraint("industry", "source", "period"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    industry: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(200))
    period: Mapped[str] = mapped_column(String(10))
    """``YYYY``, ``YYYY-MM`` or ``YYYY-Www``."""
    measure: Mapped[str] = mapped_column(String(16))
    """``adopters`` (a count) or ``share`` (0 to 1)."""
    value: Mapped[float] = mapped_column(Float)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelPrice(Base):
    """What a model's requests cost (``maas prices set``): per 1,000 prompt and completion
    tokens, per request and per item (an image, an embedded text). ``version`` 0 prices every
    version; a version's own price wins over it."""

    __tablename__ = "model_prices"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer, default=0)
    currency: Mapped[str] = mapped_column(String(3))
    prompt_per_1k: Mapped[float] = mapped_column(Float, default=0.0)
    completion_per_1k: Mapped[float] = mapped_column(Float, default=0.0)
    per_request: Mapped[float] = mapped_column(Float, default=0.0)
    per_item: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Job(Base):
    """Long work (training, fine-tuning, optimisation) that a worker process runs under a
    lease. Every write a worker makes names the attempt it holds, so a worker whose lease
    ran out (and was given to another) changes nothing."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_by: Mapped[str | None] = mapped_column(String(16))
    """key_id of the key that created it; None when made locally with the CLI."""
    status: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(32))
    """What a running job is doing now, in its kind's words (``validating_files``,
    ``training``); None until it says."""
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    """How many times a worker has claimed it; a worker's writes name its attempt."""
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    params: Mapped[dict] = mapped_column(JSON)
    checkpoint: Mapped[dict | None] = mapped_column(JSON)
    """Where the last checkpoint lies and what it holds (step, epoch): a new attempt resumes
    from it."""
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    tenant: Mapped[Tenant] = relationship()


class JobEvent(Base):
    """What a job reported: a message, and the step and metrics it reached."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempt: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    step: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict | None] = mapped_column(JSON)


class StoredFile(Base):
    """A file uploaded through ``/v1/files`` (training data, batch input), kept in the
    artifact store under ``.files/`` and, with a master key, encrypted there."""

    __tablename__ = "files"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_by: Mapped[str | None] = mapped_column(String(16))
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    relpath: Mapped[str] = mapped_column(String(255))
    encrypted: Mapped[bool] = mapped_column(default=False)
    details: Mapped[dict | None] = mapped_column(JSON)
    """What validation found: examples, columns, classes..."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
