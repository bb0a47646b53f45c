"""Metrics on an injected registry, and JSON logs.

``Metrics(registry)`` builds every metric of DESIGN.md on the registry it is given (never the
global one), so tests and embedders get isolated metrics and read them with ``get_sample_value``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.samples import Exemplar

from sidecar import __version__
from sidecar.dialects import TRACKERS
from sidecar.terminal import ForcedDone, Status, Transition
from sidecar.tracing import trace_ids

PREFIX = "sse_sidecar_"

# Flushes are one Redis round trip: sub-millisecond on loopback, tens of ms when Redis struggles.
_FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# First token of an LLM: from tens of ms (cached) to a minute (long tool chains).
_FIRST_EVENT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Whole runs: a second to hours.
_RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0)
# Replay lag: 10 ms is the live-tail SLO threshold, so it is a bucket boundary.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0)


# Every outcome label of replay_requests_total (README documents each).
REPLAY_OUTCOMES = (
    "ok",
    "no_content",
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "gone",
    "lost",
    "unavailable",
    "slow_reader",
)
# Every reason of writer_dropped_events_total (README documents each).
DROP_REASONS = (
    "overflow",
    "conflict",
    "fenced",
    "gap",
    "redis_rejected",
    "shutdown",
    "history_lost",
)
# Every operation label of redis_errors_total.
REDIS_OPERATIONS = (
    "flush",
    "append",
    "follow",
    "replay",
    "api",
    "sweep",
    "probe",
    "cancel",
    "alias",
)
# The supervised background tasks (background_crashes_total's label).
BACKGROUND_TASKS = (
    "sse-writer",
    "sse-leases",
    "sse-keepalive",
    "sse-orphan-sweep",
    "sse-cancel-listener",
    "sse-follower",
    "sse-live-tail",
    "sse-live-tail-router",
    "sse-redis-probe",
    "sse-sentinel-watch",
)

# Every kind label of upstream_errors_total: no connection, no answer in time, the connection
# broke before the response headers.
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "disconnected")
UPSTREAM_REJECTIONS = (
    "unsupported_encoding",
    "corrupt_encoding",
    "decompressed_bytes",
    "event_bytes",
)


class FanoutHistogram(Histogram):
    """A histogram that also counts one value observed by many at once (``observe_times``).

    The follower writes one delivery to every reader of a run that keeps up, so each reader
    has the same lag: with 1,000 readers of a run, one ``observe`` per reader per event was
    12 % of the process's samples (py-spy, bench profile ``readers1000``) for 1,000 equal
    values. Same series and exposition as a ``Histogram`` (it is one); the bulk count uses the
    base class's bucket values, as its own ``observe`` does.
    """

    def observe_times(
        self, amount: float, times: int, exemplar: dict[str, str] | None = None
    ) -> None:
        """``observe(amount, exemplar)``, ``times`` times (on the unlabelled histogram; the
        exemplar is the project's own, ``tracing.exemplar``)."""
        self._sum.inc(amount * times)
        for i, bound in enumerate(self._upper_bounds):
            if amount <= bound:
                self._buckets[i].inc(times)
                if exemplar:
                    self._buckets[i].set_exemplar(Exemplar(exemplar, amount, time.time()))
                break


class Metrics:
    """Every ``sse_sidecar_*`` metric, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX
        self.runs_started = Counter(
            p + "runs_started_total",
            "Runs whose SSE response the sidecar started teeing (counted once their dialect is "
            "known).",
            ["route", "dialect"],
            registry=r,
        )
        self.runs_active = Gauge(p + "runs_active", "Runs being teed right now.", registry=r)
        self.runs_finished = Counter(
            p + "runs_finished_total",
            "Runs that ended, by final status, stop reason and dialect.",
            ["status", "stop_reason", "dialect"],
            registry=r,
        )
        self.stream_transitions = Counter(
            p + "stream_transitions_total",
            "Terminal signals seen in upstream streams (saw_stop_reason, saw_error, saw_done, "
            "saw_done_after_error).",
            ["transition"],
            registry=r,
        )
        self.forced_done = Counter(
            p + "forced_done_total",
            "Runs the sidecar had to end itself because the upstream's own terminal never came.",
            ["reason", "dialect"],
            registry=r,
        )
        self.stream_events = Counter(
            p + "stream_events_total", "Events teed (upstream and synthesized).", registry=r
        )
        self.stream_bytes = Counter(
            p + "stream_bytes_total", "Bytes of events teed, as sent to the client.", registry=r
        )
        self.upstream_first_event = Histogram(
            p + "upstream_first_event_seconds",
            "Time from sending the request upstream to the first event of its stream.",
            buckets=_FIRST_EVENT_BUCKETS,
            registry=r,
        )
        self.run_duration = Histogram(
            p + "run_duration_seconds",
            "Duration of a run, from its first byte to its terminal.",
            ["status"],
            buckets=_RUN_BUCKETS,
            registry=r,
        )
        self.client_disconnects = Counter(
            p + "client_disconnects_total",
            "Clients that left while their run was streaming.",
            registry=r,
        )
        self.flushes = Counter(
            p + "flushes_total",
            "Writer round trips to Redis, by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.flush_duration = Histogram(
            p + "flush_duration_seconds",
            "Duration of one writer round trip.",
            buckets=_FLUSH_BUCKETS,
            registry=r,
        )
        self.flush_batch_events = Histogram(
            p + "flush_batch_events",
            "Events carried by one writer round trip.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.writer_pending_events = Gauge(
            p + "writer_pending_events", "Events accepted but not yet written.", registry=r
        )
        self.writer_pending_bytes = Gauge(
            p + "writer_pending_bytes", "Bytes of events accepted but not yet written.", registry=r
        )
        self.writer_dropped_events = Counter(
            p + "writer_dropped_events_total",
            "Events that will never be stored (or that Redis lost), by reason (overflow, "
            "conflict, fenced, gap, redis_rejected, shutdown, history_lost).",
            ["reason"],
            registry=r,
        )
        self.writer_max_bytes = Gauge(
            p + "writer_max_bytes",
            "The configured bound on unwritten event bytes (writer_max_bytes).",
            registry=r,
        )
        self.upstream_paced_seconds = Counter(
            p + "upstream_paced_seconds",
            "Seconds the tees held their upstream reads because the writer was behind while "
            "the process was out of CPU (pacing: writer_pace_bytes), instead of dropping.",
            registry=r,
        )
        self.stream_trimmed_events = Counter(
            p + "stream_trimmed_events_total",
            "Stored events removed by the max_stream_events length cap.",
            registry=r,
        )
        self.redis_errors = Counter(
            p + "redis_errors_total",
            "Failed Redis operations, by operation.",
            ["operation"],
            registry=r,
        )
        self.replay_requests = Counter(
            p + "replay_requests_total", "Replay requests, by outcome.", ["outcome"], registry=r
        )
        self.replay_active = Gauge(p + "replay_active", "Replay readers connected.", registry=r)
        self.replay_events = Counter(
            p + "replay_events_total", "Events sent to replay readers.", registry=r
        )
        self.replay_delivery_lag = FanoutHistogram(
            p + "replay_delivery_lag_seconds",
            "Time from an event reaching the sidecar to its delivery to a live replay reader.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            p + "upstream_errors_total",
            "Proxied requests that got no response from the upstream, by kind (connect, timeout, "
            "disconnected): the sidecar answered 502 or 504.",
            ["kind"],
            registry=r,
        )
        self.http_requests = Counter(
            p + "http_requests_total",
            "HTTP requests on the traffic port.",
            ["route", "method", "code"],
            registry=r,
        )
        self.http_request_duration = Histogram(
            p + "http_request_duration_seconds",
            "Duration of HTTP requests on the traffic port, to the last byte.",
            ["route"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.redis_up = Gauge(
            p + "redis_up",
            "1 while Redis answers this sidecar (as of its last command; a probe runs every "
            "redis_probe_seconds), else 0.",
            registry=r,
        )
        self.redis_data_lost = Counter(
            p + "redis_data_lost_total",
            "Times this sidecar found that Redis had lost its data (restarted empty, flushed, "
            "failed over to an empty replica).",
            registry=r,
        )
        self.background_crashes = Counter(
            p + "background_crashes_total",
            "Crashes of a background task (each is logged and the task restarted).",
            ["task"],
            registry=r,
        )
        self.upstream_rejected = Counter(
            p + "upstream_rejected_total",
            "Upstream event streams refused or cut for breaking a bound, by reason "
            "(unsupported_encoding, corrupt_encoding, decompressed_bytes, event_bytes).",
            ["reason"],
            registry=r,
        )
        self.live_clients_cut = Counter(
            p + "live_clients_cut_total",
            "Live clients disconnected for not reading, by reason (buffer, write_timeout).",
            ["reason"],
            registry=r,
        )
        self.run_id_reuse = Counter(
            p + "run_id_reuse_total",
            "Teed responses whose run id named a stored run, by outcome (refused, replaced).",
            ["outcome"],
            registry=r,
        )
        self.bad_requests = Counter(
            p + "bad_requests_total",
            "Requests refused before any route saw them, or cut while their body was read, by "
            "reason (malformed, header_timeout, body_timeout).",
            ["reason"],
            registry=r,
        )
        self.build_info = Info(p + "build", "Version of the running sidecar.", registry=r)
        self.build_info.info({"version": __version__})
        self._zero_known_series()

    def _zero_known_series(self) -> None:
        """Create the series of every known label value at 0, so that a dashboard panel or an
        alert shows 0 (not "no data") until the first such event, and rate() sees its start."""
        for transition in Transition:
            self.stream_transitions.labels(transition.value)
        for outcome in ("ok", "error"):
            self.flushes.labels(outcome)
        for dropped in DROP_REASONS:
            self.writer_dropped_events.labels(dropped)
        for operation in REDIS_OPERATIONS:
            self.redis_errors.labels(operation)
        for task in BACKGROUND_TASKS:
            self.background_crashes.labels(task)
        for outcome in REPLAY_OUTCOMES:
            self.replay_requests.labels(outcome)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind)
        # Without the runs series, the first run of each kind after a restart is invisible to
        # increase(), while its forced_done is not: the forced ratio would spike.
        for dialect, tracker in TRACKERS.items():
            self.runs_started.labels("proxy", dialect.value)
            for reason in ForcedDone:
                self.forced_done.labels(reason.value, dialect.value)
            for stop_reason, status in tracker.STOP_REASONS.items():
                self.runs_finished.labels(status.value, stop_reason, dialect.value)
            for status in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
                for label in ("none", "other"):
                    self.runs_finished.labels(status.value, label, dialect.value)
        for rejected in UPSTREAM_REJECTIONS:
            self.upstream_rejected.labels(rejected)
        for cut in ("buffer", "write_timeout"):
            self.live_clients_cut.labels(cut)
        for reuse in ("refused", "replaced"):
            self.run_id_reuse.labels(reuse)
        for bad in ("malformed", "header_timeout", "body_timeout"):
            self.bad_requests.labels(bad)
        for status in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
            self.run_duration.labels(status.value)


_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record (run_id, reason, ...)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and k[:1] != "_"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra`` fields such as run_id are carried through."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if (ids := trace_ids()) is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """For humans: the usual line, then the ``extra`` fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return f"{line} [{extras}]" if extras else line


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates http_requests_total; keep it quiet unless debugging.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class SupervisorMetrics:
    """The supervisor's own series (``serve --workers N``), served on the admin port beside
    every worker's, which carry a ``worker`` label."""

    def __init__(self, workers: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.workers = Gauge(
            PREFIX + "workers", "Worker processes configured (serve --workers).", registry=r
        )
        self.workers.set(workers)
        self.workers_up = Gauge(
            PREFIX + "workers_up",
            "Worker processes whose metrics the supervisor read in this scrape.",
            registry=r,
        )
        self.worker_restarts = Counter(
            PREFIX + "worker_restarts_total",
            "Worker processes that exited unexpectedly and were started again.",
            registry=r,
        )
