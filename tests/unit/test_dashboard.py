"""A linter for the shipped Grafana dashboard (dashboards/sse-sidecar-overview.json).

Provisionable as is (fixed uid, no ``__inputs``), one ``datasource`` variable used by every panel
and target, the ``namespace``/``job``/``instance`` variables applied to every query, a unit and a
description on every panel, ``$__rate_interval`` windows, a sane grid, and no unknown metrics: every
series a query reads is one the sidecar exports (derived from ``sidecar.telemetry.Metrics``), a
shipped recording rule, or Prometheus' own ``up``. Every query parses as PromQL (through promtool);
test_prometheus_e2e.py runs them against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from sidecar.telemetry import Metrics
from tests.functional.test_prometheus_rules import (
    DASHBOARD,
    ERROR_BUDGET,
    promql_errors,
    recording_rules,
)

UID = "sse-sidecar-overview"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FILTER_VARIABLES = ("namespace", "job", "instance")
# Functions whose argument is a range vector: their window must come from Grafana.
RANGE_FUNCTIONS = (
    "rate|irate|increase|delta|idelta|deriv|predict_linear|resets|changes|holt_winters|"
    r"\w+_over_time"
)
# Stat panels summarise the selected time range: `$__range` is their window. Everything plotted
# over time uses `$__rate_interval` (at least 4 scrape intervals, so a rate always has 2 samples).
WINDOWS = {"stat": {"$__rate_interval", "$__range"}}
DEFAULT_WINDOWS = {"$__rate_interval"}
KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in (dashboard or load_dashboard())["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: dict[str, Any] | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """(panel, expr) for every query of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target["expr"]


def substitute(expr: str, *, rate_interval: str = "1m", range_: str = "1h") -> str:
    """``expr`` as Grafana sends it with every variable set to All (``.*``)."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    for name in FILTER_VARIABLES:
        out = out.replace("${" + name + "}", ".*").replace("$" + name, ".*")
    assert "$" not in out, f"a variable this test does not know: {out}"
    return out


def exported_series() -> set[str]:
    """The series names the sidecar's registry exports."""
    names: set[str] = set()
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        kind = str(metric._type)
        if kind == "counter":
            names.add(metric._name + "_total")
        elif kind == "histogram":
            names |= {metric._name + s for s in ("_bucket", "_sum", "_count")}
        elif kind == "info":
            names.add(metric._name + "_info")
        else:
            names.add(metric._name)
    return names


def series_in(expr: str) -> set[str]:
    """The series names an expression reads (strings, label matchers, grouping clauses, ranges
    and function names removed; what is left and is not a keyword or a number is a series)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b[a-zA-Z_]\w*\s*\(", "(", text)
    names = set(re.findall(r"(?<![\w.])[a-zA-Z_:][\w:]*", text))
    return {n for n in names if n.lower() not in KEYWORDS}


def test_provisionable_with_a_fixed_uid() -> None:
    d = load_dashboard()
    assert d["uid"] == UID
    assert "__inputs" not in d
    assert "__requires" not in d
    assert d["id"] is None
    assert d["title"]
    assert d["description"]
    assert isinstance(d["schemaVersion"], int)
    # No data source is named anywhere but through the variable.
    assert "${DS_" not in DASHBOARD.read_text()
    found = list(_values_of("datasource", d))
    assert found
    assert [v for v in found if v != DATASOURCE] == []


def _values_of(key: str, node: Any) -> Iterator[Any]:
    """Every value of ``key`` anywhere in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values_of(key, v)
    elif isinstance(node, list):
        for item in node:
            yield from _values_of(key, item)


def test_the_datasource_and_filter_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert next(iter(variables)) == "datasource"
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name in FILTER_VARIABLES:
        v = variables[name]
        assert v["type"] == "query", name
        assert v["datasource"] == DATASOURCE, name
        assert (v["includeAll"], v["multi"], v["allValue"]) == (True, True, ".*"), name
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        assert v["definition"] == query
        m = re.fullmatch(r"label_values\(sse_sidecar_build_info(\{.*\})?, (\w+)\)", query)
        assert m is not None, query
        assert m.group(2) == name, query
    # Each filter narrows the next one's choices.
    assert "$namespace" in variables["job"]["definition"]
    assert "$job" in variables["instance"]["definition"]


