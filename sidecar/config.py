"""Every knob of the sidecar, its default and its env var, in one place.

Each field is an ``SSE_SIDECAR_<NAME>`` environment variable and a ``--<name>`` flag of
``sse-sidecar serve`` (the CLI is generated from this class, so the two can never drift).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar.dialects.routes import Routes, parse_routes
from sidecar.store.url import parse_redis_url

ENV_PREFIX = "SSE_SIDECAR_"


class Settings(BaseSettings):
    # Inputs stay out of error messages: a bad Redis URL must not print its password.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    upstream_url: str = Field(
        "http://127.0.0.1:8283",
        description="Base URL of the LLM service every request is proxied to.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis to tee streams into: redis://, rediss://, unix://, "
        "redis+sentinel://h:p[,h:p]/master[/db], redis+cluster://h:p[,h:p] (rediss+... for TLS).",
    )
    host: str = Field("0.0.0.0", description="Address the traffic and admin ports bind to.")
    port: int = Field(8080, ge=0, le=65535, description="Traffic port: proxy and replay API.")
    admin_port: int = Field(
        8081, ge=0, le=65535, description="Admin port: /metrics, /healthz, /readyz."
    )
    key_prefix: str = Field(
        "sse:run:", min_length=1, description="Prefix of every Redis key the sidecar writes."
    )
    dialect: Literal["auto", "letta", "openai-chat", "openai-responses", "anthropic", "generic"] = (
        Field(
            "auto",
            description="The protocol of the upstream's streams (terminal events, stop reasons, "
            "what a forced end appends); auto detects it per run from its first event.",
        )
    )
    dialect_routes: str = Field(
        "",
        description="Per-route dialect overrides: comma-separated <path glob>=<dialect>, the "
        "first match wins (e.g. /v1/chat/completions=openai-chat,/agents/*=letta).",
    )
    status_without_stop_reason: Literal["failed", "completed"] = Field(
        "failed",
        description="Status of a run whose own terminal came with neither a stop reason nor an "
        "error (letta, openai-chat, anthropic).",
    )
    run_id_header: str = Field(
        "X-Run-Id", min_length=1, description="Header carrying the run id (upstream, then client)."
    )
    stream_ttl_seconds: int = Field(
        10800, gt=0, description="TTL of a run's keys, refreshed on every write."
    )
    max_stream_events: int = Field(
        100000, gt=0, description="Length cap of one run's stream; trimming is counted."
    )
    max_event_bytes: int = Field(
        1 << 20,
        gt=0,
        description="Largest upstream event; a larger one ends the run (upstream_error).",
    )
    flush_max_events: int = Field(
        512, gt=0, description="Most events one Redis round trip of the writer carries."
    )
    flush_gather_seconds: float = Field(
        0.002,
        ge=0,
        le=1,
        description="A writer round trip waits this long for events of other runs to go with "
        "it (not when a full batch, a claim or a lease renewal waits): fewer round trips at "
        "light load; 0 sends at once.",
    )
    writer_max_bytes: int = Field(
        64 << 20,
        gt=0,
        description="Bound on unwritten event bytes; past it new events are dropped and counted.",
    )
    writer_pace_bytes: int | None = Field(
        None,
        ge=0,
        description="When the writer's backlog passes this while the process is out of CPU "
        "and Redis answers, the tees hold their upstream reads (1 s at most at a time) until "
        "it is half of this: a sustained burst is stored whole instead of dropped past "
        "writer_max_bytes. A slow or unreachable Redis does not hold them while the process has "
        "CPU to spare. Unset: a quarter of writer_max_bytes; 0: off.",
    )
    lease_seconds: float = Field(
        30.0, gt=0, description="Producer lease; another process may take over a run after it."
    )
    drain_seconds: float = Field(
        25.0, ge=0, description="On SIGTERM: time running streams get to finish before forced end."
    )
    on_client_disconnect: Literal["continue", "cancel"] = Field(
        "continue", description="Keep reading the upstream when the client leaves, or cancel it."
    )
    heartbeat_seconds: float = Field(
        15.0,
        gt=0,
        description="Interval of keep-alive comments on idle streams: ': ping' to replay "
        "readers, ': keep-alive' to a live client whose upstream is silent.",
    )
    replay_token: SecretStr | None = Field(
        None, description="Bearer token required by the replay, status and cancel routes."
    )
    signing_key: SecretStr | None = Field(
        None, description="HMAC key for per-run replay tokens (X-Sidecar-Replay-Token)."
    )
    replay_token_ttl_seconds: int = Field(
        10800, gt=0, description="Lifetime of a per-run replay token."
    )
    replay_buffer_bytes: int = Field(
        1 << 20,
        gt=0,
        description="Unsent live bytes one replay reader may hold before it is disconnected.",
    )
    replay_write_timeout_seconds: float = Field(
        30.0, gt=0, description="A replay reader that accepts no bytes this long is disconnected."
    )
    redis_max_connections: int = Field(
        8,
        ge=2,
        description="Pool size for writes, claims and catch-up reads (plus the live tail's and "
        "the cancel channel's connections); on a cluster the pool of each node, and the commands "
        "in flight in all.",
    )
    ready_without_redis: bool = Field(
        False,
        description="Stay ready (take traffic) while Redis is unreachable or the writer backlog "
        "is high: streams go on, their events buffered up to writer_max_bytes.",
    )
    log_format: Literal["json", "text"] = Field("json", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest log level written."
    )
    max_request_bytes: int = Field(
        10 << 20, gt=0, description="Largest request body proxied; larger ones get 413."
    )
    upstream_connect_timeout_seconds: float = Field(
        10.0, gt=0, description="Deadline to connect to the upstream (502/504 past it)."
    )
    upstream_read_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="Longest silence between two upstream reads (ends a run as upstream_timeout).",
    )
    upstream_max_connections: int = Field(
        0, ge=0, description="Upper bound of upstream connections (0: no bound)."
    )
    redis_probe_seconds: float = Field(
        2.0,
        gt=0,
        description="Interval of the Redis probe (reachability, and whether Redis lost its data).",
    )
    redis_timeout_seconds: float = Field(
        2.0, gt=0, description="Deadline of one Redis command on the request path."
    )
    metrics_grace_seconds: float = Field(
        0.0,
        ge=0,
        description="On shutdown, once the last run ended and the writer flushed: how long "
        "/metrics keeps serving so a last scrape reads the final counts (it stops at the first "
        "scrape after that). Set it above the scrape interval.",
    )
    max_decompressed_bytes: int = Field(
        64 << 20,
        gt=0,
        description="Most bytes a compressed upstream event stream may decode to; past it the "
        "run ends (upstream_error).",
    )
    live_buffer_bytes: int = Field(
        1 << 20,
        gt=0,
        description="Unsent bytes a run's live client may hold before it is disconnected (it "
        "resumes with Last-Event-ID; the run goes on being stored).",
    )
    live_write_timeout_seconds: float = Field(
        30.0, gt=0, description="A live client that accepts no bytes this long is disconnected."
    )
    run_id_reuse: Literal["refuse", "replace"] = Field(
        "refuse",
        description="A client-chosen run id whose keys still exist: refused (409), or replaced "
        "by a new generation of the run.",
    )
    keepalive_timeout_seconds: float = Field(
        75.0, gt=0, description="An idle keep-alive connection is closed after this long."
    )
    request_header_timeout_seconds: float = Field(
        15.0,
        gt=0,
        description="Time a client gets to send a request's headers (408 and close past it).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes serving the traffic port (SO_REUSEPORT), each with its own "
        "writer and live tail; one per CPU core the container may use.",
    )
    gc_tuning: bool = Field(
        True,
        description="Once started, freeze the startup heap out of the garbage collector and "
        "raise its thresholds (10,000, 50, 100): fewer and shorter collector pauses with many "
        "connections open.",
    )
    request_body_idle_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest silence while a request body is received (408 past it).",
    )

    @field_validator("upstream_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        parse_redis_url(value)  # its ValueError says what is wrong, without the password
        return value

    @field_validator("dialect_routes")
    @classmethod
    def _dialect_routes(cls, value: str) -> str:
        parse_routes(value)  # raises a ValueError naming the bad item
        return value

    @property
    def dialect_route_table(self) -> Routes:
        return parse_routes(self.dialect_routes)

    @field_validator("replay_token", "signing_key")
    @classmethod
    def _not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty secret (a Secret key set to "") would silently turn auth off.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty: unset it to turn this auth off")
        return value

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.port and self.port == self.admin_port:
            raise ValueError("port and admin_port must differ")
        return self

    @model_validator(mode="after")
    def _pace_below_bound(self) -> Settings:
        pace = self.writer_pace_bytes
        if pace is not None and pace >= self.writer_max_bytes:
            raise ValueError(
                f"writer_pace_bytes ({pace}) must be below writer_max_bytes "
                f"({self.writer_max_bytes}): pacing has to start before events are dropped "
                "(0 turns it off)"
            )
        return self

    @property
    def pace_bytes(self) -> int:
        """The writer backlog at which the tees are paced (0: never)."""
        pace = self.writer_pace_bytes
        return self.writer_max_bytes // 4 if pace is None else pace


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """``SSE_SIDECAR_*`` variables that name no setting (a typo is otherwise silently ignored)."""
    return sorted(
        key
        for key in environ
        if key.startswith(ENV_PREFIX)
        and key[len(ENV_PREFIX) :].lower() not in Settings.model_fields
    )


def service_link_hint(environ: Mapping[str, str]) -> str | None:
    """Kubernetes injects ``<SERVICE>_PORT=tcp://...`` for a Service named sse-sidecar."""
    if environ.get(ENV_PREFIX + "PORT", "").startswith("tcp://"):
        return (
            f"{ENV_PREFIX}PORT={environ[ENV_PREFIX + 'PORT']!r} looks like a Kubernetes service "
            "link: set enableServiceLinks: false on the pod, or set SSE_SIDECAR_PORT explicitly"
        )
    return None
