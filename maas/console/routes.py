"""The console's routes: one page shell per page, and the views the shell loads into it.

A browser sends no ``Authorization`` header when it follows a link, and the console keeps its
key in session storage, not in a cookie. So a page (``GET /ui/models``) is only the shell, the
same for everyone and holding no data; its script then asks for the view
(``GET /ui/views/models``) with the key as a Bearer header. Each view is rendered here, on the
server, from the same handler the API route runs, behind the same key dependency, so a view
answers exactly what its API routes would: a 401 or 403 in the API's error shape included.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from maas.api import governance
from maas.api.access import usable_models
from maas.api.deps import AdminKey, CurrentKey, KeysDep, MaintainerKey, RegistryDep, TenantsDep
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.inference import ServingDep
from maas.api.manage import access, analytics, jobs, models
from maas.auth.principal import INDUSTRIES, Principal, Role
from maas.console import charts
from maas.errors import MaasError, NotFound

HERE = Path(__file__).parent
STATIC = HERE / "static"
CHART_LIBRARY = STATIC / "vendor" / "chart.umd.min.js"

TABLE_ROWS = 50
"""A usage table's rows (the busiest); the API has them all."""

templates = Jinja2Templates(directory=HERE / "templates")

SECURITY_HEADERS = {
    # scripts and styles only from maas itself: no inline script, no CDN
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

# page: (title, the least role that may open it); the order is the menu's
PAGES = {
    "models": ("Models", Role.maintainer),
    "jobs": ("Jobs", Role.maintainer),
    "usage": ("Usage and costs", Role.user),
    "adoption": ("Adoption", Role.maintainer),
    "access": ("Keys and tenants", Role.admin),
    "chat": ("Chat", Role.user),
}

shell = APIRouter(prefix="/ui", include_in_schema=False)
views = APIRouter(
    prefix="/ui/views",
    include_in_schema=False,
    dependencies=[Depends(governance.current_key)],
    responses=error_responses("/ui/views", *KEYED_STATUSES),
)


def _page(request: Request, page: str) -> HTMLResponse:
    title = PAGES[page][0] if page in PAGES else "Sign in"
    context = {"page": page, "title": title, "charts": CHART_LIBRARY.is_file()}
    return templates.TemplateResponse(request, "shell.html", context, headers=SECURITY_HEADERS)


@shell.get("")
def home(request: Request) -> HTMLResponse:
    """The sign-in page; once signed in, the script opens the first page the key may see."""
    return _page(request, "home")


@shell.get("/{page}")
def page(request: Request, page: str) -> HTMLResponse:
    if page not in PAGES:
        raise NotFound(f"the console has no page {page!r}; its pages: {', '.join(PAGES)}")
    return _page(request, page)


def _view(request: Request, name: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(
        request, f"views/{name}.html", context, headers=SECURITY_HEADERS
    )


@views.get("/nav")
def nav(request: Request, key: CurrentKey) -> HTMLResponse:
    """Who the key is and the pages it may open: what signing in checks."""
    allowed = {name: title for name, (title, role) in PAGES.items() if key.has_role(role)}
    return _view(request, "nav", key=key, pages=allowed)


@views.get("/models")
def models_view(
    request: Request, key: MaintainerKey, registry: RegistryDep, serving: ServingDep
) -> HTMLResponse:
    listed = models.list_models(key, registry).data
    loaded = models.list_deployments(key, serving).data
    return _view(request, "models", models=listed, loaded=loaded)


@views.get("/jobs")
async def jobs_view(
    request: Request,
    key: MaintainerKey,
    store: Annotated[jobs.JobStore, Depends(jobs.get_jobs)],
) -> HTMLResponse:
    found = await jobs.list_jobs(key, store, limit=50, after=None, kind=None, status=None)
    running = any(job.status in ("queued", "running") for job in found.data)
    return _view(request, "jobs", jobs=found.data, running=running)


@views.get("/usage")
async def usage_view(
    request: Request, key: CurrentKey, days: Annotated[int, Query(ge=1, le=366)] = 30
) -> HTMLResponse:
    since = datetime.now(UTC).date() - timedelta(days=days - 1)
    by_day = (await access.usage(key, request, ["day"], since, None)).data
    by_tenant = (await access.usage(key, request, ["tenant"], since, None)).data
    by_model = (await access.usage(key, request, ["model"], since, None)).data
    return _view(
        request,
        "usage",
        days=days,
        since=since,
        daily=charts.daily_usage(by_day, since, days),
        by_tenant=charts.usage_bars(by_tenant, "tenant"),
        by_model=charts.usage_bars(by_model, "model"),
        tenants=sorted(by_tenant, key=lambda row: -row.requests)[:TABLE_ROWS],
        more_tenants=max(0, len(by_tenant) - TABLE_ROWS),
        **await _costs(key, request, since, days),
    )


async def _costs(key: Principal, request: Request, since: date, days: int) -> dict:
    """The costs per tenant and the cost charts, for the roles the costs route serves (as it
    serves them: a maintainer's tenant and departments); none for a user."""
    if not key.has_role(Role.maintainer):
        return {"costs": None}
    found = await analytics.costs_by(key, request, ("tenant", "day", "model"), since, None)
    return {
        "costs": found["tenant"],
        "cost_daily": charts.daily_costs(found["day"], since, days),
        "cost_by_model": charts.cost_bars(found["model"]),
    }


@views.get("/adoption")
async def adoption_view(
    request: Request,
    key: MaintainerKey,
    industry: Annotated[str, Query(max_length=32)] = "platform",
    period: analytics.Period = "month",
    horizon: Annotated[int, Query(ge=1, le=120)] = 12,
) -> HTMLResponse:
    measured = await analytics.adoption(key, request, "industry", period, 1, 1, None, None)
    try:
        forecast = await analytics.forecast(key, request, industry, horizon, period, 1, None, None)
        refused = None
    except MaasError as error:  # too short, nobody adopted...: the page says why
        forecast, refused = None, str(error)
    industries = sorted(group.group for group in measured.data)
    return _view(
        request,
        "adoption",
        industry=industry,
        industries=industries,
        period=period,
        horizon=horizon,
        groups=measured.data,
        forecast=forecast,
        chart=charts.forecast_chart(forecast) if forecast else None,
        refused=refused,
    )


@views.get("/access")
def access_view(
    request: Request, key: AdminKey, keys: KeysDep, tenants: TenantsDep
) -> HTMLResponse:
    listed = access.list_keys(key, keys).data
    return _view(
        request,
        "access",
        tenants=access.list_tenants(key, tenants).data,
        keys=listed,
        protected=_lineage(key.key_id, listed),
        currency=request.app.state.prices.currency(),
        own=key.key_id,
        industries=INDUSTRIES,
    )


@views.get("/chat")
def chat_view(request: Request, key: CurrentKey, registry: RegistryDep) -> HTMLResponse:
    chat_models = [m.name for m in usable_models(registry, key) if m.task == "chat"]
    return _view(request, "chat", models=chat_models)


def _lineage(key_id: str | None, keys: list) -> set[str]:
    """The key and the keys above it: revoking any of them revokes the key itself, so the
    page offers no button for them."""
    made_by = {k.key_id: k.created_by for k in keys}
    found: set[str] = set()
    while key_id is not None and key_id not in found:
        found.add(key_id)
        key_id = made_by.get(key_id)
    return found
