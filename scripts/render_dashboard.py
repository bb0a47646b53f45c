"""Render the sse-sidecar dashboard's layout, with real data, to an SVG (stdlib only).

Grafana cannot run everywhere (nor in CI), but Prometheus can: this draws every panel of
dashboards/sse-sidecar-overview.json where the dashboard puts it, filled with the results of its
own queries against a Prometheus that scrapes sidecars (and loads the recording rules). The
README's picture of the dashboard is made with it:

    python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --range 15m \\
        --out dashboards/sse-sidecar-overview.svg

Time series panels show their lines over the range, stat panels their value with their threshold
colour. The look is Grafana's dark theme, roughly; it is a layout preview, not a screenshot.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from html import escape
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "sse-sidecar-overview.json"

COLUMN = 46  # px per grid column (24 columns)
ROW = 30  # px per grid row
GAP = 4
BG, PANEL, BORDER, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e"
PALETTE = (
    "#73bf69",
    "#f2cc0c",
    "#5794f2",
    "#ff780a",
    "#b877d9",
    "#f2495c",
    "#37872d",
    "#fade2a",
    "#8ab8ff",
    "#ff9830",
    "#ca95e5",
    "#ff7383",
)
NAMED = {
    "green": "#73bf69",
    "red": "#f2495c",
    "yellow": "#fade2a",
    "orange": "#ff9830",
    "dark-red": "#c4162a",
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


class Vars:
    """Grafana's variables, as the dashboard's queries are sent."""

    def __init__(self, rate_interval: str, range_: str, filters: dict[str, str]) -> None:
        self.rate_interval, self.range, self.filters = rate_interval, range_, filters

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
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if unit == "percentunit":
        d = 1 if decimals is None else decimals
        return f"{value * 100:.{d}f}%"
    if unit.startswith("suffix:"):
        return f"{value:.3g}{unit[7:]}"
    if unit == "s":
        if abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        return f"{value:.3g} s"
    if unit in ("bytes", "Bps"):
        suffix = "/s" if unit == "Bps" else ""
        for step in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or step == "GiB":
                return f"{value:.3g} {step}{suffix}"
            value /= 1024
    tail = {"ops": " ops/s", "reqps": " req/s"}.get(unit, "")
    if decimals is not None:
        return f"{value:.{decimals}f}{tail}"
    for scale, letter in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{letter}{tail}"
    return f"{value:.3g}{tail}"


def threshold_colour(value: float, steps: list[dict[str, Any]]) -> str:
    colour: str = steps[0]["color"]
    for step in steps[1:]:
        if step["value"] is not None and value >= step["value"]:
            colour = step["color"]
    return NAMED.get(colour, colour)


class Canvas:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, s: str, size: int = 12, fill: str = TEXT, **kw: str) -> None:
        attrs = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in kw.items())
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{fill}" {attrs}>'
            f"{escape(s)}</text>"
        )


def draw_stat(
    c: Canvas,
    panel: dict[str, Any],
    box: tuple[float, float, float, float],
    prom: Prometheus,
    subst: Vars,
    at: float,
) -> None:
    x, y, w, h = box
    defaults = panel["fieldConfig"]["defaults"]
    values: list[tuple[str, float]] = []
    for target in panel["targets"]:
        expr = subst.apply(target["expr"])
        for s in prom.get("query", query=expr, time=str(at))["result"]:
            values.append(
                (legend(target.get("legendFormat", ""), s["metric"]), float(s["value"][1]))
            )
    mode = panel["options"].get("colorMode", "value")
    steps = defaults["thresholds"]["steps"]
    if not values:
        c.text(x + w / 2, y + h / 2 + 10, "No data", 16, MUTED, text_anchor="middle")
        return
    shown = values[:3]
    for i, (name, value) in enumerate(shown):
        cy = y + 28 + (h - 28) * (i + 0.5) / len(shown)
        colour = threshold_colour(value, steps) if not math.isnan(value) else MUTED
        if mode == "background":
            top = y + 24 + (h - 28) * i / len(shown)
            band = (h - 28) / len(shown) - 4
            c.add(
                f'<rect x="{x + 4}" y="{top:.1f}" width="{w - 8}" height="{band:.1f}" rx="2" '
                f'fill="{colour}" opacity="0.85"/>'
            )
            colour = "#ffffff"
        size = int(min(36, (h - 28) / len(shown) * 0.55, w / 7))
        label = human(value, defaults["unit"], defaults.get("decimals"))
        if panel["options"].get("textMode") == "value_and_name" or len(shown) > 1:
            label = f"{name}: {label}"
            size = min(size, int(w / max(8, len(label) * 0.62)))
        c.text(
            x + w / 2,
            cy + size / 3,
            label,
            max(size, 10),
            colour,
            text_anchor="middle",
            font_weight="bold",
        )


def draw_timeseries(
    c: Canvas,
    panel: dict[str, Any],
    box: tuple[float, float, float, float],
    prom: Prometheus,
    subst: Vars,
    start: float,
    end: float,
    step: float,
) -> None:
    x, y, w, h = box
    defaults = panel["fieldConfig"]["defaults"]
    series: list[tuple[str, list[tuple[float, float]]]] = []
    for target in panel["targets"]:
        expr = subst.apply(target["expr"])
        data = prom.get("query_range", query=expr, start=str(start), end=str(end), step=str(step))
        for s in data["result"]:
            points = [(float(t), float(v)) for t, v in s["values"] if math.isfinite(float(v))]
            if points:
                series.append((legend(target.get("legendFormat", ""), s["metric"]), points))
    left, top, right, bottom = x + 52, y + 26, x + w - 8, y + h - 34
    if not series:
        c.text(x + w / 2, y + h / 2, "No data", 14, MUTED, text_anchor="middle")
        return
    values = [v for _, pts in series for _, v in pts]
    thresholds = []
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off") != "off":
        thresholds = [s for s in defaults["thresholds"]["steps"] if s["value"] is not None]
    lo = min(0.0, *values) if defaults.get("min") == 0 or min(values) >= 0 else min(values)
    hi = max(values)
    visible = [t for t in thresholds if t["value"] <= max(hi, lo + 1e-12) * 1.5]
    hi = max([hi, *(t["value"] for t in visible)])
    if hi <= lo:
        hi = lo + 1
    unit = defaults["unit"]
    for frac in (0.0, 0.5, 1.0):
        gy = bottom - (bottom - top) * frac
        c.add(f'<line x1="{left}" y1="{gy:.1f}" x2="{right}" y2="{gy:.1f}" stroke="{BORDER}"/>')
        c.text(left - 4, gy + 4, human(lo + (hi - lo) * frac, unit), 9, MUTED, text_anchor="end")

    def px(t: float, v: float) -> str:
        return (
            f"{left + (right - left) * (t - start) / (end - start):.1f},"
            f"{bottom - (bottom - top) * (v - lo) / (hi - lo):.1f}"
        )

    for t in visible:
        ty = bottom - (bottom - top) * (t["value"] - lo) / (hi - lo)
        colour = NAMED.get(t["color"], t["color"])
        c.add(
            f'<line x1="{left}" y1="{ty:.1f}" x2="{right}" y2="{ty:.1f}" stroke="{colour}" '
            f'stroke-dasharray="4 3" opacity="0.8"/>'
        )
    for i, (_, pts) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        c.add(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
            f'points="{" ".join(px(t, v) for t, v in pts)}"/>'
        )
    # The legend names the series that show something first; all-zero ones last.
    order = sorted(range(len(series)), key=lambda i: -max(abs(v) for _, v in series[i][1]))
    lx, ly = left, y + h - 14
    for n, i in enumerate(order):
        name = series[i][0]
        label = name if len(name) <= 24 else name[:23] + "…"
        width = 14 + len(label) * 5.6
        if lx + width > x + w - 4:
            c.text(lx, ly + 1, f"+{len(series) - n}", 9, MUTED)
            break
        colour = PALETTE[i % len(PALETTE)]
        c.add(f'<rect x="{lx:.1f}" y="{ly - 3}" width="10" height="3" fill="{colour}"/>')
        c.text(lx + 13, ly + 1, label, 9, MUTED)
        lx += width


def render(prom: Prometheus, range_: str, filters: dict[str, str], at: float) -> str:
    dashboard = json.loads(DASHBOARD.read_text())
    span = seconds(range_)
    start, end = at - span, at
    step = max(span / 180, 1.0)
    subst = Vars("1m" if span <= 3600 else "5m", range_, filters)
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    width, height = 24 * COLUMN + GAP, bottom * ROW + 40
    c = Canvas()
    c.add(f'<rect width="{width}" height="{height}" fill="{BG}"/>')
    c.text(
        GAP + 4,
        24,
        f"{dashboard['title']} · last {range_} · real data from Prometheus",
        16,
        font_weight="bold",
    )
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        x, y = g["x"] * COLUMN + GAP, g["y"] * ROW + 36
        w, h = g["w"] * COLUMN - GAP, g["h"] * ROW - GAP
        if panel["type"] == "row":
            c.text(x + 4, y + 20, panel["title"], 14, TEXT, font_weight="bold")
            continue
        c.add(
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="{PANEL}" '
            f'stroke="{BORDER}"/>'
        )
        c.text(x + 8, y + 16, panel["title"], 12, TEXT, font_weight="bold")
        box = (x, y, w, h)
        if panel["type"] == "stat":
            draw_stat(c, panel, box, prom, subst, end)
        else:
            draw_timeseries(c, panel, box, prom, subst, start, end, step)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Inter, Helvetica, Arial, sans-serif">\n'
        + "\n".join(c.parts)
        + "\n</svg>\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--range", default="15m", help="time range, e.g. 15m, 1h")
    parser.add_argument("--out", default=str(ROOT / "dashboards" / "sse-sidecar-overview.svg"))
    for name in ("namespace", "job", "instance"):
        parser.add_argument(f"--{name}", default=".*", help=f"regex for ${name} (default: All)")
    args = parser.parse_args()
    filters = {"namespace": args.namespace, "job": args.job, "instance": args.instance}
    svg = render(Prometheus(args.prometheus), args.range, filters, time.time())
    Path(args.out).write_text(svg)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
