"""Who may replay, read the status of, or cancel a run.

Two mechanisms, either or both:

- ``replay_token``: one shared bearer token (compared in constant time).
- ``signing_key``: per-run tokens the tee hands to the client that started the run, in the
  ``X-Sidecar-Replay-Token`` response header. A token names its run, the run's *generation* (a
  run id reused later is a new generation, which an old token does not open) and its expiry, and
  is signed with HMAC-SHA256:
  ``<base64url(run_id)>.<generation>.<expiry unix seconds>.<base64url(signature)>``.

Tokens come as ``Authorization: Bearer <token>`` or, because a browser ``EventSource`` cannot set
headers, as ``?token=<token>``. They are handled as bytes: a header may carry any byte, and a
token that is not ASCII is simply invalid (401), never an error. With neither setting, the routes
are open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from enum import Enum

from aiohttp import web


class Verdict(Enum):
    ALLOWED = "allowed"
    MISSING = "missing"  # 401
    INVALID = "invalid"  # 401: bad format, bad signature
    EXPIRED = "expired"  # 401
    OTHER_RUN = "other_run"  # 403: a valid token, for another run


@dataclass(frozen=True, slots=True)
class Grant:
    """A verdict, and the one generation of the run that a per-run token opens."""

    verdict: Verdict
    generation: str | None = None  # None: any generation (shared token, auth off)

    def admits(self, generation: str | None) -> bool:
        """Whether the stored run (of ``generation``) is the one this grant was issued for.

        A run stored without a generation (written before generations existed) is admitted."""
        return self.generation is None or generation is None or self.generation == generation


_MISSING = Grant(Verdict.MISSING)
_INVALID = Grant(Verdict.INVALID)
_MAX_GENERATION = 32


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def _sign(key: bytes, run_id: str, generation: str, expiry: int) -> bytes:
    return hmac.new(key, f"{run_id}\n{generation}\n{expiry}".encode(), hashlib.sha256).digest()


def _as_bytes(text: str | bytes) -> bytes:
    # aiohttp hands undecodable header bytes over as surrogate escapes; give them back.
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def _is_generation(text: bytes) -> bool:
    return 0 < len(text) <= _MAX_GENERATION and text.isalnum() and text.isascii()


def make_run_token(key: str, run_id: str, expiry: int, *, generation: str) -> str:
    signature = _sign(key.encode(), run_id, generation, expiry)
    return f"{_b64(run_id.encode())}.{generation}.{expiry}.{_b64(signature)}"


def check_run_token(key: str, token: str | bytes, run_id: str, now: float | None = None) -> Grant:
    parts = _as_bytes(token).split(b".")
    if len(parts) != 4:
        return _INVALID
    run_part, generation, expiry_text, signature_part = parts
    if not (
        _is_generation(generation)
        and expiry_text.isascii()
        and expiry_text.isdigit()
        and len(expiry_text) <= 16
    ):
        return _INVALID
    try:
        token_run = _unb64(run_part).decode()
        signature = _unb64(signature_part)
    except (binascii.Error, ValueError):
        return _INVALID
    expiry = int(expiry_text)
    expected = _sign(key.encode(), token_run, generation.decode(), expiry)
    if not hmac.compare_digest(signature, expected):
        return _INVALID
    if expiry < (time.time() if now is None else now):
        return Grant(Verdict.EXPIRED)
    if token_run != run_id:
        return Grant(Verdict.OTHER_RUN)
    return Grant(Verdict.ALLOWED, generation.decode())


@dataclass(frozen=True, slots=True)
class Authorizer:
    replay_token: str | None
    signing_key: str | None
    token_ttl_seconds: int

    @property
    def enabled(self) -> bool:
        return self.replay_token is not None or self.signing_key is not None

    def issue(self, run_id: str, generation: str) -> str | None:
        """The per-run token for the tee's response, when a signing key is set."""
        if self.signing_key is None:
            return None
        expiry = int(time.time()) + self.token_ttl_seconds
        return make_run_token(self.signing_key, run_id, expiry, generation=generation)

    def check(self, request: web.Request, run_id: str) -> Grant:
        if not self.enabled:
            return Grant(Verdict.ALLOWED)
        token = _presented(request)
        if not token:
            return _MISSING
        if self.replay_token is not None and hmac.compare_digest(token, self.replay_token.encode()):
            return Grant(Verdict.ALLOWED)
        if self.signing_key is not None:
            return check_run_token(self.signing_key, token, run_id)
        return _INVALID


def _presented(request: web.Request) -> bytes | None:
    header = _as_bytes(request.headers.get("Authorization", ""))
    scheme, _, value = header.partition(b" ")
    if scheme.lower() == b"bearer" and value.strip():
        return value.strip()
    query = request.query.get("token")
    return _as_bytes(query) if query else None
