#!/usr/bin/env python3
"""Draw the sse-sidecar dashboard, with real data, to a PNG (matplotlib): README's picture.

Grafana cannot run everywhere (nor in CI), but Prometheus can: this draws every panel of
dashboards/sse-sidecar-overview.json where the dashboard puts it, filled with the results of its
own queries, sent as Grafana sends them, to a Prometheus that scrapes sidecars (and loads the
recording rules):

    .venv/bin/python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --range 15m \\
        --out dashboards/sse-sidecar-overview.png

Time series panels show their lines over the range, stat panels their value in their threshold
colour. It is a layout preview with real data, not a Grafana screenshot.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only

from matplotlib import pyplot
from matplotlib.axes import Axes
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "sse-sidecar-overview.json"
FILTERS = ("cluster", "namespace", "job", "pod")

ROW_INCH = 0.3  # one grid row
WIDTH_INCH = 22.0  # 24 grid columns
POINTS = 120  # samples per time series
BG, PANEL, BORDER, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e"
NAMED = {
    "green": "#73bf69",
    "red": "#f2495c",
    "yellow": "#fade2a",
    "orange": "#ff9830",
    "dark-red": "#c4162a",
    "blue": "#5794f2",
}
DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    return float(text[:-1]) * DURATIONS[text[-1]]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            body = json.load(resp)
        if body["status"] != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]


@dataclass
class Vars:
    """Grafana's variables, as the dashboard's queries are sent (filters: All is ``.*``)."""

    rate_interval: str
    range: str
    filters: dict[str, str] = field(default_factory=lambda: dict.fromkeys(FILTERS, ".*"))

    def apply(self, expr: str) -> str:
        out = expr.replace("$__rate_interval", self.rate_interval).replace("$__range", self.range)
        for name, value in self.filters.items():
            out = out.replace("${" + name + "}", value).replace("$" + name, value)
        return out


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or "value"


def human(value: float, unit: str, decimals: int | None = None) -> str:
    """A value as Grafana would show it in ``unit`` (close enough for a preview)."""
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit.startswith("suffix:"):
        return f"{value:.3g}{unit[7:]}"
    if unit == "s":
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    if unit in ("bytes", "Bps"):
        for step in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or step == "GiB":
                return f"{value:.3g} {step}{'/s' if unit == 'Bps' else ''}"
            value /= 1024
    tail = {"ops": " ops/s", "reqps": " req/s"}.get(unit, "")
    if decimals is not None:
        return f"{value:.{decimals}f}{tail}"
    return f"{value:.3g}{tail}"


def colour(value: float, steps: list[dict[str, Any]]) -> str:
    chosen: str = steps[0]["color"]
    for step in steps[1:]:
        if step["value"] is not None and value >= step["value"]:
            chosen = step["color"]
    return NAMED.get(chosen, chosen)


@dataclass
class Drawn:
    """What a panel showed: its series' names (empty: "No data")."""

    title: str
    series: list[str]


def _frame(ax: Axes, title: str) -> None:
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_color(BORDER)
    ax.set_title(title, loc="left", color=TEXT, fontsize=9, fontweight="bold", pad=4)
    ax.tick_params(colors=MUTED, labelsize=6, length=2)


def _stat(ax: Axes, panel: dict[str, Any], prom: Prometheus, subst: Vars, at: float) -> Drawn:
    defaults = panel["fieldConfig"]["defaults"]
    values: list[tuple[str, float]] = []
    for target in panel["targets"]:
        result = prom.get("query", query=subst.apply(target["expr"]), time=str(at))["result"]
        values += [
            (legend(target["legendFormat"], s["metric"]), float(s["value"][1])) for s in result
        ]
    ax.set_xticks([])
    ax.set_yticks([])
    if not values:
        ax.text(0.5, 0.45, "No data", ha="center", va="center", color=MUTED, fontsize=12)
        return Drawn(panel["title"], [])
    shown = values[:3]
    for i, (name, value) in enumerate(shown):
        top = 1 - i / len(shown)
        fill = colour(value, defaults["thresholds"]["steps"])
        ax.axhspan(top - 1 / len(shown) + 0.03, top - 0.03, color=fill, alpha=0.85)
        text = human(value, defaults["unit"], defaults.get("decimals"))
        ax.text(
            0.5,
            top - 0.5 / len(shown),
            f"{name}: {text}" if len(shown) > 1 else text,
            ha="center",
            va="center",
            color="white",
            fontsize=20 if len(shown) == 1 else 11,
            fontweight="bold",
            transform=ax.transAxes,
        )
    ax.set_ylim(0, 1)
    return Drawn(panel["title"], [name for name, _ in values])


