"""``maas adoption``, ``maas forecast`` and ``maas analytics potential``: adoption analytics,
local, straight on the database (whoever can read MAAS_HOME sees every tenant)."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from maas.analytics import adoption as measures
from maas.analytics import potentials, report
from maas.cli.context import open_registry
from maas.cli.output import console

app = typer.Typer(help="Adoption analytics: market potentials.", no_args_is_help=True)

BLOCKS = "▁▂▃▄▅▆▇█"

PeriodOption = Annotated[str, typer.Option(help="Period: week or month.")]
MinRequestsOption = Annotated[
    int, typer.Option(help="Successful requests in a period that make a tenant active.")
]


SPARKLINE_DAYS = 62
"""``maas costs`` draws a block a day up to this many days, a block a week beyond."""


def sparkline(values: list[float]) -> str:
    """Values as a line of block characters, lowest to highest."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(BLOCKS[round((v - low) / span * (len(BLOCKS) - 1))] for v in values)


def adoption(
    by: Annotated[str, typer.Option(help=f"Group by: {', '.join(measures.GROUPS)}.")] = "industry",
    period: PeriodOption = "month",
    min_requests: MinRequestsOption = 1,
    retention_after: Annotated[
        int, typer.Option(help="Retention: active again this many periods after adopting.")
    ] = 1,
) -> None:
    """Adopters, active tenants, penetration, depth and retention per group."""
    with open_registry() as registry:
        result = report.adoption_report(
            registry.engine,
            None,
            group_by=by,
            period=period,
            min_requests=min_requests,
            retention_after=retention_after,
        )
    table = Table(
        by, "adopted", f"active ({period})", "penetration", "requests/active", "retention",
        f"adopters, {period} by {period}",
    )  # fmt: skip
    for group in result.data:
        last = group.periods[-1]
        table.add_row(
            group.group,
            str(last.adopted),
            str(last.active),
            f"{last.penetration:.1%}" if last.penetration is not None else "-",
            f"{last.depth:.1f}" if last.depth is not None else "-",
            f"{group.retention:.0%}" if group.retention is not None else "-",
            sparkline([p.adopted for p in group.periods]),
        )
    console.print(table)
    if result.data:
        console.print(
            f"{result.data[0].periods[0].period} to {result.data[0].periods[-1].period}; "
            f"active: at least {min_requests} successful requests in the {period}"
        )


