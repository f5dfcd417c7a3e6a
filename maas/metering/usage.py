"""Reading usage back: totals grouped by tenant, industry, key, model, endpoint and day."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel
from sqlalchemy import Engine, case, func, select

from maas.auth.principal import Principal, Role
from maas.db.tables import UsageRecord
from maas.errors import InvalidRequest

GROUPS = {
    "tenant": UsageRecord.tenant,
    "industry": UsageRecord.industry,
    "key": UsageRecord.key_id,
    "model": UsageRecord.model,
    "endpoint": UsageRecord.endpoint,
    "day": UsageRecord.day,
}


class UsageRow(BaseModel):
    group: dict[str, str | None]
    """The values of the grouping columns, e.g. {"tenant": "acme", "day": "2026-11-22"}."""
    requests: int
    errors: int
    """Requests answered with a 4xx or 5xx status."""
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    items: int
    mean_latency_ms: float


def aggregate(
    engine: Engine,
    group_by: list[str],
    *,
    since: date | None = None,
    until: date | None = None,
    viewer: Principal | None = None,
) -> list[UsageRow]:
    """Totals per group. Admins see everything, maintainers their tenant, users their key."""
    unknown = [name for name in group_by if name not in GROUPS]
    if unknown:
        raise InvalidRequest(
            f"cannot group usage by {', '.join(unknown)}; use: {', '.join(GROUPS)}",
            param="group_by",
        )
    columns = [GROUPS[name] for name in group_by]
    query = select(
        *columns,
        func.count(),
        func.sum(case((UsageRecord.status >= 400, 1), else_=0)),
        func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
        func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
        func.coalesce(func.sum(UsageRecord.items), 0),
        func.avg(UsageRecord.latency_ms),
    )
    if since is not None:
        query = query.where(UsageRecord.day >= since.isoformat())
    if until is not None:
        query = query.where(UsageRecord.day <= until.isoformat())
    if viewer is not None and not viewer.is_admin:
        if viewer.role is Role.maintainer:
            query = query.where(UsageRecord.tenant == viewer.tenant)
        else:
            query = query.where(UsageRecord.key_id == viewer.key_id)
    query = query.group_by(*columns).order_by(*columns)
    with engine.connect() as connection:
        return [_row(group_by, row) for row in connection.execute(query)]


def _row(group_by: list[str], row) -> UsageRow:
    values = list(row)
    groups, (requests, errors, prompt, completion, items, latency) = (
        values[: len(group_by)],
        values[len(group_by) :],
    )
    return UsageRow(
        group=dict(zip(group_by, groups, strict=True)),
        requests=requests,
        errors=errors or 0,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        items=items,
        mean_latency_ms=round(float(latency or 0.0), 3),
    )


def month_tokens(engine: Engine, key_ids: list[str], period: str) -> int:
    """Prompt plus completion tokens some keys used in a month ("YYYY-MM"), from the records."""
    query = select(
        func.coalesce(func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens), 0)
    ).where(UsageRecord.key_id.in_(key_ids), UsageRecord.day.startswith(period))
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())
