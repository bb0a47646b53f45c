"""``sse-sidecar``: serve, and the demo pieces behind ``make run``.

The ``serve`` flags are generated from ``Settings``: one ``--kebab-name`` per field, with the
field's description, env var and default in ``--help``. A flag beats its env var, which beats the
default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import SecretStr, ValidationError

from sidecar import __version__
from sidecar.config import ENV_PREFIX, Settings, service_link_hint, unknown_env_vars


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _metavar(name: str, annotation: Any) -> str | None:
    if _choices(annotation):
        return None  # argparse shows the choices
    if annotation is bool:
        return "{true,false}"
    return name.split("_")[-1].upper()


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        default = field.default
        shown = (
            "unset" if default is None else ("***" if isinstance(default, SecretStr) else default)
        )
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            choices=_choices(field.annotation),
            metavar=_metavar(name, field.annotation),
            help=f"{field.description} (env {env}; default: {shown})",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sse-sidecar",
        description="Reverse proxy that tees an LLM service's server-sent events into Redis.",
    )
    parser.add_argument("--version", action="version", version=f"sse-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the sidecar (traffic port: proxy + replay; admin port: metrics + probes)",
        description="Run the sidecar. Every flag is also an SSE_SIDECAR_* environment variable.",
    )
    add_settings_flags(serve)
    upstream = sub.add_parser(
        "demo-upstream", help="run a demo LLM service that streams Letta-style SSE"
    )
    upstream.add_argument("--host", default="127.0.0.1")
    upstream.add_argument("--port", type=int, default=8283)
    quick = sub.add_parser(
        "quickstart",
        help="start Redis, the demo upstream and the sidecar; drive demo streams (make run)",
    )
    quick.add_argument("--once", action="store_true", help="exit after the summary")
    quick.add_argument("--redis-port", type=int, default=6390)
    quick.add_argument("--upstream-port", type=int, default=8283)
    quick.add_argument("--port", type=int, default=8080)
    quick.add_argument("--admin-port", type=int, default=8081)
    quick.add_argument("--workdir", default=".run", help="where Redis keeps its files and log")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from_args(args)
        except ValidationError as exc:
            print(f"sse-sidecar: invalid settings:\n{exc}", file=sys.stderr)
            if (hint := service_link_hint(os.environ)) is not None:
                print(f"hint: {hint}", file=sys.stderr)
            return 2
        from sidecar.app import serve
        from sidecar.telemetry import configure_logging

        configure_logging(settings.log_format, settings.log_level)
        for name in unknown_env_vars(os.environ):
            logging.getLogger("sidecar").warning(
                "ignoring %s: no such setting (see sse-sidecar serve --help)", name
            )
        if settings.workers > 1:
            from sidecar.workers import supervise

            supervise(settings)
        else:
            asyncio.run(serve(settings))
        return 0
    if args.command == "demo-upstream":
        from sidecar.demo.upstream import run_upstream

        asyncio.run(run_upstream(args.host, args.port))
        return 0
    from sidecar.demo.stack import quickstart

    return int(quickstart(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
