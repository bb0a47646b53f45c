"""SSE_SIDECAR_REDIS_URL: every form of DESIGN.md parses to its typed target; every malformed
one is refused with a message that says what is wrong, and never shows the password."""

from __future__ import annotations

import contextlib
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from sidecar.config import Settings
from sidecar.store.url import (
    ClusterTarget,
    Credentials,
    Endpoint,
    RedisTarget,
    SentinelTarget,
    SingleTarget,
    Tls,
    parse_redis_url,
)

NO_AUTH = Credentials()


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (
            "redis://127.0.0.1:6379/0",
            SingleTarget(Endpoint("127.0.0.1", 6379), None, 0, NO_AUTH, None),
        ),
        ("redis://redis", SingleTarget(Endpoint("redis", 6379), None, 0, NO_AUTH, None)),
        ("redis://redis/", SingleTarget(Endpoint("redis", 6379), None, 0, NO_AUTH, None)),
        ("REDIS://redis:7000/15", SingleTarget(Endpoint("redis", 7000), None, 15, NO_AUTH, None)),
        (
            "redis://:s3cret@redis:6380/2",
            SingleTarget(Endpoint("redis", 6380), None, 2, Credentials(None, "s3cret"), None),
        ),
        (
            "redis://app:pa%3Ass%40w%25rd@redis",
            SingleTarget(Endpoint("redis", 6379), None, 0, Credentials("app", "pa:ss@w%rd"), None),
        ),
        (
            # Unencoded '/', '?', '#' and '@' in a password (a base64 one): the user info ends
            # at the last '@'.
            "redis://:ab/c?d#e@f+g=@redis:6379/1",
            SingleTarget(
                Endpoint("redis", 6379), None, 1, Credentials(None, "ab/c?d#e@f+g="), None
            ),
        ),
        (
            "redis://app@redis",
            SingleTarget(Endpoint("redis", 6379), None, 0, Credentials("app", None), None),
        ),
        ("redis://[::1]:6379/3", SingleTarget(Endpoint("::1", 6379), None, 3, NO_AUTH, None)),
        ("redis://[fe80::1]", SingleTarget(Endpoint("fe80::1", 6379), None, 0, NO_AUTH, None)),
        (
            "rediss://:pw@redis.example.internal:6380/0",
            SingleTarget(
                Endpoint("redis.example.internal", 6380), None, 0, Credentials(None, "pw"), Tls()
            ),
        ),
        (
            "rediss://redis/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=optional"
            "&ssl_certfile=/etc/c.pem&ssl_keyfile=/etc/k.pem&ssl_check_hostname=false",
            SingleTarget(
                Endpoint("redis", 6379),
                None,
                0,
                NO_AUTH,
                Tls("/etc/ca.pem", "/etc/c.pem", "/etc/k.pem", "optional", False),
            ),
        ),
        (
            "unix:///var/run/redis/redis.sock",
            SingleTarget(None, "/var/run/redis/redis.sock", 0, NO_AUTH, None),
        ),
        (
            "unix://:pw@/var/run/redis.sock?db=4",
            SingleTarget(None, "/var/run/redis.sock", 4, Credentials(None, "pw"), None),
        ),
        (
            "redis+sentinel://s1:26379,s2:26380,s3/mymaster/2",
            SentinelTarget(
                (Endpoint("s1", 26379), Endpoint("s2", 26380), Endpoint("s3", 26379)),
                "mymaster",
                2,
                NO_AUTH,
                None,
                NO_AUTH,
                None,
            ),
        ),
        (
            "redis+sentinel://:data-pw@s1/mymaster?sentinel_password=sent-pw"
            "&sentinel_username=watcher",
            SentinelTarget(
                (Endpoint("s1", 26379),),
                "mymaster",
                0,
                Credentials(None, "data-pw"),
                None,
                Credentials("watcher", "sent-pw"),
                None,
            ),
        ),
        (
            "redis+sentinel://s1/my%20master%2Fx/",
            None,  # refused below: a master name has no spaces
        ),
        (
            "rediss+sentinel://s1:26379/m?ssl_ca_certs=/ca.pem",
            SentinelTarget(
                (Endpoint("s1", 26379),),
                "m",
                0,
                NO_AUTH,
                Tls(ca_certs="/ca.pem"),
                NO_AUTH,
                Tls(ca_certs="/ca.pem"),
            ),
        ),
        (
            "rediss+sentinel://s1/m?sentinel_ssl=false",
            SentinelTarget((Endpoint("s1", 26379),), "m", 0, NO_AUTH, Tls(), NO_AUTH, None),
        ),
        (
            "redis+sentinel://s1/m?sentinel_ssl=yes",
            SentinelTarget((Endpoint("s1", 26379),), "m", 0, NO_AUTH, None, NO_AUTH, Tls()),
        ),
        (
            "redis+cluster://n1:7000,n2:7001,[::1]:7002",
            ClusterTarget(
                (Endpoint("n1", 7000), Endpoint("n2", 7001), Endpoint("::1", 7002)), NO_AUTH, None
            ),
        ),
        (
            "redis+cluster://:pw@n1/0",
            ClusterTarget((Endpoint("n1", 6379),), Credentials(None, "pw"), None),
        ),
        (
            "rediss+cluster://u:pw@n1:6379,n2:6379?ssl_cert_reqs=none",
            ClusterTarget(
                (Endpoint("n1", 6379), Endpoint("n2", 6379)),
                Credentials("u", "pw"),
                Tls(cert_reqs="none"),
            ),
        ),
    ],
)
def test_every_form_parses_to_its_target(url: str, target: RedisTarget | None) -> None:
    if target is None:
        with pytest.raises(ValueError, match="bad master name"):
            parse_redis_url(url)
    else:
        assert parse_redis_url(url) == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "not a URL"),
        ("127.0.0.1:6379", "not a URL"),
        ("mysql://x", "unknown scheme 'mysql://'"),
        ("redis+sentinal://s1/m", "unknown scheme 'redis\\+sentinal://'"),
        ("sentinel://s1/m", "unknown scheme"),
        ("redis://", "no host"),
        ("redis://:pw@", "no host"),
        ("redis://redis:0", "bad port '0'"),
        ("redis://redis:65536", "bad port '65536'"),
        ("redis://redis:63 79", "bad port"),
        ("redis://redis:-1", "bad port '-1'"),
        ("redis://redis:port", "bad port 'port'"),
        ("redis://redis:", "bad port ''"),
        ("redis://::1:6379", "IPv6 address in brackets"),
        ("redis://[::1", "bad IPv6 address"),
        ("redis://[]:6379", "bad IPv6 address"),
        ("redis://[::1]6379", "expected \\[address\\]:port"),
        ("redis://red is", "bad host name"),
        ("redis://a,b/0", "takes one host"),
        ("redis://redis/x", "bad database 'x'"),
        ("redis://redis/-1", "bad database '-1'"),
        ("redis://redis/0/1", "bad path /0/1"),
        ("redis://redis/0#frag", "no #fragment"),
        ("redis://redis/0?db=1", "option 'db' is for unix:// only"),
        ("redis://redis/0?ssl_ca_certs=/ca.pem", "need a TLS scheme: rediss://"),
        ("redis://redis/0?socket_timeout=1", "unknown option\\(s\\) for redis://: socket_timeout"),
        ("redis://redis/0?sentinel_password=x", "for redis\\+sentinel:// URLs only"),
        ("rediss://redis/0?ssl_cert_reqs=maybe", "must be one of required, optional, none"),
        ("rediss://redis/0?ssl_check_hostname=perhaps", "must be true or false"),
        ("rediss://redis/0?ssl_ca_certs=", "needs a value"),
        ("rediss://redis/0?ssl_ca_certs", "needs a value"),
        ("rediss://redis/0?ssl_ca_certs=/a&ssl_ca_certs=/b", "given twice"),
        ("unix://", "no socket path"),
        ("unix:///", "no socket path"),
        ("unix://localhost/var/run/redis.sock", "takes no host"),
        ("unix:///tmp/r.sock?db=x", "bad database 'x'"),
        ("unix:///tmp/r.sock?ssl_ca_certs=/ca", "need a TLS scheme"),
        ("redis+sentinel://", "no sentinel host"),
        ("redis+sentinel:///mymaster", "no sentinel host"),
        ("redis+sentinel://s1:26379", "no master name"),
        ("redis+sentinel://s1:26379/", "no master name"),
        ("redis+sentinel://s1:26379//0", "no master name"),
        ("redis+sentinel://s1,,s2/m", "empty entry in the sentinel host list"),
        ("redis+sentinel://s1,/m", "empty entry"),
        ("redis+sentinel://s1:26379,s1/m", "sentinel host s1:26379 is listed twice"),
        ("redis+sentinel://s1:99999/m", "bad port '99999'"),
        ("redis+sentinel://s1/m/x", "bad database 'x'"),
        ("redis+sentinel://s1/m/0/1", "bad path /m/0/1"),
        ("redis+sentinel://s1/m?sentinel_ssl=maybe", "must be true or false"),
        ("redis+sentinel://s1/m?db=2", "option 'db' is for unix:// only"),
        ("redis+sentinel://s1/m?ssl_keyfile=/k", "rediss\\+sentinel:// instead"),
        ("redis+cluster://", "no cluster host"),
        ("redis+cluster://n1:7000,,n2:7001", "empty entry in the cluster host list"),
        ("redis+cluster://n1:7000/1", "a Redis Cluster has only database 0"),
        ("redis+cluster://n1:7000/0/x", "a Redis Cluster has only database 0"),
        ("redis+cluster://n1:abc", "bad port 'abc'"),
        ("redis+cluster://n1,n1:6379", "listed twice"),
        ("redis+cluster://n1?sentinel_password=x", "for redis\\+sentinel:// URLs only"),
        ("redis+cluster://n1?ssl_ca_certs=/ca", "rediss\\+cluster:// instead"),
    ],
)
def test_malformed_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@redis:99999/0",
        "redis://app:hunter2@red is/0",
        "redis+sentinel://:hunter2@s1:26379",
        "redis+cluster://:hunter2@n1/3",
        "rediss://:hunter2@redis/0?ssl_cert_reqs=maybe",
        "redis://:hunter2@redis/0?bogus=1",
    ],
)
def test_no_error_shows_the_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"\w") as exc:
        parse_redis_url(url)
    assert "hunter2" not in str(exc.value)
    with pytest.raises(ValidationError) as verr:
        Settings(redis_url=url)
    assert "hunter2" not in str(verr.value)


