"""Adoption analytics on a million usage records (SQLite): the adoption aggregation, and the
forecast of every industry, each beside the plain way of doing it, in the same run.

- **adoption**: ``maas adoption``'s computation (one SQL aggregation per tenant, model and
  week, then numpy) against reading every record into Python and counting with dicts;
- **forecast**: every industry's four curves, backtests and 200-draw bootstrap
  (``maas forecast all``), with the bootstrap's refits batched, against the same with each
  refit a call of scipy's ``least_squares``.

The records are ``maas demo --usage``'s synthetic year with 5.6 times the requests (about a
million).
Medians of ``--repeats`` runs.

    .venv/bin/python bench/analytics.py [--scale 5.6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from sqlalchemy import func, select

from maas.analytics import batched, demo_usage, fitting, report
from maas.db import make_engine, upgrade
from maas.db.tables import UsageRecord

RESULTS = Path(__file__).parent / "results" / "analytics.json"


def timed(call, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def adoption_in_python(engine, min_requests: int = 1) -> dict[str, list[int]]:
    """The baseline: every record into Python, then counts per organisation and week."""
    organisation_of = report.adoption.organisations(engine)
    requests: dict[tuple[str, str, int], int] = defaultdict(int)
    query = select(UsageRecord.tenant, UsageRecord.industry, UsageRecord.day).where(
        UsageRecord.model.is_not(None), UsageRecord.status < 400
    )
    with engine.connect() as connection:
        for tenant, industry, day in connection.execute(query):
            week = (report.adoption.date.fromisoformat(day) - report.adoption.MONDAY).days // 7
            requests[(industry, organisation_of.get(tenant, tenant), week)] += 1
    first: dict[tuple[str, str], int] = {}
    for (industry, organisation, week), count in requests.items():
        if count >= min_requests:
            key = (industry, organisation)
            first[key] = min(first.get(key, week), week)
    start = min(w for _, _, w in requests)
    end = max(w for _, _, w in requests)
    adopted: dict[str, list[int]] = defaultdict(lambda: [0] * (end - start + 1))
    for (industry, _), week in first.items():
        adopted[industry][week - start] += 1
    return dict(adopted)


def forecasts(engine) -> dict:
    return report.forecast_industries(engine, None, horizon=26, period="week")


def forecasts_one_refit_at_a_time(engine) -> dict:
    """The baseline: every bootstrap refit a scipy call (the batch solves none)."""
    original_refit, original_cap = batched.refit, fitting.SCIPY_REFITS

    def unsolved(curve, series, start, free, low, high):
        return batched.np.repeat(start[None], len(series), axis=0), batched.np.zeros(
            len(series), dtype=bool
        )

    batched.refit, fitting.SCIPY_REFITS = unsolved, 10**9
    try:
        return forecasts(engine)
    finally:
        batched.refit, fitting.SCIPY_REFITS = original_refit, original_cap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=5.6, help="requests x the demo's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{folder}/usage.db")
        upgrade(engine)
        started = time.perf_counter()
        demo_usage.fill(engine, scale=args.scale)
        with engine.connect() as connection:
            records = connection.scalar(select(func.count()).select_from(UsageRecord))
        print(f"{records:,} usage records written in {time.perf_counter() - started:.0f} s")
        rows = {}
        for unit in ("week", "month"):
            seconds, _ = timed(
                lambda unit=unit: report.adoption_report(engine, None, period=unit), args.repeats
            )
            rows[f"adoption by industry and {unit}"] = seconds
        ours, result = timed(lambda: report.adoption_report(engine, None, period="week"), 1)
        python, baseline = timed(lambda: adoption_in_python(engine), max(1, args.repeats // 2))
        mine = {g.group: [p.new_adopters for p in g.periods] for g in result.data}
        assert all(baseline[k] == mine[k] for k in mine), "the two ways disagree"
        rows["adoption, every record into Python (baseline)"] = python
        batched_seconds, results = timed(lambda: forecasts(engine), args.repeats)
        scipy_seconds, _ = timed(lambda: forecasts_one_refit_at_a_time(engine), 1)
        rows["forecast of every industry"] = batched_seconds
        rows["forecast, bootstrap refits one scipy call each (baseline)"] = scipy_seconds
        fitted = sum(1 for r in results.values() if not isinstance(r, str))
    for name, seconds in rows.items():
        print(f"{name:62s} {seconds:7.2f} s")
    speedups = {
        "adoption: SQL + numpy vs rows into Python": python / rows["adoption by industry and week"],
        "forecast: batched vs one scipy call a refit": scipy_seconds / batched_seconds,
    }
    for name, ratio in speedups.items():
        print(f"{name:62s} {ratio:7.1f}x")
    print(f"industries forecast: {fitted} of {len(results)}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {
                "records": records,
                "industries": len(results),
                "industries_forecast": fitted,
                "seconds": rows,
                "speedups": speedups,
                "python": sys.version.split()[0],
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
