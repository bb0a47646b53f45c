"""The ``dialect_routes`` setting: per-route dialect overrides. Pure.

Format: comma-separated ``<path glob>=<dialect>`` pairs, tried in order, the first match wins;
``*`` matches any run of characters (``/`` included), ``?`` one character; the glob is matched
against the request path without its query string. Example::

    /v1/chat/completions=openai-chat,/api/agents/*/stream=letta,/events/*=generic
"""

from __future__ import annotations

from fnmatch import fnmatchcase

DIALECT_CHOICES = (
    "auto",
    "letta",
    "openai-chat",
    "openai-responses",
    "anthropic",
    "generic",
)

Routes = tuple[tuple[str, str], ...]


def parse_routes(text: str) -> Routes:
    """The (glob, dialect) pairs of ``text``; ValueError saying what is wrong, and where."""
    routes: list[tuple[str, str]] = []
    for n, raw in enumerate(text.split(","), 1):
        item = raw.strip()
        if not item:
            continue
        pattern, sep, dialect = (part.strip() for part in item.partition("="))
        if not sep or not pattern or not dialect:
            raise ValueError(
                f"item {n} ({item!r}) must be <path glob>=<dialect>, "
                "e.g. /v1/chat/completions=openai-chat"
            )
        if not pattern.startswith(("/", "*")):
            raise ValueError(f"item {n}: the path glob {pattern!r} must start with / or *")
        if dialect not in DIALECT_CHOICES:
            raise ValueError(
                f"item {n}: unknown dialect {dialect!r}; one of {', '.join(DIALECT_CHOICES)}"
            )
        routes.append((pattern, dialect))
    return tuple(routes)


def dialect_for_path(routes: Routes, default: str, path: str) -> str:
    """The dialect setting for a request path: its first matching route's, else ``default``."""
    for pattern, dialect in routes:
        if fnmatchcase(path, pattern):
            return dialect
    return default
