"""The README is checked against the code, so the docs cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from sidecar.config import ENV_PREFIX, Settings
from sidecar.telemetry import Metrics, SupervisorMetrics

README = (Path(__file__).parents[2] / "README.md").read_text()


def _table_rows(first_cell_prefix: str) -> list[list[str]]:
    rows = []
    for line in README.splitlines():
        if line.startswith(f"| `{first_cell_prefix}"):
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def test_every_setting_is_documented_with_its_flag_and_default() -> None:
    rows = {r[0]: r for r in _table_rows(ENV_PREFIX)}
    expected = {ENV_PREFIX + name.upper(): name for name in Settings.model_fields}
    assert set(rows) == set(expected)
    for env, name in expected.items():
        flag, default = rows[env][1], rows[env][2]
        assert flag == "--" + name.replace("_", "-")
        value = Settings.model_fields[name].default
        assert default == ("unset" if value is None else str(value)), env


def test_every_metric_is_documented_with_its_type_and_labels() -> None:
    rows = {r[0]: r for r in _table_rows("sse_sidecar_")}
    exported: dict[str, tuple[str, list[str]]] = {}
    for metric in [*vars(Metrics()).values(), *vars(SupervisorMetrics(2)).values()]:
        if not isinstance(metric, MetricWrapperBase):
            continue
        kind = str(metric._type)
        name = metric._name + ("_total" if kind == "counter" else "")
        labels = sorted(metric._labelnames)
        if kind == "info":  # exported as a gauge named <name>_info, labelled by its keys
            name, kind, labels = metric._name + "_info", "gauge", ["version"]
        exported[name] = (kind, labels)
    assert set(rows) == set(exported)
    for name, (kind, labels) in exported.items():
        assert rows[name][1] == kind, name
        assert sorted(re.findall(r"\w+", rows[name][2])) == labels, name


def test_quick_start_shows_the_two_commands() -> None:
    assert "make run" in README
    assert "make test" in README
