#!/usr/bin/env python3
"""Generate the Grafana dashboard dashboards/sse-sidecar-overview.json (grafana-foundation-sdk).

The dashboard is code, as kubernetes-mixin's are: this file is its source, the JSON its output.
Never edit the JSON; change this file and run ``make dashboards`` (this script, then
scripts/sync_deploy_monitoring.py for the Kubernetes copy). tests/unit/test_dashboard.py fails
while the committed JSON differs from what this script writes, and lints the result.

    .venv/bin/python dashboards/generate_dashboard.py            # write the JSON
    .venv/bin/python dashboards/generate_dashboard.py --check    # exit 1 when it is stale

Every query filters on the ``cluster``, ``namespace``, ``job`` and ``pod`` variables (a label a
setup does not have, such as ``cluster`` in a single Prometheus, matches the variable's All) and
aggregates to what its panel shows, so a label the sidecar adds (``dialect`` on the run counters)
is summed away unless the panel breaks it down. Per-process series are legended by pod name.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).resolve().parent / "sse-sidecar-overview.json"
UID = "sse-sidecar-overview"
TITLE = "sse-sidecar / Overview"
RUNBOOK = "https://github.com/sse-sidecar/sse-sidecar/blob/main/dashboards/RUNBOOK.md"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The SLO: 99.5 % of runs end with the upstream's own terminal; the error budget is the rest.
BUDGET = 0.005
FILTERS = ("cluster", "namespace", "job", "pod")
# Recorded series are per (cluster, namespace, job): the pod filter cannot apply.
JOB_FILTERS = FILTERS[:3]
RATE = "$__rate_interval"
RANGE = "$__range"


# -- PromQL -------------------------------------------------------------------------------------


def sel(metric: str, *matchers: str, recorded: bool = False) -> str:
    """``metric`` with the dashboard's filters (and ``matchers``) applied."""
    filters = [f'{name}=~"${name}"' for name in (JOB_FILTERS if recorded else FILTERS)]
    return f"{metric}{{{', '.join([*filters, *matchers])}}}"


def rate(metric: str, *matchers: str, window: str = RATE) -> str:
    return f"rate({sel(metric, *matchers)}[{window}])"


def increase(metric: str, *matchers: str, window: str = RANGE) -> str:
    return f"increase({sel(metric, *matchers)}[{window}])"


def total(expr: str, by: str = "") -> str:
    return f"sum by ({by}) ({expr})" if by else f"sum({expr})"


def share(part: str, whole: str) -> str:
    """part / whole; 0 (not "No data") when the whole is 0 or the part has no series: nothing
    happened, or nothing of that kind."""
    return f"({part})\n/\n({whole} > 0)\nor vector(0)"


def share_by(part: str, whole: str) -> str:
    """Each series of ``part`` (grouped by a label) over the single series ``whole``."""
    return f"{part}\n/ on () group_left ()\n({whole} > 0)"


def quantile(q: float, metric: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(metric + '_bucket')}))"


def quantile_or_zero(q: float, metric: str) -> str:
    """A quantile that is 0, not NaN ("No data"), while nothing was observed."""
    return f"{quantile(q, metric)} >= 0\nor vector(0)"


FORCED = "sse_sidecar_forced_done_total"
FINISHED = "sse_sidecar_runs_finished_total"
NOT_CANCELLED = 'reason!="cancelled"'


# -- panels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str
    exemplar: bool = False


def _query(q: Q, ref: str, *, instant: bool) -> prometheus.Dataquery:
    query = (
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .editor_mode(pm.QueryEditorMode.CODE)
        .expr(q.expr)
        .legend_format(q.legend)
        .ref_id(ref)
    )
    query = query.instant() if instant else query.range()
    return query.exemplar(True) if q.exemplar else query


def _thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


