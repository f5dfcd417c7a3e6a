"""Adoption analytics over HTTP: adoption per group, forecasts, market potentials, costs and
the price table. Admins see every tenant; a maintainer sees its tenant and its departments."""

from __future__ import annotations

import logging
from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from maas.analytics import adoption as adoption_measures
from maas.analytics import costs, potentials, report, series
from maas.api import governance
from maas.api.deps import AdminKey, MaintainerKey
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.hardening import StrictJSONRoute
from maas.auth.principal import Principal
from maas.errors import InvalidRequest

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/api/v1/analytics",
    tags=["analytics"],
    dependencies=[Depends(governance.current_key)],
    responses=error_responses("/api/v1/analytics", *KEYED_STATUSES),
    route_class=StrictJSONRoute,
)

Period = Literal["week", "month"]
Group = Literal["platform", "industry", "organisation", "tenant", "model"]


class PotentialSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    potential: float = Field(gt=0, le=1e12)
    """How many organisations of the industry could adopt."""
    source: str = Field(default="", max_length=1000)
    """Where the figure comes from (a survey, a register), shown beside it."""


class PotentialsPublic(BaseModel):
    data: list[potentials.PotentialPublic]
    count: int


def _flushed(request: Request):
    """The database, with the usage records made up to now written."""
    state = request.app.state
    try:
        state.recorder.flush()
    except Exception:  # the background writer will retry; report what is stored
        log.exception("flushing usage records before an analytics query failed")
    return state.registry.engine


@router.get("/adoption", responses=error_responses(router.prefix, 400, 403))
async def adoption(
    key: MaintainerKey,
    request: Request,
    group_by: Group = "industry",
    period: Period = "month",
    min_requests: Annotated[int, Query(ge=1, le=10**9)] = 1,
    retention_after: Annotated[int, Query(ge=1, le=520)] = 1,
    since: date | None = None,
    until: date | None = None,
) -> report.AdoptionPublic:
    """Active and adopted tenants, requests, tokens, depth, task shares and retention per
    group and period; penetration where the industry's potential is set."""
    engine = _flushed(request)
    return await run_in_threadpool(
        report.adoption_report,
        engine,
        key,
        group_by=group_by,
        period=period,
        min_requests=min_requests,
        retention_after=retention_after,
        since=since,
        until=until,
    )


@router.get("/forecast", responses=error_responses(router.prefix, 400, 403, 404))
async def forecast(
    key: MaintainerKey,
    request: Request,
    industry: Annotated[str, Query(max_length=32)] = "platform",
    horizon: Annotated[int, Query(ge=1, le=120)] = 12,
    period: Period = "month",
    min_requests: Annotated[int, Query(ge=1, le=10**9)] = 1,
    shock_at: Annotated[str | None, Query(max_length=16)] = None,
    source: Annotated[str | None, Query(max_length=200)] = None,
) -> report.ForecastPublic:
    """Every diffusion curve fitted to the industry's adopters (``platform``: all), or to the
    series ``source`` published for it, the one the backtest chose, its intervals and
    landmarks, and the forecast with its band."""
    engine = _flushed(request)
    return await run_in_threadpool(
        report.forecast_report,
        engine,
        key,
        industry,
        horizon=horizon,
        period=period,
        min_requests=min_requests,
        shock_at=shock_at,
        source=source,
    )


@router.get("/potentials", responses=error_responses(router.prefix, 403))
def list_potentials(key: MaintainerKey, request: Request) -> PotentialsPublic:
    data = potentials.list_potentials(request.app.state.registry.engine)
    return PotentialsPublic(data=data, count=len(data))


@router.put("/potentials/{industry}", responses=error_responses(router.prefix, 400, 403))
def set_potential(
    industry: str, body: PotentialSet, key: AdminKey, request: Request
) -> potentials.PotentialPublic:
    """Set how many organisations of an industry could adopt (the Bass model's m)."""
    return potentials.set_potential(
        request.app.state.registry.engine, industry, body.potential, body.source
    )


class PriceSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1, le=10**9)
    """A version's own price; none: every version without one."""
    currency: str = Field(default="USD", min_length=3, max_length=3)
    prompt_per_1k: float = Field(default=0.0, ge=0, le=1e9)
    completion_per_1k: float = Field(default=0.0, ge=0, le=1e9)
    per_request: float = Field(default=0.0, ge=0, le=1e9)
    per_item: float = Field(default=0.0, ge=0, le=1e9)


class PricesPublic(BaseModel):
    data: list[costs.PricePublic]
    count: int


@router.get("/costs", responses=error_responses(router.prefix, 400, 403))
async def cost(
    key: MaintainerKey,
    request: Request,
    group_by: Literal["tenant", "organisation", "industry", "model", "day"] = "tenant",
    since: date | None = None,
    until: date | None = None,
) -> costs.CostsPublic:
    """Cost and savings per group, at the price table's prices (per UTC day: in date
    order)."""
    return (await costs_by(key, request, (group_by,), since, until))[group_by]


async def costs_by(
    key: Principal,
    request: Request,
    groupings: tuple[str, ...],
    since: date | None,
    until: date | None,
) -> dict[str, costs.CostsPublic]:
    """``cost`` for each grouping (the caller has checked the key's role: a maintainer's),
    with the records flushed, the lineage, the key's tenants and the organisations read once
    (the console's usage page shows three)."""
    engine = _flushed(request)
    registry = request.app.state.registry

    def read() -> dict[str, costs.CostsPublic]:
        shared = {
            "since": since,
            "until": until,
            "tenants": report.visible_tenants(engine, key),
            "organisation_of": adoption_measures.organisations(engine),
        }
        parents = costs.lineage(registry)
        return {name: costs.costs(engine, parents, group_by=name, **shared) for name in groupings}

    return await run_in_threadpool(read)


@router.get("/prices", responses=error_responses(router.prefix, 403))
def list_prices(key: MaintainerKey, request: Request) -> PricesPublic:
    data = costs.list_prices(request.app.state.registry.engine)
    return PricesPublic(data=data, count=len(data))


@router.put("/prices/{model}", responses=error_responses(router.prefix, 400, 403, 404))
def set_price(model: str, body: PriceSet, key: AdminKey, request: Request) -> costs.PricePublic:
    """Set what a model's (or one version's) requests cost."""
    price = costs.set_price(request.app.state.registry.engine, model, **body.model_dump())
    request.app.state.prices.load()  # requests are charged at the new price from the next one
    return price


CSV_BODY = {
    "requestBody": {
        "required": True,
        "description": "CSV with the columns period, industry, adopters or share, source",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    }
}


class SeriesPublic(BaseModel):
    industry: str
    source: str
    measure: str
    """``adopters`` (organisations) or ``share`` (0 to 1)."""
    periods: list[str]
    values: list[float]
    """Cumulative, as published."""


class SeriesListPublic(BaseModel):
    data: list[SeriesPublic]
    count: int


def _series_public(found: list[series.Series]) -> SeriesListPublic:
    data = [SeriesPublic(**vars(s)) for s in found]
    return SeriesListPublic(data=data, count=len(data))


@router.post(
    "/series",
    status_code=201,
    openapi_extra=CSV_BODY,
    responses=error_responses(router.prefix, 400, 403, 413),
)
async def import_series(key: AdminKey, request: Request) -> SeriesListPublic:
    """Import published adoption figures (what ``maas analytics import`` does), replacing
    each (industry, source) series the file holds; every problem is named with its line."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("text/csv", "text/plain"):
        raise InvalidRequest(f"send the CSV as text/csv, not {kind or 'no content type'}")
    try:
        text = (await request.body()).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"the CSV is not UTF-8 text: {error.reason}", param="file") from None
    engine = request.app.state.registry.engine

    def parse_and_store() -> list[series.Series]:
        return series.store(engine, series.parse(text))

    return _series_public(await run_in_threadpool(parse_and_store))


@router.get("/series", responses=error_responses(router.prefix, 400, 403))
def list_series(
    key: MaintainerKey,
    request: Request,
    industry: Annotated[str | None, Query(max_length=32)] = None,
) -> SeriesListPublic:
    """The imported series (published figures are not any tenant's: every maintainer sees
    them), each with its source."""
    wanted = industry.strip().lower() if industry is not None else None  # as stored
    return _series_public(series.load(request.app.state.registry.engine, wanted))
