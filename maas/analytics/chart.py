"""A forecast as a picture (PNG or SVG, by the file's suffix): the adopters observed, the
chosen curve through them, the forecast with its prediction band, the peak of new adoption
and the market potential. matplotlib draws it off-screen (its Agg backend)."""

from __future__ import annotations

from pathlib import Path

from maas.analytics.report import ForecastPublic
from maas.errors import InvalidRequest

FORMATS = (".png", ".svg")
TICKS = 8


def check_path(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise InvalidRequest(f"a chart is a .png or .svg file, not {path.name!r}", param="plot")


def write(result: ForecastPublic, path: Path) -> Path:
    check_path(path)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    observed, ahead = result.observed, result.forecast
    labels = [p.period for p in observed] + [p.period for p in ahead]
    seen = range(len(observed))
    later = range(len(observed), len(labels))
    figure, axes = pyplot.subplots(figsize=(9, 5), dpi=110)
    band = int(result.confidence * 100)
    axes.fill_between(
        later, [p.low for p in ahead], [p.high for p in ahead], color="tab:blue", alpha=0.18,
        label=f"{band}% prediction interval",
    )  # fmt: skip
    axes.plot(seen, [p.adopted for p in observed], "o", ms=3.5, color="black", label="adopters")
    axes.plot(seen, [p.fitted for p in observed], color="tab:blue", label=f"{result.chosen} fit")
    axes.plot(later, [p.adopted for p in ahead], "--", color="tab:blue", label="forecast")
    m = result.potential if result.potential is not None else result.params.get("m")
    if m:
        given = result.potential is not None and not result.potential_estimated
        how = "set" if given else "estimated"
        axes.axhline(m, color="tab:gray", lw=0.8, ls=":", label=f"potential m ({how})")
    peak = result.landmarks["peak"].period
    if peak in labels:
        axes.axvline(labels.index(peak), color="tab:red", lw=0.8, label=f"peak ({peak})")
    step = max(1, len(labels) // TICKS)
    axes.set_xticks(range(0, len(labels), step), labels[::step], rotation=30, ha="right")
    if result.source == "usage records":
        what = f"adopters (active: {result.min_requests}+ requests in a {result.period})"
    else:
        what = f"{result.measure}, as {result.source} publishes it"
    axes.set_ylabel(what)
    axes.set_title(f"Adoption of {result.group}: {result.chosen} forecast")
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format=path.suffix.lower()[1:])
    pyplot.close(figure)
    partial.replace(path)
    return path
