"""Chart.js configurations for the console's views, built from the API's own answers.

Each function returns the plain ``{"type", "data", "options"}`` dictionary Chart.js takes; a
view puts it in a ``data-chart`` attribute and ``console.js`` draws it. Keeping the shaping
here (not in the browser) lets it be tested without one.
"""

from __future__ import annotations

from datetime import date, timedelta

from maas.analytics.costs import CostsPublic
from maas.analytics.report import ForecastPublic
from maas.metering.usage import UsageRow

OBSERVED = "#1f5fa8"
FITTED = "#6c8ebf"
FORECAST = "#c0392b"
BAND = "rgba(192, 57, 43, 0.18)"
TOKENS = "#7a9a3a"
COST = "#8e5ea2"


def _axes(y_title: str, **extra: dict) -> dict:
    return {
        "responsive": True,
        "maintainAspectRatio": False,
        "animation": False,
        "interaction": {"mode": "index", "intersect": False},
        "scales": {
            "y": {"beginAtZero": True, "title": {"display": True, "text": y_title}},
            **extra,
        },
    }


def daily_usage(rows: list[UsageRow], since: date, days: int) -> dict:
    """Requests (bars) and tokens (a line, right axis) on every day from ``since``, zeros
    included, so a quiet day shows as one."""
    by_day = {row.group["day"]: row for row in rows}
    labels = _days(since, days)
    requests = [by_day[d].requests if d in by_day else 0 for d in labels]
    tokens = [by_day[d].total_tokens if d in by_day else 0 for d in labels]
    right = {"axis": "y", "position": "right", "beginAtZero": True}
    right["grid"] = {"drawOnChartArea": False}
    right["title"] = {"display": True, "text": "tokens"}
    return {
        "type": "bar",
        "data": {
            "labels": labels,
            "datasets": [
                {
                    "label": "requests",
                    "data": requests,
                    "backgroundColor": OBSERVED,
                    "yAxisID": "y",
                },
                {
                    "label": "tokens",
                    "type": "line",
                    "data": tokens,
                    "borderColor": TOKENS,
                    "backgroundColor": TOKENS,
                    "yAxisID": "tokens",
                    "pointRadius": 0,
                },
            ],
        },
        "options": _axes("requests", tokens=right),
    }


def usage_bars(rows: list[UsageRow], field: str, *, most: int = 15) -> dict:
    """Requests per tenant or model, the ``most`` busiest, largest first (a record without
    a model, such as a management call, shows as "(none)")."""
    ordered = sorted(rows, key=lambda row: (-row.requests, row.group[field] or ""))
    bars = [(row.group[field] or "(none)", row.requests) for row in ordered]
    return _bars(bars, "requests", most=most, ranked="busiest", color=OBSERVED)


def daily_costs(costs: CostsPublic, since: date, days: int) -> dict:
    """Cost (a line) on every day from ``since``, zeros included; ``costs`` grouped by day."""
    cost_of = {row.group: row.cost for row in costs.data}
    labels = _days(since, days)
    label = f"cost ({costs.currency or '-'})"
    dataset = {
        "label": label,
        "data": [cost_of.get(d, 0.0) for d in labels],
        "borderColor": COST,
        "backgroundColor": COST,
        "pointRadius": 0,
    }
    options = {**_axes(label), "plugins": {"legend": {"display": False}}}
    return {"type": "line", "data": {"labels": labels, "datasets": [dataset]}, "options": options}


def cost_bars(costs: CostsPublic, *, most: int = 15) -> dict:
    """Cost per group (a model, a tenant), the ``most`` costliest, largest first."""
    ordered = sorted(costs.data, key=lambda row: (-row.cost, row.group))
    bars = [(row.group, row.cost) for row in ordered]
    label = f"cost ({costs.currency or '-'})"
    return _bars(bars, label, most=most, ranked="costliest", color=COST)


