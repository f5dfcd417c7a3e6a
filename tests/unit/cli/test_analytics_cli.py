"""maas demo --usage, maas adoption, maas forecast (with a chart) and maas analytics
potential, in this process on a fresh home."""

from __future__ import annotations

import functools
from datetime import date

import pytest

from maas.analytics import demo_usage


@pytest.fixture
def filled(cli, monkeypatch):
    small = functools.partial(demo_usage.fill, industries=4, scale=0.3, seed=2)
    monkeypatch.setattr(demo_usage, "fill", small)  # a quarter of the demo, for speed
    code, out, err = cli("demo", "--usage")
    assert code == 0, err
    assert "usage records" in out
    assert "already" in cli("demo", "--usage")[1]  # never filled twice
    return cli


def test_adoption_is_a_table_of_industries(filled):
    code, out, err = filled("adoption", "--period", "week", "--min-requests", "2")
    assert code == 0, err
    for industry in ("finance", "healthcare", "manufacturing", "retail"):
        assert industry in out
    assert "at least 2 successful requests in the week" in out
    assert any(block in out for block in "▂▃▄▅▆▇█")  # the sparkline


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_a_forecast_prints_its_models_and_writes_a_chart(filled, tmp_path, suffix):
    chart = tmp_path / f"finance{suffix}"
    code, out, err = filled(
        "forecast", "finance", "--period", "week", "--horizon", "6", "--plot", str(chart)
    )
    assert code == 0, err
    assert "(chosen)" in out and "90% (covariance)" in out and "90% (bootstrap)" in out
    assert "peak of new adoption" in out and f"wrote {chart}" in out
    assert "penetration" in out and "(estimated: the " in out  # finance has no potential set
    head = chart.read_bytes()[:200]
    assert head.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in head or b"<?xml" in head
    assert chart.stat().st_size > 10_000
    if suffix == ".svg":  # matplotlib keeps each text as a comment beside its glyphs
        drawn = chart.read_text()
        for part in ("adopters", "fit", "forecast", "90% prediction interval", "peak (",
                     "potential m (estimated)"):  # fmt: skip
            assert part in drawn, part


def test_potentials_are_set_and_listed(filled):
    code, out, err = filled("analytics", "potential", "finance", "300", "--source", "register")
    assert code == 0, err
    assert "finance: potential 300 (register)" in out
    code, out, _ = filled("analytics", "potentials")
    assert "finance" in out and "register" in out
    code, out, _ = filled("adoption")
    assert "%" in out  # penetration now shows for finance


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("forecast", "atlantis"), "no adoption recorded in 'atlantis'"),
        (("forecast", "finance", "--plot", "chart.gif"), "a chart is a .png or .svg file"),
        (("forecast", "finance", "--horizon", "0"), "horizon is 1 to 120 periods"),
        (("adoption", "--by", "country"), "group_by is one of"),
        (("analytics", "potential", "atlantis", "5"), "unknown industry 'atlantis'"),
        (("analytics", "potential", "retail", "0"), "a positive number of organisations"),
    ],
)
def test_bad_input_is_one_line_on_stderr(cli, args, says):
    code, _, err = cli(*args)
    assert code == 1 and says in err and "Traceback" not in err


def test_a_published_series_is_imported_and_forecast(cli, tmp_path):
    from tests.unit.analytics.test_series import GOOD

    path = tmp_path / "adoption.csv"
    path.write_text(GOOD)
    code, out, err = cli("analytics", "import", str(path))
    assert code == 0, err
    assert "retail from 'Survey of firms': 9 share figures, 2017 to 2025" in out
    assert "Bank register" in cli("analytics", "series")[1]
    code, out, err = cli("forecast", "retail", "--source", "Survey of firms", "--horizon", "3")
    assert code == 0, err
    assert "retail (Survey of firms): a share of 0.5 by 2025" in out and "2028" in out
    path.write_text("period,industry,share,source\n2024,retail,12,s\n")
    code, _, err = cli("analytics", "import", str(path))
    assert code == 1 and "line 2: share 12 is above 1" in err


def test_prices_and_costs(cli, tmp_path):
    from tests.fixtures import make_tiny_llama

    code, _, err = cli("models", "import", str(make_tiny_llama(tmp_path / "tiny")), "-n", "tiny")
    assert code == 0, err
    code, out, err = cli("prices", "set", "tiny", "--prompt", "0.5", "--completion", "1.5")
    assert code == 0, err
    assert "tiny: USD 0.5 / 1.5 per 1K prompt / completion tokens" in out
    assert "tiny" in cli("prices", "list")[1]
    code, out, err = cli("costs", "--by", "model")
    assert code == 0 and "cost (USD)" in out, err
    code, _, err = cli("prices", "set", "nope", "--prompt", "1")
    assert code == 1 and "model 'nope' not found" in err


def test_costs_print_a_sparkline_of_cost_per_day(filled, tmp_path):
    from tests.fixtures import make_tiny_llama

    tiny = str(make_tiny_llama(tmp_path / "tiny"))
    assert filled("models", "import", tiny, "-n", "smollm2-135m-instruct")[0] == 0
    assert filled("prices", "set", "smollm2-135m-instruct", "--prompt", "0.5")[0] == 0
    window = ("--since", "2026-01-05", "--until", "2026-02-01")
    code, out, err = filled("costs", "--by", "industry", *window)
    assert code == 0 and "retail" in out, err
    line = next(line for line in out.splitlines() if line.startswith("cost per day, "))
    span, blocks = line.removeprefix("cost per day, ").split(": ")
    first, last = (date.fromisoformat(day) for day in span.split(" to "))
    assert "2026-01-05" <= first.isoformat() <= last.isoformat() <= "2026-02-01"
    assert len(blocks) == (last - first).days + 1  # one a day, quiet days included
    assert any(block in blocks for block in "▂▃▄▅▆▇█")
    code, out, err = filled("costs", "--by", "day", *window)
    assert code == 0 and line in out, err
    code, out, err = filled("costs")  # the whole year: a block a week
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("cost per week from "))
    span, blocks = line.removeprefix("cost per week from ").split(": ")
    first, last = (date.fromisoformat(day.strip("()to ")) for day in span.split(" (to "))
    assert (last - first).days > 300 and len(blocks) == (last - first).days // 7 + 1
