"""What usage cost: a price table per model (and version), cost per tenant, organisation,
industry, model or UTC day from the usage records, and what was saved by serving a cheaper
version.

- a request's **cost** is ``prompt_tokens / 1000 x prompt price + completion_tokens / 1000 x
  completion price + 1 x request price + items x item price`` at its model version's price
  (the version's own price if set, else the model's); only successful inference requests
  are charged; requests of an unpriced model are counted apart (``unpriced_requests``);
- **saved** is, for requests served by a version made from another (an int8 or distilled
  child, by its manifest's ``parent``), what the same usage would have cost at the parent's
  price minus what it cost: what routing to the cheaper version saved. Zero where the parent
  has no price.

One currency for the whole table: a price in another currency is refused.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import UTC, date, datetime

from pydantic import BaseModel
from sqlalchemy import Engine, func, literal, select

from maas.analytics import adoption
from maas.db import make_session_factory, write_transaction
from maas.db.tables import Model, ModelPrice, UsageRecord
from maas.errors import InvalidRequest, MaasError, NotFound

log = logging.getLogger(__name__)

GROUPS = ("tenant", "organisation", "industry", "model", "day")
"""``day``: the record's UTC day, YYYY-MM-DD; days come in date order, other groups by cost."""


class PricePublic(BaseModel):
    model: str
    version: int | None
    """None: every version without a price of its own."""
    currency: str
    prompt_per_1k: float
    completion_per_1k: float
    per_request: float
    per_item: float
    updated_at: datetime


class CostRow(BaseModel):
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    items: int
    cost: float
    saved: float
    """What the same usage would have cost more at the parent versions' prices."""


class CostsPublic(BaseModel):
    group_by: str
    currency: str | None
    since: date | None
    until: date | None
    data: list[CostRow]
    unpriced_requests: int


def set_price(
    engine: Engine,
    model: str,
    *,
    version: int | None = None,
    currency: str = "USD",
    prompt_per_1k: float = 0.0,
    completion_per_1k: float = 0.0,
    per_request: float = 0.0,
    per_item: float = 0.0,
) -> PricePublic:
    """Set (or replace) a model's price, or one version's."""
    amounts = {
        "prompt_per_1k": prompt_per_1k,
        "completion_per_1k": completion_per_1k,
        "per_request": per_request,
        "per_item": per_item,
    }
    for name, value in amounts.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"{name} is a price of at least 0", param=name)
    if not any(amounts.values()):
        raise InvalidRequest("give at least one price above 0", param="prompt_per_1k")
    if not (len(currency) == 3 and currency.isalpha() and currency.isupper()):
        raise InvalidRequest("currency is a 3-letter code such as USD or EUR", param="currency")
    if version is not None and version < 1:
        raise InvalidRequest("version is a number from 1 up", param="version")
    with write_transaction(make_session_factory(engine)) as session:
        if session.scalar(select(Model.id).where(Model.name == model)) is None:
            raise NotFound(f"model {model!r} not found", param="model")
        same_row = (ModelPrice.model == model) & (ModelPrice.version == (version or 0))
        other = session.scalar(
            select(ModelPrice.currency).where(ModelPrice.currency != currency, ~same_row)
        )
        if other is not None:
            raise InvalidRequest(
                f"prices are in {other}: one currency for the whole table", param="currency"
            )
        which = (ModelPrice.model == model, ModelPrice.version == (version or 0))
        row = session.scalar(select(ModelPrice).where(*which))
        if row is None:
            row = ModelPrice(model=model, version=version or 0)
            session.add(row)
        row.currency, row.updated_at = currency, datetime.now(UTC)
        for name, value in amounts.items():
            setattr(row, name, float(value))
        session.flush()
        return _public(row)


def list_prices(engine: Engine) -> list[PricePublic]:
    with make_session_factory(engine)() as session:
        rows = session.scalars(select(ModelPrice).order_by(ModelPrice.model, ModelPrice.version))
        return [_public(row) for row in rows]


def _public(row: ModelPrice) -> PricePublic:
    return PricePublic(
        model=row.model,
        version=row.version or None,
        currency=row.currency,
        prompt_per_1k=row.prompt_per_1k,
        completion_per_1k=row.completion_per_1k,
        per_request=row.per_request,
        per_item=row.per_item,
        updated_at=row.updated_at,
    )


