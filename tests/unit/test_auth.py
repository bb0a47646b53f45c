"""Run tokens and the Authorizer (sidecar.auth): pure, no I/O.

A token is ``<base64url(run_id)>.<generation>.<expiry unix seconds>.<base64url(HMAC-SHA256)>``.
Anything that is not exactly such a token, signed with the key, is INVALID; a good token past its
expiry is EXPIRED; a good token for another run is OTHER_RUN; a good token for the run is ALLOWED
for its one generation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from aiohttp.test_utils import make_mocked_request

from sidecar.auth import Authorizer, Grant, Verdict, check_run_token, make_run_token

KEY = "k3y"
RUN = "run-42"
GEN = "0123456789abcdef"
NOW = 1_800_000_000
LATER = NOW + 3600
NOT_UTF8 = base64.urlsafe_b64encode(b"\xff\xfe").rstrip(b"=").decode()


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parts(token: str) -> list[str]:
    out = token.split(".")
    assert len(out) == 4
    return out


def token_for(run_id: str, expiry: int, key: str = KEY, generation: str = GEN) -> str:
    return make_run_token(key, run_id, expiry, generation=generation)


def test_a_token_names_its_run_generation_and_expiry_and_is_signed_with_hmac_sha256() -> None:
    token = token_for(RUN, LATER)
    run_part, generation, expiry, signature = parts(token)
    assert run_part == b64(RUN.encode())
    assert generation == GEN
    assert expiry == str(LATER)
    signed = f"{RUN}\n{GEN}\n{LATER}".encode()
    expected = hmac.new(KEY.encode(), signed, hashlib.sha256).digest()
    assert signature == b64(expected)
    assert "=" not in token  # unpadded base64url: safe in a query string as is


# Lengths whose base64 leaves 0, 1 and 2 padding characters off.
@pytest.mark.parametrize("run_id", ["run-42", "a", "ab", "abc", "r" * 128, "A.b_c:d-e"])
def test_round_trip(run_id: str) -> None:
    token = token_for(run_id, LATER)
    assert check_run_token(KEY, token, run_id, now=NOW).verdict is Verdict.ALLOWED
    assert (
        check_run_token(KEY, token, run_id, now=LATER).verdict is Verdict.ALLOWED
    )  # the last second


def test_expired() -> None:
    token = token_for(RUN, NOW - 1)
    assert check_run_token(KEY, token, RUN, now=NOW).verdict is Verdict.EXPIRED
    assert check_run_token(KEY, token_for(RUN, 0), RUN).verdict is Verdict.EXPIRED
    # Without ``now``, the clock decides.
    assert check_run_token(KEY, token_for(RUN, 2**40), RUN).verdict is Verdict.ALLOWED


def test_other_run() -> None:
    token = token_for("run-1", LATER)
    assert check_run_token(KEY, token, "run-2", now=NOW).verdict is Verdict.OTHER_RUN
    assert check_run_token(KEY, token, "run-1", now=NOW).verdict is Verdict.ALLOWED


def test_another_key_is_invalid() -> None:
    token = token_for(RUN, LATER, key="other-key")
    assert check_run_token(KEY, token, RUN, now=NOW).verdict is Verdict.INVALID


def test_tampered_signature_is_invalid() -> None:
    run_part, gen, expiry, signature = parts(token_for(RUN, LATER))
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    for i in (0, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[i] ^= 1
        token = f"{run_part}.{gen}.{expiry}.{b64(bytes(flipped))}"
        assert check_run_token(KEY, token, RUN, now=NOW).verdict is Verdict.INVALID
    truncated = f"{run_part}.{gen}.{expiry}.{b64(bytes(raw[:-1]))}"
    assert check_run_token(KEY, truncated, RUN, now=NOW).verdict is Verdict.INVALID
    empty = f"{run_part}.{gen}.{expiry}."
    assert check_run_token(KEY, empty, RUN, now=NOW).verdict is Verdict.INVALID


def test_tampered_run_is_invalid_not_other_run() -> None:
    _, gen, expiry, signature = parts(token_for("run-1", LATER))
    token = f"{b64(b'run-2')}.{gen}.{expiry}.{signature}"
    assert check_run_token(KEY, token, "run-2", now=NOW).verdict is Verdict.INVALID
    assert check_run_token(KEY, token, "run-1", now=NOW).verdict is Verdict.INVALID


def test_tampered_expiry_is_invalid() -> None:
    run_part, gen, _, signature = parts(token_for(RUN, NOW - 10))
    # Pushing an expired token's expiry into the future does not revive it.
    for expiry in (LATER, NOW - 9, 2**63):
        token = f"{run_part}.{gen}.{expiry}.{signature}"
        assert check_run_token(KEY, token, RUN, now=NOW).verdict is Verdict.INVALID


def test_tampered_generation_is_invalid() -> None:
    # A token of one generation cannot be edited into a token of another.
    run_part, _, expiry, signature = parts(token_for(RUN, LATER))
    for generation in ("fedcba9876543210", "0123456789abcdeF", "x"):
        token = f"{run_part}.{generation}.{expiry}.{signature}"
        assert check_run_token(KEY, token, RUN, now=NOW).verdict is Verdict.INVALID


def test_a_good_token_opens_its_own_generation_only() -> None:
    grant = check_run_token(KEY, token_for(RUN, LATER, generation="gen1"), RUN, now=NOW)
    assert grant == Grant(Verdict.ALLOWED, "gen1")
    assert grant.admits("gen1")
    assert not grant.admits("gen2")
    # A run stored before generations existed has none: any good token of its id opens it.
    assert grant.admits(None)
    assert Grant(Verdict.ALLOWED).admits("gen2")  # the shared token, or auth off


R = b64(RUN.encode())
SIG = b64(b"x" * 32)


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "...",
        "abc",
        "a.b",
        "a.b.1.c",
        f"{R}.{LATER}.{SIG}",  # the format before generations: no longer accepted
        f"{R}.{GEN}.{LATER}",
        f"{R}.{GEN}.{LATER}.sig.extra",
        f"{R}.{GEN}.-1.sig",
        f"{R}.{GEN}.+1.sig",
        f"{R}.{GEN}.1e9.sig",
        f"{R}.{GEN}. 1.sig",
        f"{R}.{GEN}.0x10.sig",
        f"{R}.{GEN}..sig",
        f"{R}.{GEN}.never.sig",
        f"{R}..{LATER}.{SIG}",  # no generation
        f"{R}.{'a' * 33}.{LATER}.{SIG}",  # a generation too long
        f"{R}.ab-cd.{LATER}.{SIG}",
        f"{R}.g\u00e9n.{LATER}.{SIG}",
        f"a.{GEN}.{LATER}.{SIG}",  # 1 char: not a base64 length
        f"{R}.{GEN}.{LATER}.a",
        f"r\u00e9n.{GEN}.{LATER}.{SIG}",  # not ASCII
        f"{R}.{GEN}.{LATER}.s\u00efg",
        f"{NOT_UTF8}.{GEN}.{LATER}.{SIG}",
        f"{R}.{GEN}.{LATER}.!!!!",
        "\udcff\udcfe\udcfd",  # undecodable header bytes, as aiohttp hands them over
        b"\xff\xfe\xfd",
        f"{R}.{GEN}.{LATER}.{SIG}\udcff",
    ],
)
def test_malformed_tokens_are_invalid(token: str | bytes) -> None:
    assert check_run_token(KEY, token, RUN, now=NOW).verdict is Verdict.INVALID


@pytest.mark.parametrize(
    "expiry",
    ["\u00b2", "1\u00b2", "\u2460", "9" * 5000],
    ids=["superscript_two", "one_superscript_two", "circled_one", "5000_digits"],
)
def test_an_expiry_that_is_digits_but_no_int_is_invalid(expiry: str) -> None:
    token = f"{R}.{GEN}.{expiry}.{SIG}"
    assert check_run_token(KEY, token, RUN, now=NOW).verdict is Verdict.INVALID


# -- the Authorizer ---------------------------------------------------------------------------


def test_with_neither_setting_everything_is_allowed() -> None:
    auth = Authorizer(replay_token=None, signing_key=None, token_ttl_seconds=60)
    assert not auth.enabled
    assert auth.issue(RUN, GEN) is None
    for req in (
        make_mocked_request("GET", "/x"),
        make_mocked_request("GET", "/x", headers={"Authorization": "Bearer nonsense"}),
        make_mocked_request("GET", "/x?token=nonsense"),
        make_mocked_request("POST", "/x", headers={"Authorization": "Basic dTpw"}),
    ):
        assert auth.check(req, RUN) == Grant(Verdict.ALLOWED)
        assert auth.check(req, "any-other-run") == Grant(Verdict.ALLOWED)


def test_a_shared_replay_token() -> None:
    auth = Authorizer(replay_token="s3cret", signing_key=None, token_ttl_seconds=60)
    assert auth.enabled
    assert auth.issue(RUN, GEN) is None  # nothing to hand out without a signing key

    def check(path: str = "/x", **headers: str) -> Verdict:
        grant = auth.check(make_mocked_request("GET", path, headers=headers), RUN)
        assert grant.generation is None  # the shared token opens every generation
        return grant.verdict

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
    token = auth.issue(RUN, GEN)
    assert token is not None
    assert check_run_token("k", token, RUN).verdict is Verdict.ALLOWED
    assert check_run_token("k", token, RUN).generation == GEN
    expiry = int(parts(token)[2])
    assert check_run_token("k", token, RUN, now=expiry + 1).verdict is Verdict.EXPIRED

    def check(run_id: str, path: str = "/x", **headers: str) -> Verdict:
        return auth.check(make_mocked_request("GET", path, headers=headers), run_id).verdict

    assert check(RUN, Authorization=f"Bearer {token}") is Verdict.ALLOWED
    assert check(RUN, f"/x?token={token}") is Verdict.ALLOWED
    assert check("run-43", Authorization=f"Bearer {token}") is Verdict.OTHER_RUN
    assert check(RUN) is Verdict.MISSING
    assert check(RUN, Authorization="Bearer k") is Verdict.INVALID  # the key is not a token
    stale = token_for(RUN, 1, key="k")
    assert check(RUN, Authorization=f"Bearer {stale}") is Verdict.EXPIRED


def test_both_settings_accept_either_token() -> None:
    auth = Authorizer(replay_token="s3cret", signing_key="k", token_ttl_seconds=60)
    token = auth.issue(RUN, GEN)
    assert token is not None

    def check(run_id: str, bearer: str) -> Verdict:
        req = make_mocked_request("GET", "/x", headers={"Authorization": f"Bearer {bearer}"})
        return auth.check(req, run_id).verdict

    assert check(RUN, "s3cret") is Verdict.ALLOWED
    assert check("run-43", "s3cret") is Verdict.ALLOWED  # the shared token opens every run
    assert check(RUN, token) is Verdict.ALLOWED
    assert check("run-43", token) is Verdict.OTHER_RUN
    assert check(RUN, "wrong") is Verdict.INVALID


@pytest.mark.parametrize(
    "value", ["Bearer \u00ff\u00fe", "Bearer \u00e9t\u00e9", "Bearer s3cr\u00e9t"]
)
def test_tokens_that_are_not_ascii_are_invalid_not_an_error(value: str) -> None:
    # (Header bytes that are not UTF-8 at all come as surrogate escapes: the malformed tokens
    # above and tests/functional/test_server_guards.py send those.)
    auth = Authorizer(replay_token="s3cret", signing_key="k", token_ttl_seconds=60)
    req = make_mocked_request("GET", "/x", headers={"Authorization": value})
    assert auth.check(req, RUN).verdict is Verdict.INVALID
    query = make_mocked_request("GET", "/x?token=%FF%FE%FD")
    assert auth.check(query, RUN).verdict is Verdict.INVALID