def forecast(
    industry: Annotated[
        str,
        typer.Argument(
            help="An industry; 'platform' for every tenant; 'all' for a summary of each industry."
        ),
    ],
    horizon: Annotated[int, typer.Option(help="Periods to forecast.")] = 12,
    period: PeriodOption = "month",
    min_requests: MinRequestsOption = 1,
    shock_at: Annotated[
        str | None,
        typer.Option(help="Period of a shock (a campaign, a price cut): fits generalized Bass."),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the chart here (.png or .svg).")] = None,
    source: Annotated[
        str | None,
        typer.Option(help="Forecast the series this source published (maas analytics import)."),
    ] = None,
) -> None:
    """Fit diffusion curves to an industry's adopters and forecast them, with intervals."""
    from maas.analytics import chart

    if industry == "all":
        _forecast_all(horizon, period, min_requests)
        return
    if plot is not None:
        chart.check_path(plot)
    with open_registry() as registry:
        result = report.forecast_report(
            registry.engine,
            None,
            industry,
            horizon=horizon,
            period=period,
            min_requests=min_requests,
            shock_at=shock_at,
            source=source,
        )
    _print_forecast(result)
    if plot is not None:
        console.print(f"wrote {chart.write(result, plot)}")


def _forecast_all(horizon: int, period: str, min_requests: int) -> None:
    with open_registry() as registry:
        results = report.forecast_industries(
            registry.engine, None, horizon=horizon, period=period, min_requests=min_requests
        )
    table = Table(
        "industry", "curve", "adopters", "m (90%)", "peak", f"in {horizon} {period}s (90%)",
        "note",
    )  # fmt: skip
    for name, result in sorted(results.items()):
        if isinstance(result, str):
            table.add_row(name, "-", "-", "-", "-", "-", result)
            continue
        m = result.params.get("m")
        m_range = result.intervals_covariance.get("m")
        last = result.forecast[-1]
        table.add_row(
            name,
            result.chosen,
            f"{result.observed[-1].adopted:.0f}",
            f"{m:.0f}"
            + (" (set)" if not result.potential_estimated else f" ({_interval(m_range)})"),
            result.landmarks["peak"].period or "-",
            f"{last.adopted:.0f} ({last.low:.0f} to {last.high:.0f})",
            "pooled p, q"
            if result.chosen == "bass" and any("pooled fit" in n for n in result.notes)
            else "",
        )
    console.print(table)


def _print_forecast(result: report.ForecastPublic) -> None:
    observed = [p.adopted for p in result.observed]
    if result.measure == "adopters":
        figure = f"{observed[-1]:.0f} adopters"
    else:
        figure = f"a share of {observed[-1]:.3g}"
    console.print(
        f"[bold]{result.group}[/bold] ({result.source}): {figure} by "
        f"{result.observed[-1].period} {sparkline(observed)}"
    )
    if result.potential is not None and result.measure == "adopters":
        console.print(
            f"penetration {result.observed[-1].penetration:.1%} of a potential of "
            f"{result.potential:.0f} ({result.potential_source or 'set'})"
        )
    models = Table("model", "parameters", "AIC", "backtest MAPE", "backtest RMSE", "note")
    for c in result.candidates:
        chosen = " (chosen)" if c.model == result.chosen else ""
        models.add_row(
            c.model + chosen,
            ", ".join(f"{k}={v:.4g}" for k, v in (c.params or {}).items()),
            f"{c.aic:.1f}" if c.aic is not None else "-",
            f"{c.backtest.mape:.1f}%" if c.backtest else "-",
            f"{c.backtest.rmse:.2f}" if c.backtest else "-",
            c.why_not or "; ".join(c.warnings),
        )
    console.print(models)
    level = f"{result.confidence:.0%}"
    params = Table("parameter", "estimate", f"{level} (covariance)", f"{level} (bootstrap)")
    for name, value in result.params.items():
        cov, boot = result.intervals_covariance.get(name), result.intervals_bootstrap.get(name)
        params.add_row(name, f"{value:.4g}", _interval(cov), _interval(boot))
    console.print(params)
    marks = {k: v.period or "beyond the horizon" for k, v in result.landmarks.items()}
    console.print(
        f"peak of new adoption: {marks['peak']}; 50% of m: {marks['half']}; "
        f"90% of m: {marks['ninety']}"
    )
    shown = "{:.1f}" if result.measure == "adopters" else "{:.3f}"
    ahead = Table("period", result.measure, f"{level} interval", "penetration")
    for point in result.forecast:
        ahead.add_row(
            point.period,
            shown.format(point.adopted),
            f"{shown.format(point.low)} to {shown.format(point.high)}",
            f"{point.penetration:.1%}" if point.penetration is not None else "-",
        )
    console.print(ahead)
    for note in result.notes:
        console.print(f"[dim]{note}[/dim]")


def _interval(bounds: tuple[float, float] | None) -> str:
    return f"{bounds[0]:.4g} to {bounds[1]:.4g}" if bounds else "-"


@app.command("potential")
def set_potential(
    industry: Annotated[str, typer.Argument(help="The industry.")],
    potential: Annotated[float, typer.Argument(help="How many organisations could adopt.")],
    source: Annotated[str, typer.Option(help="Where the figure comes from.")] = "",
) -> None:
    """Set an industry's market potential (the Bass model's m; penetration's denominator)."""
    with open_registry() as registry:
        record = potentials.set_potential(registry.engine, industry, potential, source)
    console.print(f"{record.industry}: potential {record.potential:g} ({record.source or '-'})")


@app.command("potentials")
def list_potentials() -> None:
    """The market potentials set so far."""
    with open_registry() as registry:
        records = potentials.list_potentials(registry.engine)
    table = Table("industry", "potential", "source", "updated")
    for r in records:
        table.add_row(r.industry, f"{r.potential:g}", r.source, r.updated_at.isoformat())
    console.print(table)


@app.command("import")
def import_series(
    path: Annotated[Path, typer.Argument(help="CSV: period, industry, adopters or share, source.")],
) -> None:
    """Import published adoption figures, to forecast with maas forecast INDUSTRY --source S."""
    from maas.analytics import series
    from maas.errors import InvalidRequest

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"cannot read {path}: {error}") from None
    points = series.parse(text)
    with open_registry() as registry:
        stored = series.store(registry.engine, points)
    for s in stored:
        console.print(
            f"{s.industry} from {s.source!r}: {len(s.periods)} {s.measure} figures, "
            f"{s.periods[0]} to {s.periods[-1]}"
        )