def _timeseries(
    ax: Axes, panel: dict[str, Any], prom: Prometheus, subst: Vars, start: float, end: float
) -> Drawn:
    defaults = panel["fieldConfig"]["defaults"]
    step = max(1.0, (end - start) / POINTS)
    names: list[str] = []
    for target in panel["targets"]:
        data = prom.get(
            "query_range",
            query=subst.apply(target["expr"]),
            start=str(start),
            end=str(end),
            step=str(step),
        )
        for s in data["result"]:
            xs = [(float(t) - end) / 60 for t, _ in s["values"]]
            ys = [float(v) for _, v in s["values"]]
            name = legend(target["legendFormat"], s["metric"])
            ax.plot(xs, ys, linewidth=1, label=name)
            names.append(name)
    for step_ in defaults["thresholds"]["steps"][1:]:
        ax.axhline(step_["value"], color=NAMED.get(step_["color"], step_["color"]), lw=0.8, ls="--")
    if not names:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", color=MUTED, transform=ax.transAxes)
    else:
        ax.legend(loc="upper left", fontsize=5, frameon=False, labelcolor=TEXT, ncol=3)
        ax.yaxis.set_major_formatter(lambda v, _: human(v, defaults["unit"]))
    ax.set_xlim((start - end) / 60, 0)
    ax.grid(color=BORDER, linewidth=0.4)
    return Drawn(panel["title"], names)


def render(
    prom: Prometheus, range_: str, filters: dict[str, str], end: float
) -> tuple[Figure, list[Drawn]]:
    """The dashboard over the ``range_`` ending at ``end``; what each panel showed."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = pyplot.figure(figsize=(WIDTH_INCH, rows * ROW_INCH + 0.6), facecolor=BG)
    height = rows * ROW_INCH + 0.6
    fig.text(0.01, 1 - 0.3 / height, dashboard["title"], color=TEXT, fontsize=14, va="center")
    # Grafana's $__rate_interval: at least 4 scrape intervals; a minute fits the usual ones.
    subst = Vars("1m", range_, {**dict.fromkeys(FILTERS, ".*"), **filters})
    start = end - seconds(range_)
    drawn: list[Drawn] = []
    for panel in panels:
        g = panel["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        top = 1 - (0.6 + g["y"] * ROW_INCH) / height
        box_height = g["h"] * ROW_INCH / height
        if panel["type"] == "row":
            fig.text(left + 0.003, top - box_height / 2, panel["title"], color=TEXT, fontsize=11)
            continue
        # Room on the left for a time series' y tick labels, inside its own cell.
        pad_left = (0.55 if panel["type"] == "timeseries" else 0.06) / WIDTH_INCH
        pad_right, pad_top, pad_bottom = 0.06 / WIDTH_INCH, 0.22 / height, 0.22 / height
        ax = fig.add_axes(
            (
                left + pad_left,
                top - box_height + pad_bottom,
                width - pad_left - pad_right,
                box_height - pad_top - pad_bottom,
            )
        )
        _frame(ax, panel["title"])
        if panel["type"] == "stat":
            drawn.append(_stat(ax, panel, prom, subst, end))
        else:
            drawn.append(_timeseries(ax, panel, prom, subst, start, end))
    return fig, drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--range", default="15m", help="time range shown, e.g. 15m, 1h")
    parser.add_argument("--end", type=float, default=None, help="unix time (default: now)")
    parser.add_argument("--out", type=Path, default=DASHBOARD.with_suffix(".png"))
    for name in FILTERS:
        parser.add_argument(f"--{name}", default=".*", help=f"{name} filter (regex)")
    args = parser.parse_args()
    filters = {name: getattr(args, name) for name in FILTERS}
    fig, drawn = render(Prometheus(args.prometheus), args.range, filters, args.end or time.time())
    fig.savefig(args.out, dpi=72, facecolor=BG, pil_kwargs={"optimize": True})
    empty = [d.title for d in drawn if not d.series]
    print(f"wrote {args.out}" + (f" (no data: {', '.join(empty)})" if empty else ""))


if __name__ == "__main__":
    main()
