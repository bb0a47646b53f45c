"""Run tokens and the Authorizer (sidecar.auth): pure, no I/O.

A token is ``<base64url(run_id)>.<expiry unix seconds>.<base64url(HMAC-SHA256)>``. Anything that
is not exactly such a token, signed with the key, is INVALID; a good token past its expiry is
EXPIRED; a good token for another run is OTHER_RUN.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from aiohttp.test_utils import make_mocked_request

from sidecar.auth import Authorizer, Verdict, check_run_token, make_run_token

KEY = "k3y"
RUN = "run-42"
NOW = 1_800_000_000
LATER = NOW + 3600
NOT_UTF8 = base64.urlsafe_b64encode(b"\xff\xfe").rstrip(b"=").decode()


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parts(token: str) -> list[str]:
    out = token.split(".")
    assert len(out) == 3
    return out


def test_a_token_names_its_run_and_expiry_and_is_signed_with_hmac_sha256() -> None:
    token = make_run_token(KEY, RUN, LATER)
    run_part, expiry, signature = parts(token)
    assert run_part == b64(RUN.encode())
    assert expiry == str(LATER)
    expected = hmac.new(KEY.encode(), f"{RUN}\n{LATER}".encode(), hashlib.sha256).digest()
    assert signature == b64(expected)
    assert "=" not in token  # unpadded base64url: safe in a query string as is


# Lengths whose base64 leaves 0, 1 and 2 padding characters off.
@pytest.mark.parametrize("run_id", ["run-42", "a", "ab", "abc", "r" * 128, "A.b_c:d-e"])
def test_round_trip(run_id: str) -> None:
    token = make_run_token(KEY, run_id, LATER)
    assert check_run_token(KEY, token, run_id, now=NOW) is Verdict.ALLOWED
    assert check_run_token(KEY, token, run_id, now=LATER) is Verdict.ALLOWED  # the last second


def test_expired() -> None:
    token = make_run_token(KEY, RUN, NOW - 1)
    assert check_run_token(KEY, token, RUN, now=NOW) is Verdict.EXPIRED
    assert check_run_token(KEY, make_run_token(KEY, RUN, 0), RUN) is Verdict.EXPIRED
    # Without ``now``, the clock decides.
    assert check_run_token(KEY, make_run_token(KEY, RUN, 2**40), RUN) is Verdict.ALLOWED


def test_other_run() -> None:
    token = make_run_token(KEY, "run-1", LATER)
    assert check_run_token(KEY, token, "run-2", now=NOW) is Verdict.OTHER_RUN
    assert check_run_token(KEY, token, "run-1", now=NOW) is Verdict.ALLOWED


def test_another_key_is_invalid() -> None:
    token = make_run_token("other-key", RUN, LATER)
    assert check_run_token(KEY, token, RUN, now=NOW) is Verdict.INVALID


def test_tampered_signature_is_invalid() -> None:
    run_part, expiry, signature = parts(make_run_token(KEY, RUN, LATER))
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    for i in (0, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[i] ^= 1
        token = f"{run_part}.{expiry}.{b64(bytes(flipped))}"
        assert check_run_token(KEY, token, RUN, now=NOW) is Verdict.INVALID
    truncated = f"{run_part}.{expiry}.{b64(bytes(raw[:-1]))}"
    assert check_run_token(KEY, truncated, RUN, now=NOW) is Verdict.INVALID
    assert check_run_token(KEY, f"{run_part}.{expiry}.", RUN, now=NOW) is Verdict.INVALID


def test_tampered_run_is_invalid_not_other_run() -> None:
    _, expiry, signature = parts(make_run_token(KEY, "run-1", LATER))
    token = f"{b64(b'run-2')}.{expiry}.{signature}"
    assert check_run_token(KEY, token, "run-2", now=NOW) is Verdict.INVALID
    assert check_run_token(KEY, token, "run-1", now=NOW) is Verdict.INVALID


def test_tampered_expiry_is_invalid() -> None:
    run_part, _, signature = parts(make_run_token(KEY, RUN, NOW - 10))
    # Pushing an expired token's expiry into the future does not revive it.
    for expiry in (LATER, NOW - 9, 2**63):
        token = f"{run_part}.{expiry}.{signature}"
        assert check_run_token(KEY, token, RUN, now=NOW) is Verdict.INVALID


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "..",
        "abc",
        "a.b",
        "a.1.b.c",
        f"{b64(RUN.encode())}.{LATER}",
        f"{b64(RUN.encode())}.{LATER}.sig.extra",
        f"{b64(RUN.encode())}.-1.sig",
        f"{b64(RUN.encode())}.+1.sig",
        f"{b64(RUN.encode())}.1e9.sig",
        f"{b64(RUN.encode())}. 1.sig",
        f"{b64(RUN.encode())}.0x10.sig",
        f"{b64(RUN.encode())}..sig",
        f"{b64(RUN.encode())}.never.sig",
        f"a.{LATER}.{b64(b'x' * 32)}",  # 1 char: not a base64 length
        f"{b64(RUN.encode())}.{LATER}.a",
        f"r\u00e9n.{LATER}.{b64(b'x' * 32)}",  # not ASCII
        f"{b64(RUN.encode())}.{LATER}.s\u00efg",
        f"{NOT_UTF8}.{LATER}.{b64(b'x' * 32)}",
        f"{b64(RUN.encode())}.{LATER}.!!!!",
    ],
)
def test_malformed_tokens_are_invalid(token: str) -> None:
    assert check_run_token(KEY, token, RUN, now=NOW) is Verdict.INVALID


@pytest.mark.parametrize(
    "expiry",
    ["\u00b2", "1\u00b2", "\u2460", "9" * 5000],
    ids=["superscript_two", "one_superscript_two", "circled_one", "5000_digits"],
)
def test_an_expiry_that_is_digits_but_no_int_is_invalid(expiry: str) -> None:
    token = f"{b64(RUN.encode())}.{expiry}.{b64(b'x' * 32)}"
    assert check_run_token(KEY, token, RUN, now=NOW) is Verdict.INVALID


# -- the Authorizer ---------------------------------------------------------------------------


def test_with_neither_setting_everything_is_allowed() -> None:
    auth = Authorizer(replay_token=None, signing_key=None, token_ttl_seconds=60)
    assert not auth.enabled
    assert auth.issue(RUN) is None
    for req in (
        make_mocked_request("GET", "/x"),
        make_mocked_request("GET", "/x", headers={"Authorization": "Bearer nonsense"}),
        make_mocked_request("GET", "/x?token=nonsense"),
        make_mocked_request("POST", "/x", headers={"Authorization": "Basic dTpw"}),
    ):
        assert auth.check(req, RUN) is Verdict.ALLOWED
        assert auth.check(req, "any-other-run") is Verdict.ALLOWED


def test_a_shared_replay_token() -> None:
    auth = Authorizer(replay_token="s3cret", signing_key=None, token_ttl_seconds=60)
    assert auth.enabled
    assert auth.issue(RUN) is None  # nothing to hand out without a signing key

    def check(path: str = "/x", **headers: str) -> Verdict:
        return auth.check(make_mocked_request("GET", path, headers=headers), RUN)

    assert check() is Verdict.MISSING
    assert check(Authorization="Bearer s3cret") is Verdict.ALLOWED
    assert check(Authorization="bearer s3cret") is Verdict.ALLOWED  # the scheme is any case
    assert check(Authorization="Bearer  s3cret ") is Verdict.ALLOWED
    assert check("/x?token=s3cret") is Verdict.ALLOWED
    assert check(Authorization="Bearer wrong") is Verdict.INVALID
    assert check(Authorization="Bearer s3cre") is Verdict.INVALID
    assert check(Authorization="Bearer s3crets") is Verdict.INVALID
    assert check("/x?token=wrong") is Verdict.INVALID
    assert check(Authorization="Basic s3cret") is Verdict.MISSING  # not a bearer token
    assert check(Authorization="s3cret") is Verdict.MISSING
    assert check(Authorization="Bearer ") is Verdict.MISSING
    assert check("/x?token=") is Verdict.MISSING
    # The header wins over the query when both are there.
    assert check("/x?token=s3cret", Authorization="Bearer wrong") is Verdict.INVALID


def test_per_run_tokens() -> None:
    auth = Authorizer(replay_token=None, signing_key="k", token_ttl_seconds=60)
    token = auth.issue(RUN)
    assert token is not None
    assert check_run_token("k", token, RUN) is Verdict.ALLOWED
    expiry = int(parts(token)[1])
    assert check_run_token("k", token, RUN, now=expiry + 1) is Verdict.EXPIRED

    def check(run_id: str, path: str = "/x", **headers: str) -> Verdict:
        return auth.check(make_mocked_request("GET", path, headers=headers), run_id)

    assert check(RUN, Authorization=f"Bearer {token}") is Verdict.ALLOWED
    assert check(RUN, f"/x?token={token}") is Verdict.ALLOWED
    assert check("run-43", Authorization=f"Bearer {token}") is Verdict.OTHER_RUN
    assert check(RUN) is Verdict.MISSING
    assert check(RUN, Authorization="Bearer k") is Verdict.INVALID  # the key is not a token
    stale = make_run_token("k", RUN, 1)
    assert check(RUN, Authorization=f"Bearer {stale}") is Verdict.EXPIRED


def test_both_settings_accept_either_token() -> None:
    auth = Authorizer(replay_token="s3cret", signing_key="k", token_ttl_seconds=60)
    token = auth.issue(RUN)
    assert token is not None

    def check(run_id: str, bearer: str) -> Verdict:
        req = make_mocked_request("GET", "/x", headers={"Authorization": f"Bearer {bearer}"})
        return auth.check(req, run_id)

    assert check(RUN, "s3cret") is Verdict.ALLOWED
    assert check("run-43", "s3cret") is Verdict.ALLOWED  # the shared token opens every run
    assert check(RUN, token) is Verdict.ALLOWED
    assert check("run-43", token) is Verdict.OTHER_RUN
    assert check(RUN, "wrong") is Verdict.INVALID
