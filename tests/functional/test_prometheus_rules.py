"""The shipped Prometheus rules (dashboards/prometheus/): promtool accepts them and their unit tests
pass, every alert (each severity of it) has a positive and a negative promtool case, the labels and
annotations every alert needs, and a RUNBOOK.md section its runbook_url points at; ratios carry a
minimum-traffic guard, aggregations keep cluster/namespace/job (and nothing finer that could
split a job, such as ``dialect``), and long windows are built from recorded 5m rates.

The rule and test files are read with ``load_yaml``, a strict reader of the YAML subset they are
written in (block mappings and sequences, plain and quoted scalars, ``|`` blocks, empty ``[]`` and
``{}``); anything else is an error, never a silent misreading. Its reading of the rule files is
checked against promtool's rule count here and against what a real Prometheus loaded in
test_prometheus_e2e.py. The other Prometheus tests import these helpers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
DASHBOARDS = ROOT / "dashboards"
RULES_DIR = DASHBOARDS / "prometheus"
RULE_FILES = (RULES_DIR / "recording-rules.yaml", RULES_DIR / "alerts.yaml")
TEST_FILES = tuple(sorted((RULES_DIR / "tests").glob("*.test.yaml")))
RUNBOOK = DASHBOARDS / "RUNBOOK.md"
DASHBOARD = DASHBOARDS / "sse-sidecar-overview.json"

RUNBOOK_URL = "https://github.com/sse-sidecar/sse-sidecar/blob/main/dashboards/RUNBOOK.md#"
DASHBOARD_URL = "https://grafana.example.com/d/sse-sidecar-overview/sse-sidecar-overview"
SEVERITIES = ("critical", "warning")
ANNOTATIONS = ("summary", "description", "runbook_url", "dashboard_url")
# The SLO's error budget (99.5 % of runs end with the upstream's own [DONE]) and the windows of
# the multi-window, multi-burn-rate alerts, plus 30d, the SLO period.
ERROR_BUDGET = 0.005
BURN_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The multi-window, multi-burn-rate pairs: (long, short) -> (burn rate, severity, for).
BURN_RATE_PAIRS = {
    ("1h", "5m"): (14.4, "critical", "2m"),
    ("6h", "30m"): (6.0, "critical", "15m"),
    ("1d", "2h"): (3.0, "warning", "1h"),
    ("3d", "6h"): (1.0, "warning", "3h"),
}
# Fewest forced runs in the long window for a burn-rate alert (its minimum-traffic guard).
BURN_RATE_MIN_FORCED = 5


def binary(name: str) -> str:
    """The path of a Prometheus binary; skips the test when the Debian package is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: `make test` installs it (Debian package prometheus)")
    return path


# -- a strict reader for the YAML subset of the rule files -----------------------------------


class YamlSubsetError(ValueError):
    pass


_KEY = re.compile(r"([A-Za-z_][\w.-]*):(?:[ ]+(.*))?$")
_INT = re.compile(r"[-+]?[0-9]+$")
_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][-+]?[0-9]+)?$")
_PLAIN_FORBIDDEN_START = tuple("[]{},#&*!|>'\"%@`")