def _days(since: date, days: int) -> list[str]:
    return [(since + timedelta(days=i)).isoformat() for i in range(days)]


def _bars(bars: list[tuple[str, float]], label: str, *, most: int, ranked: str, color: str) -> dict:
    """(label, value) bars, the first ``most``; the title says of how many when cut."""
    shown = bars[:most]
    options = {**_axes(label), "plugins": {"legend": {"display": False}}}
    if len(bars) > most:
        title = f"the {most} {ranked} of {len(bars)}"
        options["plugins"]["title"] = {"display": True, "text": title}
    return {
        "type": "bar",
        "data": {
            "labels": [name for name, _ in shown],
            "datasets": [
                {"label": label, "data": [value for _, value in shown], "backgroundColor": color}
            ],
        },
        "options": options,
    }


def forecast_chart(forecast: ForecastPublic) -> dict:
    """Observed adopters (points), the chosen curve fitted to them, the forecast with its
    prediction band, the potential m when known, and the peak of new adoption marked."""
    observed = forecast.observed
    ahead = forecast.forecast
    labels = [p.period for p in observed] + [p.period for p in ahead]
    gap = [None] * len(observed)
    # the forecast starts from the last observed point so the line has no hole
    joined = [None] * (len(observed) - 1) + [observed[-1].adopted] if observed else []
    dashed = {"pointRadius": 0, "borderWidth": 2, "fill": False}
    datasets = [
        {
            "label": "observed",
            "data": [p.adopted for p in observed] + [None] * len(ahead),
            "borderColor": OBSERVED,
            "backgroundColor": OBSERVED,
            "showLine": False,
            "pointRadius": 3,
        },
        {
            "label": f"fitted ({forecast.chosen})",
            "data": [p.fitted for p in observed] + [None] * len(ahead),
            "borderColor": FITTED,
            **dashed,
        },
        {
            "label": "forecast",
            "data": joined + [p.adopted for p in ahead],
            "borderColor": FORECAST,
            **dashed,
        },
        {
            "label": f"{forecast.confidence:.0%} interval, low",
            "data": gap + [p.low for p in ahead],
            "borderColor": BAND,
            "pointRadius": 0,
            "fill": False,
        },
        {
            "label": f"{forecast.confidence:.0%} interval, high",
            "data": gap + [p.high for p in ahead],
            "borderColor": BAND,
            "backgroundColor": BAND,
            "pointRadius": 0,
            "fill": "-1",  # the band between low and high
        },
    ]
    if forecast.potential is not None:
        datasets.append(
            {
                "label": "potential m (estimated)"
                if forecast.potential_estimated
                else "potential m",
                "data": [forecast.potential] * len(labels),
                "borderColor": "#888888",
                "borderDash": [6, 4],
                "pointRadius": 0,
                "borderWidth": 1,
            }
        )
    marker = _peak(forecast, labels, datasets[1]["data"], datasets[2]["data"])
    if marker is not None:
        datasets.append(marker)
    y_title = "share of organisations" if forecast.measure == "share" else "organisations adopted"
    return {
        "type": "line",
        "data": {"labels": labels, "datasets": datasets},
        "options": _axes(y_title),
    }


def _peak(forecast: ForecastPublic, labels: list[str], fitted: list, ahead: list) -> dict | None:
    """New adoption's peak, marked on the curve (fitted if observed, else forecast), when it
    falls within the chart."""
    peak = forecast.landmarks.get("peak")
    if peak is None or peak.period not in labels:
        return None
    at = labels.index(peak.period)
    marked = [None] * len(labels)
    marked[at] = fitted[at] if at < len(forecast.observed) else ahead[at]
    return {
        "label": f"peak of new adoption ({peak.period})",
        "data": marked,
        "borderColor": "#000000",
        "backgroundColor": "#f1c40f",
        "pointStyle": "triangle",
        "pointRadius": 8,
        "showLine": False,
    }