def test_every_panel_and_target_uses_the_datasource_variable() -> None:
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_every_panel_has_a_unit_a_description_and_queries() -> None:
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert len(panel.get("description", "")) >= 20, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_panel_ids_are_unique_and_the_grid_is_sane() -> None:
    all_panels = list(panels())
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels:
        g = p["gridPos"]
        assert min(g["x"], g["y"]) >= 0, p["title"]
        assert min(g["w"], g["h"]) > 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            assert (g["x"], g["w"], g["h"]) == (0, 24, 1), p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_the_rows_of_the_issue() -> None:
    rows = [p["title"].split(":")[0] for p in panels() if p["type"] == "row"]
    assert rows == ["Golden signals", "Terminal outcomes", "Writer", "Replay", "Upstream", "SLO"]
    headline = next(p for p in panels() if p["title"] == "Forced [DONE] ratio")
    assert headline["type"] == "stat"
    steps = headline["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps][:2] == [None, ERROR_BUDGET]


def test_rate_windows_come_from_grafana() -> None:
    for panel, expr in targets():
        allowed = WINDOWS.get(panel["type"], DEFAULT_WINDOWS)
        calls = re.findall(rf"\b({RANGE_FUNCTIONS})\(", expr)
        args = re.findall(rf"\b(?:{RANGE_FUNCTIONS})\(([^()]*)\)", expr)
        assert len(args) == len(calls), f"{panel['title']}: a range function with a nested call"
        for arg in args:
            window = re.fullmatch(r"[\w:]+(?:\{[^}]*\})?\[([^\]]+)\]", arg.strip())
            assert window is not None, f"{panel['title']}: {arg}"
            assert window.group(1) in allowed, f"{panel['title']}: [{window.group(1)}]"
        # No range anywhere else (a fixed [5m] in a selector, a subquery).
        for window_text in re.findall(r"\[([^\]]*)\]", expr):
            assert window_text in allowed, f"{panel['title']}: [{window_text}]"


def test_every_query_applies_the_filter_variables() -> None:
    recorded = {r.name for r in recording_rules()}
    for panel, expr in targets():
        for selector in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
            name, matchers = selector
            # Recorded series are per job: the instance filter cannot apply.
            wanted = ("namespace", "job") if name in recorded else FILTER_VARIABLES
            for var in wanted:
                assert f'{var}=~"${var}"' in matchers, f"{panel['title']}: {name} without ${var}"
        bare = re.findall(r"(?<![\w:])(sse_sidecar_\w+|up|[a-z_]+:\w+:\w+)(?![\w{(:])", expr)
        assert not bare, f"{panel['title']}: unfiltered {bare}"


def test_no_unknown_metrics() -> None:
    exported = exported_series()
    recorded = {r.name for r in recording_rules()}
    known = exported | recorded | {"up"}
    used: set[str] = set()
    for panel, expr in targets():
        names = series_in(expr)
        assert names, f"{panel['title']}: reads no series"
        assert names <= known, f"{panel['title']}: unknown {names - known}"
        used |= names
    for v in load_dashboard()["templating"]["list"][1:]:
        selector = re.fullmatch(r"label_values\((.*), \w+\)", v["definition"])
        assert selector is not None
        assert series_in(selector.group(1)) == {"sse_sidecar_build_info"}
    # The other way round: every metric the sidecar exports is on the dashboard.
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families - shown == set(), "exported metrics no panel shows"


def test_series_in_finds_the_series_of_a_query() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(sse_sidecar_x_bucket{job=~"a(b)"}'
        "[$__rate_interval]))) / on (job) group_left job:sse_sidecar_y:ratio_rate5m"
        " or vector(0) and up offset 5m"
    )
    assert series_in(expr) == {"sse_sidecar_x_bucket", "job:sse_sidecar_y:ratio_rate5m", "up"}


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    exprs: dict[str, str] = {}
    for panel, expr in targets():
        exprs[f"panel {panel['id']} {panel['title']!r}: {expr}"] = substitute(expr)
    for v in load_dashboard()["templating"]["list"][1:]:
        # label_values(<selector>, <label>) is Grafana's; its selector must parse.
        selector = re.fullmatch(r"label_values\((.*), \w+\)", v["definition"])
        assert selector is not None
        exprs[f"variable {v['name']}"] = substitute(selector.group(1))
    errors = promql_errors(exprs, tmp_path)
    assert errors is None, errors


@pytest.mark.parametrize("expr", ["sum(rate(x[5m]))", 'sum(rate(x{job=~"$job"}[5m])'])
def test_promql_errors_reports_a_bad_expression(tmp_path: Path, expr: str) -> None:
    good = promql_errors({"ok": "sum(up)"}, tmp_path)
    bad = promql_errors({"ok": "sum(up)", "broken": expr + " +"}, tmp_path)
    assert good is None
    assert bad is not None
    assert "'broken'" in bad
