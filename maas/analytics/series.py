"""Published adoption series (``maas analytics import adoption.csv``): an analyst's survey
figures, forecast as the platform's own usage is.

The CSV has a header and the columns ``period``, ``industry``, ``adopters`` or ``share``
(one of the two in each row), and ``source``:

- ``period``: ``2024`` (a year), ``2024-03`` (a month) or ``2024-W09`` (an ISO week); one
  kind of period per series, consecutive (a series is one industry from one source);
- ``adopters``: how many organisations had adopted by the end of the period (cumulative);
  ``share``: what fraction of them had, from 0 to 1;
- ``source``: who published the figure; kept with every point and shown with the forecast.

Every problem is reported with its line, all of them at once, and nothing is stored unless
the whole file is good. Importing a series again replaces its points.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import Engine, delete, insert, select

from maas.db.tables import AdoptionPoint
from maas.errors import InvalidRequest

COLUMNS = ("period", "industry", "source")
MEASURES = ("adopters", "share")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
PERIODS = {
    "year": re.compile(r"^(\d{4})$"),
    "month": re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$"),
    "week": re.compile(r"^(\d{4})-W(0[1-9]|[1-4]\d|5[0-3])$"),
}
MAX_ROWS = 100_000


@dataclass(frozen=True)
class Point:
    line: int
    industry: str
    source: str
    period: str
    measure: str
    value: float


@dataclass(frozen=True)
class Series:
    industry: str
    source: str
    measure: str
    periods: list[str]
    values: list[float]
    """Cumulative, as published."""


def parse(text: str) -> list[Point]:
    """The file's points, or InvalidRequest listing every problem with its line."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    if missing or not any(m in header for m in MEASURES):
        wanted = "period, industry, adopters or share, source"
        raise InvalidRequest(f"line 1: the header needs the columns {wanted}; it has {header}")
    points, problems = [], []
    rows = enumerate(reader, start=2)
    line = 1
    while True:
        try:
            line, row = next(rows)
        except StopIteration:
            break
        except csv.Error as error:  # a field over csv's size limit, say
            raise InvalidRequest(f"line {line + 1}: {error}", param="file") from None
        if line > MAX_ROWS + 1:
            raise InvalidRequest(f"more than {MAX_ROWS:,} rows")
        try:
            points.append(_point(line, row))
        except ValueError as error:
            problems.append(f"line {line}: {error}")
    if not points and not problems:
        problems.append("the file has no rows")
    problems += _series_problems(points)
    if problems:
        shown = "; ".join(problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise InvalidRequest(f"{shown}{more}", param="file")
    return points


def _point(line: int, row: dict) -> Point:
    industry = (row.get("industry") or "").strip().lower()
    source = (row.get("source") or "").strip()
    period = (row.get("period") or "").strip()
    if not NAME.match(industry):
        raise ValueError(f"industry {industry!r}: lowercase letters, digits, '-', '_', '.'")
    if not source or len(source) > 200 or not source.isprintable():
        raise ValueError("source: who published the figure (1 to 200 printable characters)")
    if _kind(period) is None:
        raise ValueError(f"period {period!r}: a year (2024), month (2024-03) or week (2024-W09)")
    try:
        _ordinal(period)
    except ValueError:
        raise ValueError(f"period {period!r} does not exist (a year without that week)") from None
    given = [m for m in MEASURES if (row.get(m) or "").strip()]
    if len(given) != 1:
        raise ValueError("give adopters or share, one of the two")
    measure = given[0]
    try:
        value = float(row[measure])
    except ValueError:
        raise ValueError(f"{measure} {row[measure]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{measure} must be a number of at least 0")
    if measure == "share" and value > 1:
        raise ValueError(f"share {value:g} is above 1 (a share is 0 to 1, not a percentage)")
    return Point(line, industry, source, period, measure, value)


def _kind(period: str) -> str | None:
    return next((kind for kind, pattern in PERIODS.items() if pattern.match(period)), None)


def _series_problems(points: list[Point]) -> list[str]:
    """One measure and one kind of period per series, no repeats, no gaps."""
    problems = []
    by_series: dict[tuple[str, str], list[Point]] = {}
    for point in points:
        by_series.setdefault((point.industry, point.source), []).append(point)
    for (industry, source), rows in by_series.items():
        name = f"{industry} from {source!r}"
        if len({p.measure for p in rows}) > 1:
            problems.append(f"line {rows[0].line}: {name} mixes adopters and share")
        if len({_kind(p.period) for p in rows}) > 1:
            problems.append(f"line {rows[0].line}: {name} mixes years, months and weeks")
            continue
        ordered = sorted(rows, key=lambda p: _ordinal(p.period))
        for before, after in zip(ordered, ordered[1:], strict=False):
            gap = _ordinal(after.period) - _ordinal(before.period)
            if gap == 0:
                problems.append(f"line {after.line}: {name} has {after.period} twice")
            elif gap > 1:
                problems.append(
                    f"line {after.line}: {name} jumps from {before.period} to {after.period}: "
                    "periods must be consecutive"
                )
    return problems


def _ordinal(period: str) -> int:
    kind = _kind(period)
    if kind == "year":
        return int(period)
    if kind == "month":
        return int(period[:4]) * 12 + int(period[5:]) - 1
    return date.fromisocalendar(int(period[:4]), int(period[6:]), 1).toordinal() // 7


def store(engine: Engine, points: list[Point]) -> list[Series]:
    """Keep the points, replacing every series they belong to; returns the series."""
    now = datetime.now(UTC)
    names = {(p.industry, p.source) for p in points}
    with engine.begin() as connection:
        for industry, source in names:
            connection.execute(
                delete(AdoptionPoint).where(
                    AdoptionPoint.industry == industry, AdoptionPoint.source == source
                )
            )
        connection.execute(
            insert(AdoptionPoint),
            [
                {
                    "industry": p.industry,
                    "source": p.source,
                    "period": p.period,
                    "measure": p.measure,
                    "value": p.value,
                    "imported_at": now,
                }
                for p in points
            ],
        )
    return [s for s in load(engine) if (s.industry, s.source) in names]


def load(engine: Engine, industry: str | None = None) -> list[Series]:
    query = select(AdoptionPoint)
    if industry is not None:
        query = query.where(AdoptionPoint.industry == industry)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    grouped: dict[tuple[str, str], list] = {}
    for row in rows:
        grouped.setdefault((row.industry, row.source), []).append(row)
    result = []
    for (name, source), points in sorted(grouped.items()):
        points.sort(key=lambda r: _ordinal(r.period))
        result.append(
            Series(
                industry=name,
                source=source,
                measure=points[0].measure,
                periods=[r.period for r in points],
                values=[r.value for r in points],
            )
        )
    return result