@dataclass(frozen=True)
class Panel:
    """One panel: what it shows, where (width and height on the 24-column grid)."""

    id: int
    title: str
    description: str
    unit: str
    queries: Sequence[Q]
    w: int
    h: int
    kind: str = "timeseries"  # or "stat"
    stacked: bool = False
    # Timeseries: red lines at these values (an alert's threshold); stat: colour steps.
    marks: Sequence[tuple[float | None, str]] = ((None, "green"),)
    decimals: int | None = None
    minimum: float | None = 0

    def build(self) -> timeseries.Panel | stat.Panel:
        if self.kind == "stat":
            return self._stat()
        return self._timeseries()

    def _common(self, panel: Any) -> Any:
        panel = (
            panel.id(self.id)
            .title(self.title)
            .description(self.description)
            .datasource(DATASOURCE)
            .unit(self.unit)
            .span(self.w)
            .height(self.h)
            .thresholds(_thresholds(*self.marks))
        )
        if self.decimals is not None:
            panel = panel.decimals(self.decimals)
        refs = "ABCDEFGHIJ"
        for i, q in enumerate(self.queries):
            panel = panel.with_target(_query(q, refs[i], instant=self.kind == "stat"))
        return panel

    def _timeseries(self) -> timeseries.Panel:
        panel: timeseries.Panel = self._common(timeseries.Panel())
        panel = (
            panel.draw_style(cm.GraphDrawStyle.LINE)
            .line_width(1)
            .fill_opacity(10)
            .show_points(cm.VisibilityMode.NEVER)
            .span_nulls(False)
            .legend(
                cb.VizLegendOptions()
                .display_mode(cm.LegendDisplayMode.LIST)
                .placement(cm.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(
                cb.VizTooltipOptions()
                .mode(cm.TooltipDisplayMode.MULTI)
                .sort(cm.SortOrder.DESCENDING)
            )
            .stacking(
                cb.StackingConfig().mode(
                    cm.StackingMode.NORMAL if self.stacked else cm.StackingMode.NONE
                )
            )
        )
        if len(self.marks) > 1:
            panel = panel.thresholds_style(
                cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.LINE)
            )
        if self.minimum is not None:
            panel = panel.min(self.minimum)
        return panel

    def _stat(self) -> stat.Panel:
        panel: stat.Panel = self._common(stat.Panel())
        return (
            panel.color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
            .color_mode(cm.BigValueColorMode.BACKGROUND)
            .graph_mode(cm.BigValueGraphMode.NONE)
            .text_mode(cm.BigValueTextMode.AUTO)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )


@dataclass(frozen=True)
class Row:
    id: int
    title: str
    panels: Sequence[Panel]


def ratio_over_time(by: str) -> str:
    return share_by(total(rate(FORCED, NOT_CANCELLED), by), total(rate(FINISHED)))


ROWS: Sequence[Row] = (
    Row(
        100,
        "Forced terminals: how runs end (the headline)",
        (
            Panel(
                1,
                "Forced [DONE] ratio",
                "Share of the runs finished in the selected time range that the sidecar had to "
                "end itself because the upstream's own terminal ([DONE], message_stop, "
                "response.completed, ...) never came: every forced reason except `cancelled`, a "
                "user's request. The SLO is 99.5 % natural ends: green below 0.5 %, yellow above, "
                "red above 1.5 % (3x the budget rate). 0 when no run finished.",
                "percentunit",
                [
                    Q(
                        share(
                            total(increase(FORCED, NOT_CANCELLED)),
                            total(increase(FINISHED)),
                        ),
                        "forced",
                    )
                ],
                w=6,
                h=8,
                kind="stat",
                marks=((None, "green"), (BUDGET, "yellow"), (3 * BUDGET, "red")),
                decimals=2,
            ),
            Panel(
                2,
                "Forced [DONE] ratio by reason",
                "Forced terminals per finished run over time, by reason, stacked (their sum is "
                "the headline ratio): missing_done, missing_done_after_error (the upstream forgot "
                "its terminal); stream_incomplete, upstream_error, upstream_timeout (the upstream "
                "broke); sidecar_shutdown, producer_lost (the sidecar went away). The red line is "
                "the SLO's 0.5 %.",
                "percentunit",
                [Q(ratio_over_time("reason"), "{{reason}}")],
                w=9,
                h=8,
                stacked=True,
                marks=((None, "green"), (BUDGET, "red")),
            ),
            Panel(
                3,
                "Forced [DONE] ratio by dialect",
                "The headline ratio over time per stream protocol (`dialect`: letta, "
                "openai-chat, openai-responses, anthropic, generic): forced terminals "
                "(`cancelled` excluded) per finished run of that dialect. One line per dialect "
                "that finished runs; the red line is the SLO's 0.5 %.",
                "percentunit",
                [
                    Q(
                        f"{total(rate(FORCED, NOT_CANCELLED), 'dialect')}\n/\n"
                        f"({total(rate(FINISHED), 'dialect')} > 0)",
                        "{{dialect}}",
                    )
                ],
                w=9,
                h=8,
                marks=((None, "green"), (BUDGET, "red")),
            ),
            Panel(
                4,
                "Runs finished",
                "Runs that reached their terminal (natural or forced) in the selected time range.",
                "short",
                [Q(total(increase(FINISHED)), "runs")],
                w=4,
                h=6,
                kind="stat",
                marks=((None, "blue"),),
                decimals=0,
            ),
            Panel(
                5,
                "Forced terminals",
                "Runs the sidecar ended itself in the selected time range, `cancelled` excluded "
                "(see 'Forced terminals by reason').",
                "short",
                [Q(total(increase(FORCED, NOT_CANCELLED)), "forced")],
                w=4,
                h=6,
                kind="stat",
                marks=((None, "green"), (1, "yellow")),
                decimals=0,
            ),
            Panel(
                6,
                "Forced terminals by reason",
                "Runs per second the sidecar ended itself, by reason (README, 'How a run ends'), "
                "`cancelled` (a user asked) included. producer_lost is counted by whichever "
                "replica ended the orphaned run (SSESidecarProducerLost).",
                "ops",
                [Q(total(rate(FORCED), "reason"), "{{reason}}")],
                w=16,
                h=6,
                stacked=True,
            ),
        ),
    ),
    Row(
        110,
        "Golden signals: up, traffic, errors",
        (
            Panel(
                10,
                "Sidecars up",
                "Sidecar targets that Prometheus reached at its last scrape (sum of `up`); red "
                "when none is. No data means no target at all. SSESidecarTargetAbsent, "
                "SSESidecarJobDown and SSESidecarTargetDown alert on this.",
                "short",
                [Q(total(sel("up")), "up")],
                w=4,
                h=6,
                kind="stat",
                marks=((None, "red"), (1, "green")),
                decimals=0,
            ),
            Panel(
                11,
                "Replicas reaching Redis",
                "Sidecars whose last Redis command succeeded: the probe sends one every "
                "redis_probe_seconds, idle or busy (`sse_sidecar_redis_up`). "
                "Fewer than 'Sidecars up': those pods are unready. SSESidecarRedisUnreachable "
                "alerts on this.",
                "short",
                [Q(total(sel("sse_sidecar_redis_up")), "reaching Redis")],
                w=4,
                h=6,
                kind="stat",
                marks=((None, "red"), (1, "green")),
                decimals=0,
            ),
            Panel(
                12,
                "Versions running",
                "Sidecar processes per version (`sse_sidecar_build_info`): more than one line "
                "during a rollout.",
                "short",
                [Q(total(sel("sse_sidecar_build_info"), "version"), "{{version}}")],
                w=4,
                h=6,
                kind="stat",
                marks=((None, "blue"),),
                decimals=0,
            ),
            Panel(
                13,
                "Requests by route",
                "Requests per second on the traffic port, by route (`proxy` is everything "
                "forwarded to the upstream; the others are the sidecar's own API).",
                "reqps",
                [Q(total(rate("sse_sidecar_http_requests_total"), "route"), "{{route}}")],
                w=12,
                h=6,
            ),
            Panel(
                14,
                "Request errors",
                "Share of traffic-port requests answered with 5xx (the sidecar's or the "
                "upstream's) and 4xx. 0 when there were no requests.",
                "percentunit",
                [
                    Q(
                        share(
                            total(rate("sse_sidecar_http_requests_total", f'code=~"{c}.."')),
                            total(rate("sse_sidecar_http_requests_total")),
                        ),
                        f"{c}xx",
                    )
                    for c in "54"
                ],
                w=6,
                h=8,
            ),
            Panel(
                15,
                "Request duration p99 by route",
                "99th percentile of request duration, to the last byte. For `proxy` this "
                "includes whole streams, so it follows run duration; for the API routes it is "
                "the API's latency. Exemplars link to the traces.",
                "s",
                [
                    Q(
                        quantile(0.99, "sse_sidecar_http_request_duration_seconds", "route"),
                        "{{route}}",
                        exemplar=True,
                    )
                ],
                w=6,
                h=8,
            ),
            Panel(
                16,
                "Active runs",
                "Runs being teed right now, per pod.",
                "short",
                [Q(total(sel("sse_sidecar_runs_active"), "pod"), "{{pod}}")],
                w=6,
                h=8,
                stacked=True,
            ),
            Panel(
                17,
                "Runs started and finished",
                "Runs per second: started (the upstream answered with an event stream) and "
                "finished (the run reached its terminal, natural or forced).",
                "ops",
                [
                    Q(total(rate("sse_sidecar_runs_started_total")), "started"),
                    Q(total(rate(FINISHED)), "finished"),
                ],
                w=6,
                h=8,
            ),
            Panel(
                18,
                "Teed events",
                "Events per second teed to Redis (upstream and synthesized).",
                "ops",
                [Q(total(rate("sse_sidecar_stream_events_total")), "events")],
                w=12,
                h=6,
            ),
            Panel(
                19,
                "Teed bytes",
                "Bytes per second of events teed, as sent to the client.",
                "Bps",
                [Q(total(rate("sse_sidecar_stream_bytes_total")), "bytes")],
                w=12,
                h=6,
            ),
        ),
    ),
    Row(
        120,
        "Terminal outcomes: statuses, stop reasons, signals",
        (
            Panel(
                20,
                "Runs finished by status",
                "Runs per second by final status: completed, failed, cancelled. A rising failed "
                "share is an upstream problem (SSESidecarFailedRunRatioHigh).",
                "ops",
                [Q(total(rate(FINISHED), "status"), "{{status}}")],
                w=8,
                h=8,
                stacked=True,
            ),
            Panel(
                21,
                "Runs finished by stop reason",
                "Runs per second by the upstream's stop reason (`none`: the upstream sent none; "
                "`other`: an unknown one).",
                "ops",
                [Q(total(rate(FINISHED), "stop_reason"), "{{stop_reason}}")],
                w=8,
                h=8,
                stacked=True,
            ),
            Panel(
                22,
                "Terminal signals seen",
                "Terminal signals in upstream streams per second: saw_stop_reason, saw_error, "
                "saw_done, and saw_done_after_error (an error followed by the upstream's own "
                "terminal: a natural end, not forced).",
                "ops",
                [
                    Q(
                        total(rate("sse_sidecar_stream_transitions_total"), "transition"),
                        "{{transition}}",
                    )
                ],
                w=8,
                h=8,
            ),
            Panel(
                23,
                "Client disconnects",
                "Clients per second that left while their run was streaming. The tee goes on "
                "storing the run (unless on_client_disconnect=cancel), so they can replay it.",
                "ops",
                [Q(total(rate("sse_sidecar_client_disconnects_total")), "disconnects")],
                w=24,
                h=6,
            ),
        ),
    ),
    Row(
        130,
        "Writer: group commit to Redis",
        (
            Panel(
                30,
                "Flushes by outcome",
                "Writer round trips to Redis per second, ok or error. Errors are retried with "
                "backoff (SSESidecarFlushErrors).",
                "ops",
                [Q(total(rate("sse_sidecar_flushes_total"), "outcome"), "{{outcome}}")],
                w=6,
                h=8,
            ),
            Panel(
                31,
                "Flush latency p50 / p99",
                "Duration of one writer round trip. Sub-millisecond on a healthy Redis; the red "
                "line is the SSESidecarFlushLatencyHigh threshold (100 ms at p99). Exemplars "
                "link to the sse.flush spans.",
                "s",
                [
                    Q(quantile(0.5, "sse_sidecar_flush_duration_seconds"), "p50", exemplar=True),
                    Q(quantile(0.99, "sse_sidecar_flush_duration_seconds"), "p99", exemplar=True),
                ],
                w=6,
                h=8,
                marks=((None, "green"), (0.1, "red")),
            ),
            Panel(
                32,
                "Flush batch size",
                "Events carried by one round trip: 1 at low load, growing with load (capped by "
                "flush_max_events).",
                "short",
                [
                    Q(quantile(0.5, "sse_sidecar_flush_batch_events"), "p50"),
                    Q(quantile(0.99, "sse_sidecar_flush_batch_events"), "p99"),
                    Q(
                        f"{total(rate('sse_sidecar_flush_batch_events_sum'))}\n/\n"
                        f"{total(rate('sse_sidecar_flush_batch_events_count'))}",
                        "mean",
                    ),
                ],
                w=6,
                h=8,
            ),
            Panel(
                33,
                "Redis errors by operation",
                "Failed Redis operations per second: flush, append (writer), follow (live tail), "
                "replay, api, sweep (orphan sweep), probe, cancel (subscription), alias.",
                "ops",
                [
                    Q(
                        total(rate("sse_sidecar_redis_errors_total"), "operation"),
                        "{{operation}}",
                    )
                ],
                w=6,
                h=8,
            ),
            Panel(
                34,
                "Pending events",
                "Events accepted but not yet written, per pod. Near 0 on a healthy Redis; grows "
                "while Redis is slow or down.",
                "short",
                [Q(total(sel("sse_sidecar_writer_pending_events"), "pod"), "{{pod}}")],
                w=6,
                h=8,
            ),
            Panel(
                35,
                "Writer backlog (share of writer_max_bytes)",
                "Bytes accepted but not yet written, per pod, as a share of that pod's "
                "configured writer_max_bytes (`sse_sidecar_writer_max_bytes`). Above 80 % (the "
                "red line) /readyz fails and SSESidecarWriterBacklogHigh fires; at 100 % events "
                "are dropped.",
                "percentunit",
                [
                    Q(
                        f"{total(sel('sse_sidecar_writer_pending_bytes'), 'pod')}\n/\n"
                        f"{total(sel('sse_sidecar_writer_max_bytes'), 'pod')}",
                        "{{pod}}",
                    )
                ],
                w=6,
                h=8,
                marks=((None, "green"), (0.8, "red")),
            ),
            Panel(
                36,
                "Dropped events by reason",
                "Events per second that will never be stored, or that Redis lost (data loss): "
                "overflow (writer_max_bytes), conflict, fenced, gap, redis_rejected, shutdown, "
                "history_lost (Redis restarted empty or was flushed). SSESidecarEventsDropped "
                "fires above 0.1 % of the teed events.",
                "ops",
                [
                    Q(
                        total(rate("sse_sidecar_writer_dropped_events_total"), "reason"),
                        "{{reason}}",
                    )
                ],
                w=6,
                h=8,
                stacked=True,
            ),
            Panel(
                37,
                "Trimmed events",
                "Stored events per second removed by the max_stream_events length cap (a safety "
                "net: readers behind the trim get 410).",
                "ops",
                [Q(total(rate("sse_sidecar_stream_trimmed_events_total")), "trimmed")],
                w=6,
                h=8,
            ),
            Panel(
                38,
                "Redis lost its data",
                "Times a sidecar found that Redis had lost its data (restarted without "
                "persistence, flushed, failed over to an empty replica), in the range: running "
                "runs were written again from there on (history_lost), readers of vanished runs "
                "were told. SSESidecarRedisDataLost fires on it.",
                "short",
                [Q(total(increase("sse_sidecar_redis_data_lost_total"), "pod"), "{{pod}}")],
                w=12,
                h=8,
                kind="stat",
                marks=((None, "green"), (1, "red")),
                decimals=0,
            ),
            Panel(
                39,
                "Background task crashes",
                "Crashes of the sidecar's supervised background tasks (writer, leases, orphan "
                "sweep, cancel listener, follower, Redis probe), by task, in the range: each is "
                "logged with its traceback and the task restarted.",
                "short",
                [
                    Q(
                        total(increase("sse_sidecar_background_crashes_total"), "task"),
                        "{{task}}",
                    )
                ],
                w=12,
                h=8,
                kind="stat",
                marks=((None, "green"), (1, "orange")),
                decimals=0,
            ),
            Panel(
                310,
                "Upstream reads held (pacing)",
                "Share of the time the pod's tees held their upstream reads because its writer "
                "was behind while the process was out of CPU (writer_pace_bytes): events are "
                "stored at the rate they are relayed instead of being dropped past "
                "writer_max_bytes. Near 1 for long: the pod relays more than it can store; add "
                "workers or CPU.",
                "percentunit",
                [Q(total(rate("sse_sidecar_upstream_paced_seconds_total"), "pod"), "{{pod}}")],
                w=24,
                h=8,
            ),
        ),
    ),
    Row(
        140,
        "Replay: readers of stored runs",
        (
            Panel(
                40,
                "Active replay readers",
                "Replay readers connected, per pod.",
                "short",
                [Q(total(sel("sse_sidecar_replay_active"), "pod"), "{{pod}}")],
                w=6,
                h=8,
                stacked=True,
            ),
            Panel(
                41,
                "Replay requests by outcome",
                "Replay requests per second: ok, no_content (204), bad_request, unauthorized, "
                "forbidden, not_found, gone (410), unavailable (503), slow_reader (a stream cut "
                "because its reader fell behind).",
                "reqps",
                [
                    Q(
                        total(rate("sse_sidecar_replay_requests_total"), "outcome"),
                        "{{outcome}}",
                    )
                ],
                w=6,
                h=8,
            ),
            Panel(
                42,
                "Replay events sent",
                "Events per second sent to replay readers (history and live).",
                "ops",
                [Q(total(rate("sse_sidecar_replay_events_total")), "events")],
                w=6,
                h=8,
            ),
            Panel(
                43,
                "410 Gone ratio",
                "Share of replay requests refused with 410: the cursor is older than the first "
                "retained event (stream_ttl_seconds or max_stream_events too small for how late "
                "clients come back). SSESidecarReplayGone fires above 1 % (red line). 0 when "
                "nobody replays.",
                "percentunit",
                [
                    Q(
                        share(
                            total(rate("sse_sidecar_replay_requests_total", 'outcome="gone"')),
                            total(rate("sse_sidecar_replay_requests_total")),
                        ),
                        "gone",
                    )
                ],
                w=6,
                h=8,
                marks=((None, "green"), (0.01, "red")),
            ),
            Panel(
                44,
                "Live delivery lag p50 / p99",
                "Time from an event reaching the sidecar to its delivery to a live replay "
                "reader. The live-tail SLO is 10 ms (red line). 0 when nobody reads live. "
                "Exemplars link to the sse.replay spans.",
                "s",
                [
                    Q(
                        quantile_or_zero(0.5, "sse_sidecar_replay_delivery_lag_seconds"),
                        "p50",
                        exemplar=True,
                    ),
                    Q(
                        quantile_or_zero(0.99, "sse_sidecar_replay_delivery_lag_seconds"),
                        "p99",
                        exemplar=True,
                    ),
                ],
                w=12,
                h=8,
                marks=((None, "green"), (0.01, "red")),
            ),
            Panel(
                45,
                "Live deliveries within and over 10 ms",
                "Live deliveries per second within the 10 ms live-tail SLO (the 10 ms bucket of "
                "replay_delivery_lag_seconds) and over it. Both 0 when nobody reads live.",
                "ops",
                [
                    Q(
                        total(rate("sse_sidecar_replay_delivery_lag_seconds_bucket", 'le="0.01"')),
                        "within 10 ms",
                    ),
                    Q(
                        f"{total(rate('sse_sidecar_replay_delivery_lag_seconds_count'))}\n-\n"
                        + total(
                            rate("sse_sidecar_replay_delivery_lag_seconds_bucket", 'le="0.01"')
                        ),
                        "over 10 ms",
                    ),
                ],
                w=12,
                h=8,
                stacked=True,
            ),
        ),
    ),
    Row(
        150,
        "Upstream: the LLM service",
        (
            Panel(
                50,
                "Time to first event p50 / p99",
                "From sending the request upstream to the first event of its stream: the LLM's "
                "time to first token, as the sidecar sees it. Exemplars link to the traces.",
                "s",
                [
                    Q(quantile(0.5, "sse_sidecar_upstream_first_event_seconds"), "p50", True),
                    Q(quantile(0.99, "sse_sidecar_upstream_first_event_seconds"), "p99", True),
                ],
                w=12,
                h=8,
            ),
            Panel(
                51,
                "Run duration p50 / p99 by status",
                "Duration of runs, request to terminal, by final status. Exemplars link to the "
                "sse.run spans.",
                "s",
                [
                    Q(
                        quantile(0.5, "sse_sidecar_run_duration_seconds", "status"),
                        "p50 {{status}}",
                        exemplar=True,
                    ),
                    Q(
                        quantile(0.99, "sse_sidecar_run_duration_seconds", "status"),
                        "p99 {{status}}",
                        exemplar=True,
                    ),
                ],
                w=12,
                h=8,
            ),
            Panel(
                52,
                "Upstream errors by kind",
                "Proxied requests per second that got no response from the upstream, which the "
                "sidecar answered 502 or 504 itself: connect (refused, unresolvable), timeout "
                "(no response headers in time), disconnected (the connection broke first). "
                "SSESidecarUpstreamUnreachable alerts on these.",
                "reqps",
                [Q(total(rate("sse_sidecar_upstream_errors_total"), "kind"), "{{kind}}")],
                w=12,
                h=8,
                stacked=True,
            ),
            Panel(
                53,
                "Proxied requests answered 5xx",
                "Share of the requests proxied to the upstream that were answered 5xx: the "
                "upstream's own errors and the sidecar's 502/504. SSESidecarProxyServerErrors "
                "fires above 10 % (red line).",
                "percentunit",
                [
                    Q(
                        share(
                            total(
                                rate(
                                    "sse_sidecar_http_requests_total",
                                    'route="proxy"',
                                    'code=~"5.."',
                                )
                            ),
                            total(rate("sse_sidecar_http_requests_total", 'route="proxy"')),
                        ),
                        "5xx",
                    )
                ],
                w=12,
                h=8,
                marks=((None, "green"), (0.1, "red")),
            ),
            Panel(
                54,
                "Upstream streams refused or cut",
                "Upstream event streams per second the sidecar refused or ended early for "
                "breaking a bound: unsupported_encoding (a content coding the tee cannot decode: "
                "502), corrupt_encoding, decompressed_bytes (max_decompressed_bytes), "
                "event_bytes (max_event_bytes). The cut runs end with the upstream_error "
                "terminal.",
                "ops",
                [Q(total(rate("sse_sidecar_upstream_rejected_total"), "reason"), "{{reason}}")],
                w=12,
                h=8,
                stacked=True,
            ),
            Panel(
                55,
                "Live clients cut",
                "Live clients per second the sidecar disconnected for not reading: buffer "
                "(live_buffer_bytes of unsent events) or write_timeout "
                "(live_write_timeout_seconds). Their runs go on being stored; the clients resume "
                "with Last-Event-ID.",
                "ops",
                [Q(total(rate("sse_sidecar_live_clients_cut_total"), "reason"), "{{reason}}")],
                w=12,
                h=8,
                stacked=True,
            ),
            Panel(
                56,
                "Bad requests",
                "Requests per second refused before a route saw them, or cut while their body "
                "came: malformed (400), header_timeout (request_header_timeout_seconds: 408), "
                "body_timeout (request_body_idle_timeout_seconds: 408). A rise is a broken "
                "client, or a slowloris.",
                "reqps",
                [Q(total(rate("sse_sidecar_bad_requests_total"), "reason"), "{{reason}}")],
                w=12,
                h=8,
                stacked=True,
            ),
            Panel(
                57,
                "Run id reuse",
                "Teed responses per second whose run id named a stored run: refused (409 "
                "run_exists, run_id_reuse=refuse) or replaced (a new generation; its old per-run "
                "tokens no longer open it).",
                "ops",
                [Q(total(rate("sse_sidecar_run_id_reuse_total"), "outcome"), "{{outcome}}")],
                w=12,
                h=8,
                stacked=True,
            ),
        ),
    ),
    Row(
        160,
        "SLO: 99.5 % of runs end with the upstream's own terminal (30 days)",
        (
            Panel(
                60,
                "Error budget remaining (30d)",
                "Share of the 30-day error budget (0.5 % of runs may end with a forced "
                "terminal, `cancelled` excluded) not yet spent: 100 % = none spent, 0 % = the "
                "SLO is missed, below 0 = over budget. Per job; the pod filter does not apply. "
                "Needs the recording rules (dashboards/prometheus/recording-rules.yaml).",
                "percentunit",
                [
                    Q(
                        "1 - "
                        + sel("job:sse_sidecar_forced_done:ratio_rate30d", recorded=True)
                        + f" / {BUDGET}",
                        "{{job}}",
                    )
                ],
                w=6,
                h=8,
                kind="stat",
                marks=((None, "red"), (0, "yellow"), (0.25, "green")),
                decimals=1,
                minimum=None,
            ),
            Panel(
                61,
                "SLI: natural ends (30d)",
                "Share of the runs finished over the last 30 days that ended with the "
                "upstream's own terminal (or a user's cancel). The objective is 99.5 %. Per "
                "job; needs the recording rules.",
                "percentunit",
                [
                    Q(
                        "1 - " + sel("job:sse_sidecar_forced_done:ratio_rate30d", recorded=True),
                        "{{job}}",
                    )
                ],
                w=6,
                h=8,
                kind="stat",
                marks=((None, "red"), (1 - BUDGET, "green")),
                decimals=3,
                minimum=None,
            ),
            Panel(
                62,
                "Burn rate by window",
                "How fast the error budget burns: the forced ratio over each window divided by "
                "the budget (0.5 %). 1 spends the 30-day budget in exactly 30 days. "
                "SSESidecarForcedTerminalBurnRate pages at 14.4x (1h and 5m) and 6x (6h and "
                "30m), and opens a ticket at 3x (1d and 2h) and 1x (3d and 6h); the lines mark "
                "those rates. Needs the recording rules.",
                "suffix:x",
                [
                    Q(
                        sel(f"job:sse_sidecar_forced_done:ratio_rate{w}", recorded=True)
                        + f" / {BUDGET}",
                        f"{w} {{{{job}}}}",
                    )
                    for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
                ],
                w=12,
                h=8,
                marks=(
                    (None, "green"),
                    (1, "yellow"),
                    (3, "orange"),
                    (6, "red"),
                    (14.4, "dark-red"),
                ),
            ),
        ),
    ),
)


# -- the dashboard ------------------------------------------------------------------------------


def _filter_variable(name: str, label: str) -> db.QueryVariable:
    """A multi-value variable with All (``.*``, which also matches a missing label), narrowed
    by the variables before it."""
    before = FILTERS[: FILTERS.index(name)]
    narrowing = ", ".join(f'{b}=~"${b}"' for b in before)
    selector = f"sse_sidecar_build_info{{{narrowing}}}" if narrowing else "sse_sidecar_build_info"
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({selector}, {name})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def build() -> dict[str, Any]:
    board = (
        db.Dashboard(TITLE)
        .uid(UID)
        .description(
            "sse-sidecar: how often do streams end with a forced terminal, and why; is anything "
            "down (sidecars, Redis, the upstream); the writer, replay and the upstream as the "
            "sidecar sees them; the SLO's error budget. Generated by "
            "dashboards/generate_dashboard.py; see dashboards/RUNBOOK.md."
        )
        .tags(["sse-sidecar", "llm", "redis"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .timezone("browser")
        .time("now-6h", "now")
        .refresh("30s")
        .link(
            db.DashboardLink("Runbook")
            .type(dm.DashboardLinkType.LINK)
            .icon("doc")
            .url(RUNBOOK)
            .target_blank(True)
        )
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for name, label in zip(FILTERS, ("Cluster", "Namespace", "Job", "Pod"), strict=True):
        board = board.with_variable(_filter_variable(name, label))
    for row in ROWS:
        board = board.with_row(db.Row(row.title).id(row.id).collapsed(False))
        for panel in row.panels:
            board = board.with_panel(panel.build())
    data: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return data


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the JSON")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when --out is out of date"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run `make dashboards`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