def _scalar(text: str, where: int) -> Any:
    text = text.strip()
    if text.startswith("'"):
        end = text.find("'", 1)
        while end != -1 and text[end + 1 : end + 2] == "'":
            end = text.find("'", end + 2)
        if end == -1:
            raise YamlSubsetError(f"line {where}: unterminated quoted scalar")
        rest = text[end + 1 :].strip()
        if rest and not rest.startswith("#"):
            raise YamlSubsetError(f"line {where}: text after a quoted scalar: {rest!r}")
        return text[1:end].replace("''", "'")
    if text.startswith('"'):
        decoder = json.JSONDecoder()
        try:
            value, end = decoder.raw_decode(text)
        except json.JSONDecodeError as exc:
            raise YamlSubsetError(f"line {where}: {exc}") from None
        rest = text[end:].strip()
        if rest and not rest.startswith("#"):
            raise YamlSubsetError(f"line {where}: text after a quoted scalar: {rest!r}")
        return value
    if " #" in text:
        text = text.split(" #", 1)[0].rstrip()
    if text in ("[]", "{}"):
        return [] if text == "[]" else {}
    if not text or text.startswith(_PLAIN_FORBIDDEN_START) or ": " in text or text.endswith(":"):
        raise YamlSubsetError(f"line {where}: not a plain scalar this reader accepts: {text!r}")
    if text in ("null", "~"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


class _Reader:
    def __init__(self, text: str) -> None:
        if "\t" in text:
            raise YamlSubsetError("tabs are not allowed")
        self.lines = text.splitlines()
        self.i = 0

    def peek(self) -> tuple[int, str] | None:
        """(indent, content) of the next line that is neither blank nor a comment."""
        while self.i < len(self.lines):
            line = self.lines[self.i]
            stripped = line.lstrip(" ")
            if stripped and not stripped.startswith("#"):
                return len(line) - len(stripped), stripped
            self.i += 1
        return None

    def document(self) -> Any:
        first = self.peek()
        if first is None:
            return None
        if first[0] != 0:
            raise YamlSubsetError(f"line {self.i + 1}: the document must start at column 0")
        value = self.node(0)
        if self.peek() is not None:
            raise YamlSubsetError(f"line {self.i + 1}: unexpected indentation")
        return value

    def node(self, indent: int) -> Any:
        nxt = self.peek()
        assert nxt is not None
        if nxt[1] == "-" or nxt[1].startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while (nxt := self.peek()) is not None and nxt[0] == indent:
            content = nxt[1]
            if not (content == "-" or content.startswith("- ")):
                raise YamlSubsetError(f"line {self.i + 1}: a mapping key inside a sequence")
            rest = content[2:]
            if not rest.strip():
                self.i += 1
                inner = self.peek()
                if inner is None or inner[0] <= indent:
                    items.append(None)
                else:
                    items.append(self.node(inner[0]))
            elif _KEY.match(rest):
                # "- key: value": a mapping whose keys are indented like "key".
                self.lines[self.i] = " " * (indent + 2) + rest
                items.append(self.mapping(indent + 2))
            else:
                self.i += 1
                items.append(_scalar(rest, self.i))
        if nxt is not None and nxt[0] > indent:
            raise YamlSubsetError(f"line {self.i + 1}: unexpected indentation")
        return items

    def mapping(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while (nxt := self.peek()) is not None and nxt[0] == indent:
            match = _KEY.match(nxt[1])
            if match is None:
                raise YamlSubsetError(f"line {self.i + 1}: expected `key: value`: {nxt[1]!r}")
            key, rest = match.group(1), (match.group(2) or "").strip()
            if key in out:
                raise YamlSubsetError(f"line {self.i + 1}: duplicate key {key!r}")
            self.i += 1
            if rest in ("|", "|-"):
                out[key] = self.block(indent, keep_newline=rest == "|")
            elif rest and not rest.startswith("#"):
                out[key] = _scalar(rest, self.i)
            else:
                inner = self.peek()
                if inner is not None and inner[0] > indent:
                    out[key] = self.node(inner[0])
                else:
                    out[key] = None
        if nxt is not None and nxt[0] > indent:
            raise YamlSubsetError(f"line {self.i + 1}: unexpected indentation")
        return out

    def block(self, indent: int, *, keep_newline: bool) -> str:
        """A literal block scalar: the lines indented deeper than its key."""
        lines: list[str] = []
        block_indent: int | None = None
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip():
                current = len(line) - len(line.lstrip(" "))
                if current <= indent:
                    break
                if block_indent is None:
                    block_indent = current
                elif current < block_indent:
                    raise YamlSubsetError(f"line {self.i + 1}: less indented than its block")
                lines.append(line[block_indent:])
            else:
                lines.append("")
            self.i += 1
        while lines and not lines[-1]:
            lines.pop()
        if not lines:
            raise YamlSubsetError(f"line {self.i}: empty block scalar")
        return "\n".join(lines) + ("\n" if keep_newline else "")


def load_yaml(text: str) -> Any:
    """Read ``text``, which must be in the YAML subset described in this module's docstring."""
    return _Reader(text).document()


# -- the rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    file: Path
    group: str
    name: str  # the alert's or the recorded series' name
    alert: bool
    expr: str
    for_: str | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


def load_rules(files: tuple[Path, ...] = RULE_FILES) -> list[Rule]:
    out: list[Rule] = []
    for path in files:
        doc = load_yaml(path.read_text())
        assert set(doc) == {"groups"}, path
        for group in doc["groups"]:
            for raw in group["rules"]:
                alert = "alert" in raw
                allowed = (
                    {"alert", "expr", "for", "labels", "annotations"}
                    if alert
                    else {
                        "record",
                        "expr",
                        "labels",
                    }
                )
                assert set(raw) <= allowed, f"{path}: unexpected keys in {raw}"
                out.append(
                    Rule(
                        file=path,
                        group=group["name"],
                        name=raw["alert"] if alert else raw["record"],
                        alert=alert,
                        expr=raw["expr"],
                        for_=raw.get("for"),
                        labels=raw.get("labels") or {},
                        annotations=raw.get("annotations") or {},
                    )
                )
    return out


def alerts() -> list[Rule]:
    return [r for r in load_rules() if r.alert]


def recording_rules() -> list[Rule]:
    return [r for r in load_rules() if not r.alert]


def promtool(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def promql_errors(exprs: Mapping[str, str], workdir: Path) -> str | None:
    """None if every expression parses as PromQL, else promtool's complaint.

    promtool has no "parse this expression" command: each expression becomes a recording rule
    (named after its key, in order) of a temporary rule file that ``promtool check rules`` reads.
    """
    rules = [{"record": f"parse_check_{i}", "expr": expr} for i, expr in enumerate(exprs.values())]
    path = workdir / "parse-check.rules.json"  # JSON is YAML, for promtool
    path.write_text(json.dumps({"groups": [{"name": "parse-check", "rules": rules}]}, indent=1))
    result = promtool("check", "rules", str(path))
    if result.returncode == 0:
        return None
    names = list(exprs)
    message = result.stdout + result.stderr
    return re.sub(r"parse_check_(\d+)", lambda m: repr(names[int(m.group(1))]), message)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown`` (lowercase, punctuation dropped,
    spaces to dashes, -1, -2, ... on repeats)."""
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not (m := re.match(r"#{1,6} (.+)$", line)):
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def runbook_sections() -> dict[str, str]:
    """RUNBOOK.md's level-2 sections: heading -> text."""
    sections: dict[str, str] = {}
    current: str | None = None
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def seconds(duration: str) -> float:
    return sum(float(n) * SECONDS[u] for n, u in re.findall(r"(\d+)([smhd])", duration))


def promtool_cases() -> Iterator[tuple[Path, str, str, set[str]]]:
    """(test file, test name, alert name, severities expected to fire) for every
    alert_rule_test case; an empty set is a case where the alert stays silent."""
    for path in TEST_FILES:
        doc = load_yaml(path.read_text())
        for test in doc["tests"]:
            for case in test.get("alert_rule_test") or []:
                fired = {a["exp_labels"]["severity"] for a in case.get("exp_alerts") or []}
                yield path, test.get("name", "?"), case["alertname"], fired


# -- promtool --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules_accepts_every_rule_file(path: Path) -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    # This module's YAML reader saw the same rules promtool did.
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found is not None, result.stdout
    assert int(found.group(1)) == len(load_rules((path,)))


@pytest.mark.timeout(300)
def test_promtool_test_rules_passes() -> None:
    assert TEST_FILES, "no promtool test files"
    # Days of rule evaluations: about 25 s alone on a small machine, more when it is busy.
    result = promtool(
        "test", "rules", *(p.name for p in TEST_FILES), cwd=RULES_DIR / "tests", timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES), result.stdout


def test_the_test_files_load_the_shipped_rule_files() -> None:
    for path in TEST_FILES:
        doc = load_yaml(path.read_text())
        loaded = {(path.parent / f).resolve() for f in doc["rule_files"]}
        assert loaded <= {p.resolve() for p in RULE_FILES}, path
        assert doc["tests"], path


# -- cross-checks ----------------------------------------------------------------------------


def test_every_alert_has_a_positive_and_a_negative_promtool_case() -> None:
    rules = {(a.name, a.labels["severity"]) for a in alerts()}
    names = {name for name, _ in rules}
    positive: set[tuple[str, str]] = set()
    negative: set[str] = set()
    for path, test, alertname, fired in promtool_cases():
        # promtool passes a negative case for an alert that does not exist: catch typos here.
        assert alertname in names, f"{path.name}: {test!r} tests unknown alert {alertname}"
        positive |= {(alertname, severity) for severity in fired}
        if not fired:
            negative.add(alertname)
    assert rules - positive == set(), "alerts (severities) without a case where they fire"
    assert names - negative == set(), "alerts without a case where they stay silent"


def test_recording_rule_names_are_unique_and_alert_rules_differ_in_labels() -> None:
    records = [r.name for r in recording_rules()]
    assert len(records) == len(set(records))
    assert not set(records) & {a.name for a in alerts()}
    # Several rules under one alert name (its severities, its window pairs) differ in labels and
    # live in one group, so that Alertmanager's standard inhibition can pair them.
    keyed = [(a.name, tuple(sorted(a.labels.items()))) for a in alerts()]
    assert len(keyed) == len(set(keyed))
    for name in {a.name for a in alerts()}:
        assert len({a.group for a in alerts() if a.name == name}) == 1, name


def test_alerts_with_two_severities_share_one_name() -> None:
    """A warning and a critical of the same condition are one alert name (the standard
    inhibition mutes the warning while the critical fires), never two names."""
    by_name: dict[str, set[str]] = {}
    for a in alerts():
        by_name.setdefault(a.name, set()).add(a.labels["severity"])
    assert {n for n, sev in by_name.items() if sev == set(SEVERITIES)} >= {
        "SSESidecarForcedTerminalBurnRate",
        "SSESidecarRedisUnreachable",
    }
    stems = [re.sub(r"(Critical|Warning|Page|Ticket)$", "", n) for n in by_name]
    assert len(stems) == len(set(stems)), "one condition split over alert names by severity"


def test_every_alert_has_severity_for_and_annotations() -> None:
    assert len(alerts()) >= 11
    for a in alerts():
        assert re.fullmatch(r"SSESidecar[A-Z][A-Za-z]+", a.name), a.name
        assert a.labels.get("severity") in SEVERITIES, a.name
        assert a.for_ is not None, a.name
        assert re.fullmatch(r"\d+[smh]", a.for_), a.name
        assert set(ANNOTATIONS) <= set(a.annotations), a.name
        for key in ANNOTATIONS:
            assert a.annotations[key].strip(), (a.name, key)
        assert a.annotations["runbook_url"] == RUNBOOK_URL + a.name.lower(), a.name


def test_every_alert_opens_the_dashboard_on_an_existing_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = {p["id"] for p in dashboard["panels"]}
    for a in alerts():
        url = a.annotations["dashboard_url"]
        assert url == DASHBOARD_URL or url.startswith(DASHBOARD_URL + "?"), a.name
        if "viewPanel=" in url:
            panel = int(url.split("viewPanel=")[1].split("&")[0])
            assert panel in ids, (a.name, panel)
        # Only variables the dashboard has, filled from labels the alert carries.
        for var in re.findall(r"var-(\w+)=", url):
            assert var in {v["name"] for v in dashboard["templating"]["list"]}, (a.name, var)


def test_every_alert_has_its_runbook_section() -> None:
    sections = runbook_sections()
    anchors = github_anchors(RUNBOOK.read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"] if p["type"] != "row"}
    for a in alerts():
        assert a.annotations["runbook_url"].split("#")[1] in anchors, a.name
        text = sections[a.name]
        for part in ("### Meaning", "### Impact", "### Diagnosis", "### Mitigation"):
            assert part in text, (a.name, part)
        assert "```promql" in text, f"{a.name}: no PromQL to diagnose with"
        diagnosis = text.split("### Diagnosis")[1].split("### Mitigation")[0]
        named = {" ".join(b.split()) for b in re.findall(r"\*\*(.+?)\*\*", diagnosis, re.S)}
        assert named & titles, f"{a.name}: the diagnosis names no dashboard panel"
        assert named - titles <= set(), f"{a.name}: no such panels: {named - titles}"
    assert set(sections) == {a.name for a in alerts()}, "a runbook section without its alert"


def test_the_producer_lost_runbook_says_who_counts_it() -> None:
    """Orphaned runs are counted by a periodic sweep on any replica, not only when read: the
    alert sums the deployment, and the runbook says when the count comes and from where."""
    text = " ".join(runbook_sections()["SSESidecarProducerLost"].split())
    for needed in ("periodic sweep", "whichever replica sweeps first", "one lease (30 s)"):
        assert needed in text, needed
    (rule,) = [a for a in alerts() if a.name == "SSESidecarProducerLost"]
    assert "sum by (cluster, namespace, job)" in rule.expr


def test_runbook_promql_parses(tmp_path: Path) -> None:
    blocks = re.findall(r"```promql\n(.*?)```", RUNBOOK.read_text(), re.S)
    assert blocks
    errors = promql_errors({f"RUNBOOK.md block {i}": b for i, b in enumerate(blocks)}, tmp_path)
    assert errors is None, errors


def _raw_ranges(expr: str) -> list[str]:
    """The ranges of every range selector on a raw (not recorded) series in ``expr``."""
    return re.findall(r"\bsse_sidecar_\w+(?:\{[^}]*\})?\[(\w+)\]", expr)


def test_long_windows_are_built_from_recorded_5m_rates() -> None:
    """Only the 5m rates read the raw counters; every longer window averages them, so no
    evaluation reads 30 days of every raw series."""
    records = {r.name: " ".join(r.expr.split()) for r in recording_rules()}
    for name in records:
        assert re.fullmatch(r"job:sse_sidecar_[a-z_]+:[a-z0-9_]+", name), name
    assert records["job:sse_sidecar_runs_forced:rate5m"] == (
        "sum by (cluster, namespace, job) "
        '(rate(sse_sidecar_forced_done_total{reason!="cancelled"}[5m]))'
    )
    assert records["job:sse_sidecar_runs_finished:rate5m"] == (
        "sum by (cluster, namespace, job) (rate(sse_sidecar_runs_finished_total[5m]))"
    )
    for window in BURN_WINDOWS:
        for series in ("runs_forced", "runs_finished"):
            if window != "5m":
                assert records[f"job:sse_sidecar_{series}:rate{window}"] == (
                    f"avg_over_time(job:sse_sidecar_{series}:rate5m[{window}])"
                )
        assert records[f"job:sse_sidecar_forced_done:ratio_rate{window}"] == (
            f"job:sse_sidecar_runs_forced:rate{window} / job:sse_sidecar_runs_finished:rate{window}"
        )
    assert len(records) == 3 * len(BURN_WINDOWS)
    for rule in load_rules():
        for window in _raw_ranges(rule.expr):
            assert seconds(window) <= 3600, f"{rule.name} reads {window} of a raw series"
    # Every recorded series an alert uses exists, and the burn-rate alerts use every window
    # but the SLO period's.
    used = {m for a in alerts() for m in re.findall(r"\b[a-z_]+:[a-z_]+:\w+", a.expr)}
    assert used <= set(records)
    assert {f"job:sse_sidecar_forced_done:ratio_rate{w}" for w in BURN_WINDOWS[:-1]} <= used


def test_burn_rate_alerts_match_the_documented_slo() -> None:
    """One alert name, one rule per window pair: both windows over the same burn rate, the
    pair in the rule's labels, the severity and `for` of kubernetes-mixin's error-budget
    alerts, and at least 5 forced runs in the long window."""
    rules = [a for a in alerts() if a.name == "SSESidecarForcedTerminalBurnRate"]
    got = {}
    for rule in rules:
        expr = " ".join(rule.expr.split())
        found = re.findall(r"ratio_rate(\w+) > \(([\d.]+) \* ([\d.]+)\)", expr)
        assert len(found) == 2, expr
        (long, factor, budget), (short, factor2, budget2) = found
        assert factor == factor2, expr
        assert float(budget) == float(budget2) == ERROR_BUDGET, expr
        assert (rule.labels["long"], rule.labels["short"]) == (long, short), expr
        guard = f"job:sse_sidecar_runs_forced:rate{long} * {int(seconds(long))} >= "
        assert f"and {guard}{BURN_RATE_MIN_FORCED}" in expr, expr
        got[(long, short)] = (float(factor), rule.labels["severity"], rule.for_)
    assert got == BURN_RATE_PAIRS


def test_ratio_alerts_have_a_minimum_traffic_guard() -> None:
    """An alert on a ratio of rates also needs a minimum count (`and ... >= N`): at night one
    failure among a handful is a large ratio and no incident."""
    # A ratio of two gauges (a level, not a rate of events) needs no traffic.
    levels = {"SSESidecarWriterBacklogHigh"}
    for a in alerts():
        expr = " ".join(a.expr.split())
        is_ratio = " / " in expr or "histogram_quantile" in expr or ":ratio_rate" in expr
        if not is_ratio or a.name in levels:
            continue
        assert re.search(r"\band\b.*>= \d+$", expr), f"{a.name}: no minimum-traffic guard"


def test_aggregations_keep_cluster_namespace_and_job() -> None:
    """Every `by` clause keeps the deployment apart (cluster, namespace, job), so a label such as
    `dialect` is summed away, never splits a job's ratio, and never goes missing in a join."""
    for rule in load_rules():
        for labels in re.findall(r"\bby \(([^)]*)\)", rule.expr):
            kept = [label.strip() for label in labels.split(",")]
            assert kept[:3] == ["cluster", "namespace", "job"], (rule.name, kept)
            assert "dialect" not in kept, rule.name


def test_the_readme_inhibition_rules_name_real_alerts() -> None:
    """README's Alertmanager example: the standard severity inhibition (what lets one alert name
    carry a warning and a critical), and the outage inhibitions, all about alerts that exist."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(# alertmanager\.yml\n.*?)```", readme, re.S)
    rules = yaml.safe_load(block)["inhibit_rules"]
    assert rules[0] == {
        "source_matchers": ['severity="critical"'],
        "target_matchers": ['severity="warning"'],
        "equal": ["namespace", "alertname"],
    }
    names = {a.name for a in alerts()}
    for rule in rules:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            if matcher.startswith("alertname"):
                named = set(re.findall(r"SSESidecar\w+", matcher))
                assert named, matcher
                assert named <= names, matcher
        # What the rules share: labels the alerts on both sides carry.
        assert set(rule.get("equal", [])) <= {"namespace", "job", "alertname"}


# -- the reader itself -----------------------------------------------------------------------


@pytest.mark.parametrize("path", [*RULE_FILES, *TEST_FILES], ids=lambda p: p.name)
def test_the_reader_agrees_with_pyyaml(path: Path) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: cross-check skipped")
    assert load_yaml(path.read_text()) == yaml.safe_load(path.read_text())


def test_the_reader_reads_its_subset_and_refuses_the_rest() -> None:
    text = (
        "a:\n"
        "  - name: 'it''s'  # comment\n"
        '    b: "x\\"y"\n'
        "    c: |\n"
        "      line 1\n"
        "\n"
        "        indented\n"
        "    d: [ ]\n"
        "  - 1.5\n"
        "e: {}\n"
        "f: 1m\n"
    )
    assert load_yaml(text.replace("[ ]", "[]")) == {
        "a": [{"name": "it's", "b": 'x"y', "c": "line 1\n\n  indented\n", "d": []}, 1.5],
        "e": {},
        "f": "1m",
    }
    for bad in (
        text,  # a flow sequence with content
        "a: b: c\n",
        "a: 1\na: 2\n",
        "a:\n  b: 1\n c: 2\n",
        "a: &anchor 1\n",
        "a: 'open\n",
        "\ta: 1\n",
    ):
        with pytest.raises(YamlSubsetError):
            load_yaml(bad)