@app.command("series")
def list_series() -> None:
    """The imported adoption series."""
    from maas.analytics import series

    with open_registry() as registry:
        found = series.load(registry.engine)
    table = Table("industry", "source", "measure", "periods", "latest")
    for s in found:
        periods = f"{s.periods[0]} to {s.periods[-1]}"
        table.add_row(s.industry, s.source, s.measure, periods, f"{s.values[-1]:g}")
    console.print(table)


prices_app = typer.Typer(help="What each model's requests cost.", no_args_is_help=True)


@prices_app.command("set")
def set_price(
    model: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[
        int | None, typer.Option(help="Price one version (default: every version).")
    ] = None,
    prompt: Annotated[float, typer.Option(help="Per 1,000 prompt tokens.")] = 0.0,
    completion: Annotated[float, typer.Option(help="Per 1,000 completion tokens.")] = 0.0,
    request: Annotated[float, typer.Option(help="Per request.")] = 0.0,
    item: Annotated[float, typer.Option(help="Per item (an image, an embedded text).")] = 0.0,
    currency: Annotated[str, typer.Option(help="A 3-letter code; one for the table.")] = "USD",
) -> None:
    """Set a model's price (or one version's)."""
    from maas.analytics import costs

    with open_registry() as registry:
        price = costs.set_price(
            registry.engine,
            model,
            version=version,
            currency=currency,
            prompt_per_1k=prompt,
            completion_per_1k=completion,
            per_request=request,
            per_item=item,
        )
    which = f"{price.model}:{price.version}" if price.version else price.model
    console.print(
        f"{which}: {price.currency} {price.prompt_per_1k:g} / {price.completion_per_1k:g} per "
        f"1K prompt / completion tokens, {price.per_request:g} a request, "
        f"{price.per_item:g} an item"
    )


@prices_app.command("list")
def list_prices() -> None:
    """The price table."""
    from maas.analytics import costs

    with open_registry() as registry:
        prices = costs.list_prices(registry.engine)
    table = Table("model", "version", "currency", "1K prompt", "1K completion", "request", "item")
    for p in prices:
        table.add_row(
            p.model, str(p.version or "all"), p.currency, f"{p.prompt_per_1k:g}",
            f"{p.completion_per_1k:g}", f"{p.per_request:g}", f"{p.per_item:g}",
        )  # fmt: skip
    console.print(table)


def cost(
    by: Annotated[
        str, typer.Option(help="Group by: tenant, organisation, industry, model or day (UTC).")
    ] = "tenant",
    since: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option(help="Last day, YYYY-MM-DD.")] = None,
) -> None:
    """What usage cost at the price table's prices, and what cheaper versions saved; under
    the table, a sparkline of the cost per day."""
    from maas.analytics import costs
    from maas.cli.access import _day

    window = {"since": _day(since, "since"), "until": _day(until, "until")}
    with open_registry() as registry:
        engine, parents = registry.engine, costs.lineage(registry)
        organisation_of = measures.organisations(engine)
        result = costs.costs(
            engine, parents, group_by=by, organisation_of=organisation_of, **window
        )
        per_day = result if by == "day" else costs.costs(engine, parents, group_by="day", **window)
    _print_costs(result, by)
    if per_day.data:
        first, last = per_day.data[0].group, per_day.data[-1].group
        days = _cost_per_day(per_day)
        if len(days) <= SPARKLINE_DAYS:
            console.print(f"cost per day, {first} to {last}: {sparkline(days)}")
        else:  # a week a block, so a year fits a terminal's line; a last, shorter week at
            # its rate for seven days, so it does not look like a drop
            weeks = [
                sum(days[i : i + 7]) * 7 / len(days[i : i + 7]) for i in range(0, len(days), 7)
            ]
            console.print(f"cost per week from {first} (to {last}): {sparkline(weeks)}")


def _print_costs(result, by: str) -> None:
    currency = result.currency or "-"
    table = Table(by, "requests", "prompt tok", "completion tok", "items", f"cost ({currency})",
                  f"saved ({currency})")  # fmt: skip
    for row in result.data:
        table.add_row(
            row.group, str(row.requests), str(row.prompt_tokens), str(row.completion_tokens),
            str(row.items), f"{row.cost:.4f}", f"{row.saved:.4f}",
        )  # fmt: skip
    console.print(table)
    if result.unpriced_requests:
        console.print(f"{result.unpriced_requests} requests to models without a price")


def _cost_per_day(per_day) -> list[float]:
    """The cost of every day from the first with usage to the last, quiet days as zeros."""
    cost_of = {date.fromisoformat(row.group): row.cost for row in per_day.data}
    first, last = min(cost_of), max(cost_of)
    return [cost_of.get(first + timedelta(days=i), 0.0) for i in range((last - first).days + 1)]