def costs(
    engine: Engine,
    parents: dict[tuple[str, int], tuple[str, int] | None],
    *,
    group_by: str = "tenant",
    since: date | None = None,
    until: date | None = None,
    tenants: set[str] | None = None,
    organisation_of: dict[str, str] | None = None,
) -> CostsPublic:
    """Cost and savings per group. ``parents`` maps a model version to the version it was
    made from (None for none), as the registry's manifests say."""
    if group_by not in GROUPS:
        raise InvalidRequest(f"group_by is one of {', '.join(GROUPS)}", param="group_by")
    prices = list_prices(engine)
    table = {(p.model, p.version or 0): p for p in prices}
    organisation_of = organisation_of or {}
    totals: dict[str, list[float]] = {}
    unpriced = 0
    for tenant, industry, model, version, day, requests, prompt, completion, items in _usage(
        engine, since, until, tenants, by_day=group_by == "day"
    ):
        key = {
            "tenant": tenant,
            "organisation": organisation_of.get(tenant, tenant),
            "industry": industry or "other",
            "model": model,
            "day": day,
        }[group_by]
        usage = (requests, prompt, completion, items)
        price = _price(table, model, version)
        if price is None:
            unpriced += requests
        cost = _charge(price, usage) if price else 0.0
        parent = parents.get((model, version))
        parent_price = _price(table, *parent) if parent else None
        saved = _charge(parent_price, usage) - cost if parent_price and price else 0.0
        total = totals.setdefault(key, [0, 0, 0, 0, 0.0, 0.0])
        for index, value in enumerate((*usage, cost, saved)):
            total[index] += value
    if group_by == "day":
        ordered = sorted(totals.items())
    else:
        ordered = sorted(totals.items(), key=lambda item: -item[1][4])
    return CostsPublic(
        group_by=group_by,
        currency=prices[0].currency if prices else None,
        since=since,
        until=until,
        data=[
            CostRow(
                group=name,
                requests=int(t[0]),
                prompt_tokens=int(t[1]),
                completion_tokens=int(t[2]),
                items=int(t[3]),
                cost=t[4],
                saved=t[5],
            )
            for name, t in ordered
        ],
        unpriced_requests=unpriced,
    )


def _usage(engine, since, until, tenants, *, by_day: bool):
    """Successful inference requests per tenant and model version, and per day if
    ``by_day`` (one SQL aggregation; ``day`` is YYYY-MM-DD text, so it groups the same on
    SQLite and PostgreSQL)."""
    per = [UsageRecord.tenant, UsageRecord.model, UsageRecord.version]
    if by_day:
        per.append(UsageRecord.day)
    query = select(
        UsageRecord.tenant,
        func.max(UsageRecord.industry),
        UsageRecord.model,
        func.coalesce(UsageRecord.version, 0),
        UsageRecord.day if by_day else literal(None),  # unused unless grouped by day
        func.count(),
        func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
        func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
        func.coalesce(func.sum(UsageRecord.items), 0),
    ).group_by(*per)
    with engine.connect() as connection:
        return connection.execute(adoption.counted(query, since, until, tenants)).all()


def _price(table, model: str, version: int) -> PricePublic | None:
    return table.get((model, version)) or table.get((model, 0))


def _charge(price: PricePublic, usage: tuple[int, int, int, int]) -> float:
    requests, prompt, completion, items = usage
    return (
        prompt / 1000 * price.prompt_per_1k
        + completion / 1000 * price.completion_per_1k
        + requests * price.per_request
        + items * price.per_item
    )


class PriceBook:
    """The price table in memory, to price each request as it finishes without a database
    read on the request path. ``load()`` reads it (at start, off the event loop); after
    ``ttl`` seconds the next use starts a reload on a thread and prices with the table it has
    until that is done (a price set through this server is loaded at once)."""

    def __init__(self, engine: Engine, *, ttl: float = 10.0, clock=time.monotonic) -> None:
        self._engine = engine
        self._ttl = ttl
        self._clock = clock
        self._table: dict[tuple[str, int], PricePublic] = {}
        self._read_at: float | None = None
        self._reloading = False
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the table now (blocking)."""
        read_at = self._clock()
        try:
            table = {(p.model, p.version or 0): p for p in list_prices(self._engine)}
        except Exception:  # keep pricing with the table we have; the next use tries again
            log.exception("reading the price table failed")
            table, read_at = None, None
        with self._lock:
            if table is not None:
                self._table, self._read_at = table, read_at
            self._reloading = False

    def cost(self, model: str, version: int, prompt: int, completion: int, items: int):
        """One request's cost at its version's price, or None for an unpriced model."""
        price = _price(self._current(), model, version)
        return _charge(price, (1, prompt, completion, items)) if price else None

    def currency(self) -> str | None:
        """The table's currency, as last read (never reads the database)."""
        return next((p.currency for p in self._table.values()), None)

    def _current(self) -> dict[tuple[str, int], PricePublic]:
        with self._lock:
            stale = self._read_at is None or self._clock() - self._read_at >= self._ttl
            start = stale and not self._reloading
            if start:
                self._reloading = True
            table = self._table
        if start:
            threading.Thread(target=self.load, name="maas-prices", daemon=True).start()
        return table


def month_cost(engine: Engine, key_ids: list[str], period: str) -> float:
    """What some keys' requests in a month ("YYYY-MM") cost, as each was priced when it ran
    (the records' ``cost``)."""
    query = select(func.coalesce(func.sum(UsageRecord.cost), 0.0)).where(
        UsageRecord.key_id.in_(key_ids),
        UsageRecord.day.startswith(period),
        UsageRecord.status < 400,
    )
    with engine.connect() as connection:
        return float(connection.execute(query).scalar_one())


def lineage(registry) -> dict[tuple[str, int], tuple[str, int] | None]:
    """Each registered version's parent, from its manifest."""
    parents: dict[tuple[str, int], tuple[str, int] | None] = {}
    for model in registry.list_models():
        for record in model.versions:
            try:
                parent = registry.read_manifest(record).parent
            except MaasError:  # an unreadable manifest: no savings for it, costs still work
                log.warning("no lineage for %s:%s", model.name, record.version, exc_info=True)
                parent = None
            parents[(model.name, record.version)] = (
                (parent.name, parent.version) if parent else None
            )
    return parents