def test_the_password_is_not_in_the_targets_repr_or_description() -> None:
    for url in (
        "redis://:hunter2@redis/0",
        "redis+sentinel://:hunter2@s1/m?sentinel_password=hunter2",
        "redis+cluster://u:hunter2@n1",
    ):
        target = parse_redis_url(url)
        assert "hunter2" not in repr(target)
        assert "hunter2" not in target.describe()


def test_settings_accept_every_scheme_and_refuse_a_bad_url_at_startup() -> None:
    for url in (
        "redis://r/0",
        "rediss://r/0",
        "unix:///r.sock",
        "redis+sentinel://s1,s2/m/0",
        "rediss+sentinel://s1/m",
        "redis+cluster://n1,n2",
        "rediss+cluster://n1",
    ):
        assert Settings(redis_url=url).redis_url == url
    with pytest.raises(ValidationError, match="no master name"):
        Settings(redis_url="redis+sentinel://s1:26379")


# -- round trips ----------------------------------------------------------------------------

hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
endpoints = st.builds(Endpoint, hosts, st.integers(1, 65535))
secrets = st.text(st.characters(codec="utf-8"), min_size=1)
credentials = st.builds(
    Credentials, st.none() | st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.none() | secrets
)


def _userinfo(c: Credentials) -> str:
    if c.username is None and c.password is None:
        return ""
    return f"{quote(c.username or '', safe='')}:{quote(c.password or '', safe='')}@"


