"""Imported adoption series (maas/analytics/series.py): every problem reported with its
line, nothing stored from a bad file, a series imported again replaced, and its forecast
labelled with its source."""

from __future__ import annotations

import pytest

from maas.analytics import report, series
from maas.db import make_engine, upgrade
from maas.errors import InvalidRequest

GOOD = """period,industry,share,adopters,source
2017,retail,0.02,,Survey of firms
2018,retail,0.035,,Survey of firms
2019,retail,0.06,,Survey of firms
2020,retail,0.10,,Survey of firms
2021,retail,0.16,,Survey of firms
2022,retail,0.24,,Survey of firms
2023,retail,0.33,,Survey of firms
2024,retail,0.42,,Survey of firms
2025,retail,0.50,,Survey of firms
2024-01,banking,,12,Bank register
2024-02,banking,,30,Bank register
"""


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'series.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def test_a_good_file_is_stored_as_series_and_replaced_when_imported_again(engine):
    stored = series.store(engine, series.parse(GOOD))
    assert {(s.industry, s.source, s.measure, len(s.periods)) for s in stored} == {
        ("retail", "Survey of firms", "share", 9),
        ("banking", "Bank register", "adopters", 2),
    }
    again = "period,industry,adopters,source\n2024-03,banking,41,Bank register\n"
    series.store(engine, series.parse(again))
    banking = series.load(engine, "banking")
    assert [(s.periods, s.values) for s in banking] == [(["2024-03"], [41.0])]
    assert len(series.load(engine, "retail")[0].periods) == 9  # other series untouched


def test_an_imported_series_is_forecast_with_its_source(engine):
    series.store(engine, series.parse(GOOD))
    result = report.forecast_report(engine, None, "retail", source="Survey of firms", horizon=4)
    assert result.source == "Survey of firms" and result.measure == "share"
    assert [p.period for p in result.forecast] == ["2026", "2027", "2028", "2029"]
    assert result.observed[-1].adopted == pytest.approx(0.5)
    assert 0.5 < result.params["m"] <= 1.0  # a share saturates at most at everyone
    assert all(point.high <= 1.0 + 1e-9 for point in result.forecast)
    with pytest.raises(Exception, match="no series of 'retail' from 'Gartner'"):
        report.forecast_report(engine, None, "retail", source="Gartner")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("year,industry,share\n", "line 1: the header needs the columns period, industry"),
        ("period,industry,share,source\n", "the file has no rows"),
        ("period,industry,share,source\n2024,Retail!,0.1,s\n", "line 2: industry 'retail!'"),
        ("period,industry,share,source\n24,retail,0.1,s\n", "line 2: period '24'"),
        ("period,industry,share,source\n2021-W53,retail,0.1,s\n", "'2021-W53' does not exist"),
        ("period,industry,share,source\n2024,retail,12,s\n", "line 2: share 12 is above 1"),
        ("period,industry,share,source\n2024,retail,x,s\n", "line 2: share 'x' is not a number"),
        ("period,industry,share,source\n2024,retail,-1,s\n", "at least 0"),
        ("period,industry,share,source\n2024,retail,0.1,\n", "line 2: source"),
        (
            "period,industry,share,adopters,source\n2024,retail,0.1,4,s\n",
            "line 2: give adopters or share, one of the two",
        ),
        (
            "period,industry,share,source\n2022,retail,0.1,s\n2024,retail,0.2,s\n",
            "line 3: retail from 's' jumps from 2022 to 2024",
        ),
        (
            "period,industry,share,source\n2022,retail,0.1,s\n2022,retail,0.2,s\n",
            "line 3: retail from 's' has 2022 twice",
        ),
        (
            "period,industry,share,source\n2022,retail,0.1,s\n2022-05,retail,0.2,s\n",
            "mixes years, months and weeks",
        ),
    ],
)
def test_every_problem_is_reported_with_its_line_and_nothing_is_stored(engine, text, says):
    with pytest.raises(InvalidRequest, match=says.replace("(", r"\(")):
        series.parse(text)
    assert series.load(engine) == []


def test_several_problems_are_reported_at_once():
    text = "period,industry,share,source\n2024,retail,2,s\nx,retail,0.1,s\n2025,a b,0.1,s\n"
    with pytest.raises(InvalidRequest) as caught:
        series.parse(text)
    message = caught.value.message
    assert "line 2:" in message and "line 3:" in message and "line 4:" in message
