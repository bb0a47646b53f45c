"""Who may replay, read the status of, or cancel a run.

Two mechanisms, either or both:

- ``replay_token``: one shared bearer token (compared in constant time).
- ``signing_key``: per-run tokens the tee hands to the client that started the run, in the
  ``X-Sidecar-Replay-Token`` response header. A token names its run and its expiry and is signed
  with HMAC-SHA256: ``<base64url(run_id)>.<expiry unix seconds>.<base64url(signature)>``.

Tokens come as ``Authorization: Bearer <token>`` or, because a browser ``EventSource`` cannot set
headers, as ``?token=<token>``. With neither setting, the routes are open.
"""

from __future__ import annotations

import base64
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


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, run_id: str, expiry: int) -> bytes:
    return hmac.new(key, f"{run_id}\n{expiry}".encode(), hashlib.sha256).digest()


def make_run_token(key: str, run_id: str, expiry: int) -> str:
    return f"{_b64(run_id.encode())}.{expiry}.{_b64(_sign(key.encode(), run_id, expiry))}"


def check_run_token(key: str, token: str, run_id: str, now: float | None = None) -> Verdict:
    parts = token.split(".")
    if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit() and len(parts[1]) <= 16):
        return Verdict.INVALID
    try:
        token_run = _unb64(parts[0]).decode()
        signature = _unb64(parts[2])
    except (ValueError, UnicodeDecodeError):
        return Verdict.INVALID
    expiry = int(parts[1])
    if not hmac.compare_digest(signature, _sign(key.encode(), token_run, expiry)):
        return Verdict.INVALID
    if expiry < (time.time() if now is None else now):
        return Verdict.EXPIRED
    if token_run != run_id:
        return Verdict.OTHER_RUN
    return Verdict.ALLOWED


@dataclass(frozen=True, slots=True)
class Authorizer:
    replay_token: str | None
    signing_key: str | None
    token_ttl_seconds: int

    @property
    def enabled(self) -> bool:
        return self.replay_token is not None or self.signing_key is not None

    def issue(self, run_id: str) -> str | None:
        """The per-run token for the tee's response, when a signing key is set."""
        if self.signing_key is None:
            return None
        return make_run_token(self.signing_key, run_id, int(time.time()) + self.token_ttl_seconds)

    def check(self, request: web.Request, run_id: str) -> Verdict:
        if not self.enabled:
            return Verdict.ALLOWED
        token = _presented(request)
        if not token:
            return Verdict.MISSING
        if self.replay_token is not None and hmac.compare_digest(
            token.encode(), self.replay_token.encode()
        ):
            return Verdict.ALLOWED
        if self.signing_key is not None:
            return check_run_token(self.signing_key, token, run_id)
        return Verdict.INVALID


def _presented(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("token") or None