@given(
    st.lists(endpoints, min_size=1, max_size=5, unique=True),
    st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True),
    st.integers(0, 15),
    credentials,
    st.booleans(),
)
def test_sentinel_urls_round_trip(
    sentinels: list[Endpoint], master: str, db: int, auth: Credentials, tls: bool
) -> None:
    scheme = "rediss+sentinel" if tls else "redis+sentinel"
    url = f"{scheme}://{_userinfo(auth)}{','.join(map(str, sentinels))}/{master}/{db}"
    target = parse_redis_url(url)
    assert target == SentinelTarget(
        tuple(sentinels), master, db, auth, Tls() if tls else None, NO_AUTH, Tls() if tls else None
    )


@given(st.lists(endpoints, min_size=1, max_size=7, unique=True), credentials)
def test_cluster_urls_round_trip(nodes: list[Endpoint], auth: Credentials) -> None:
    url = f"redis+cluster://{_userinfo(auth)}{','.join(map(str, nodes))}"
    assert parse_redis_url(url) == ClusterTarget(tuple(nodes), auth, None)


@given(endpoints, st.integers(0, 15), credentials)
def test_single_urls_round_trip(endpoint: Endpoint, db: int, auth: Credentials) -> None:
    url = f"redis://{_userinfo(auth)}{endpoint}/{db}"
    assert parse_redis_url(url) == SingleTarget(endpoint, None, db, auth, None)


@given(st.text(max_size=200))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    for candidate in (text, "redis://" + text, "redis+sentinel://" + text):
        with contextlib.suppress(ValueError):
            parse_redis_url(candidate)
