"""``SSE_SIDECAR_REDIS_URL`` in, a typed target out; pure (no I/O, no redis import).

The forms (DESIGN.md "Names"); ``[user:password@]`` is optional everywhere, ports default to
6379 (data nodes) and 26379 (sentinels)::

    redis://[user:password@]host[:port][/db]                          one Redis
    rediss://...                                                      ... over TLS
    unix://[user:password@]/path/to/redis.sock[?db=N]                 ... on a Unix socket
    redis+sentinel://[user:password@]host[:port][,host[:port]...]/master[/db]
    rediss+sentinel://...                                             ... over TLS
    redis+cluster://[user:password@]host[:port][,host[:port]...][/0]  a Redis Cluster
    rediss+cluster://...                                              ... over TLS

Sentinel: the user and password are the data nodes' (the primary and its replicas, which the
sidecar reads and writes). Sentinels usually have no password, or one of their own: give it as
``?sentinel_password=...`` (and ``sentinel_username=...``). ``rediss+sentinel://`` speaks TLS to
the data nodes and to the sentinels; ``?sentinel_ssl=false`` keeps the sentinels on plain TCP
(``?sentinel_ssl=true`` on ``redis+sentinel://`` does the reverse).

TLS options, on the TLS forms only: ``ssl_ca_certs=PATH``, ``ssl_certfile=PATH``,
``ssl_keyfile=PATH``, ``ssl_cert_reqs=required|optional|none``,
``ssl_check_hostname=true|false``. They apply to every TLS connection of the target.

The user info ends at the URL's last ``@``, so a password may hold any character; ``%XX`` in it
is decoded, so write a literal ``%`` as ``%25``. Percent-encode ``/ ? # @ %`` in a master name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

DATA_PORT = 6379
SENTINEL_PORT = 26379

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = (*SINGLE_SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES)

CertReqs = Literal["required", "optional", "none"]
_CERT_REQS: tuple[CertReqs, ...] = ("required", "optional", "none")
_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password", "sentinel_ssl")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_HOST = re.compile(r"[A-Za-z0-9._-]+")
_MASTER = re.compile(r"[^\s/]+")
_ENCODE_HINT = "percent-encode / ? # @ and % in a master name"


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Tls:
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: CertReqs = "required"
    check_hostname: bool = True


@dataclass(frozen=True, slots=True)
class SingleTarget:
    """One Redis: TCP (``endpoint``) or a Unix socket (``socket_path``)."""

    endpoint: Endpoint | None
    socket_path: str | None
    db: int
    credentials: Credentials
    tls: Tls | None

    def describe(self) -> str:
        where = self.socket_path if self.endpoint is None else str(self.endpoint)
        return f"redis {where} db {self.db}{' (TLS)' if self.tls else ''}"


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A primary found through Sentinel; ``tls``/``credentials`` are the data nodes'."""

    sentinels: tuple[Endpoint, ...]
    master: str
    db: int
    credentials: Credentials
    tls: Tls | None
    sentinel_credentials: Credentials
    sentinel_tls: Tls | None

    def describe(self) -> str:
        hosts = ",".join(map(str, self.sentinels))
        return f"sentinel master {self.master!r} db {self.db} via {hosts}" + (
            " (TLS)" if self.tls else ""
        )


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    startup_nodes: tuple[Endpoint, ...]
    credentials: Credentials
    tls: Tls | None

    def describe(self) -> str:
        hosts = ",".join(map(str, self.startup_nodes))
        return f"cluster via {hosts}" + (" (TLS)" if self.tls else "")


RedisTarget = SingleTarget | SentinelTarget | ClusterTarget


def parse_redis_url(url: str) -> RedisTarget:
    """Parse one of the forms above; a ``ValueError`` that says what is wrong otherwise.

    Error messages never contain the password.
    """
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"not a URL: expected one of {_scheme_list()}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme + '://'!r}: expected one of {_scheme_list()}")
    # The user info ends at the last '@': a password may then hold '/', '?', '#' (base64 ones
    # do) without breaking the parse, and no error message below can quote it.
    userinfo, at, rest = rest.rpartition("@")
    if "#" in rest:
        raise ValueError(f"a Redis URL has no #fragment ({_ENCODE_HINT})")
    rest, _, query = rest.partition("?")
    hosts, _, path = rest.partition("/")
    credentials = _credentials(userinfo) if at else Credentials()
    options = _options(query)
    tls = _tls(scheme, options)
    if scheme in SENTINEL_SCHEMES:
        target: RedisTarget = _sentinel(hosts, path, credentials, tls, options)
    elif scheme in CLUSTER_SCHEMES:
        target = _cluster(hosts, path, credentials, tls)
    elif scheme == "unix":
        target = _unix(hosts, path, credentials, options)
    else:
        target = _single(scheme, hosts, path, credentials, tls)
    _no_leftovers(scheme, options)
    return target


def _no_leftovers(scheme: str, options: dict[str, str]) -> None:
    for name in options:
        if name in _SENTINEL_OPTIONS:
            raise ValueError(f"option {name!r} is for redis+sentinel:// URLs only")
        if name == "db":
            raise ValueError("option 'db' is for unix:// only: put the database in the path")
    if options:
        raise ValueError(f"unknown option(s) for {scheme}://: {', '.join(sorted(options))}")


def _scheme_list() -> str:
    return ", ".join(s + "://" for s in SCHEMES)


def _credentials(userinfo: str) -> Credentials:
    user, _, password = userinfo.partition(":")
    return Credentials(username=unquote(user) or None, password=unquote(password) or None)


def _options(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        name, eq, value = item.partition("=")
        if not eq or not value:
            raise ValueError(f"option {name!r} needs a value ({name}=...)")
        if name in options:
            raise ValueError(f"option {name!r} given twice")
        options[name] = unquote(value)
    return options


def _bool(options: dict[str, str], name: str, default: bool) -> bool:
    value = options.pop(name, None)
    if value is None:
        return default
    try:
        return _BOOLS[value.lower()]
    except KeyError:
        raise ValueError(f"option {name!r} must be true or false, got {value!r}") from None


def _tls(scheme: str, options: dict[str, str]) -> Tls | None:
    if not scheme.startswith("rediss"):
        given = [name for name in _TLS_OPTIONS if name in options]
        if given:
            raise ValueError(
                f"{', '.join(given)} need a TLS scheme: "
                f"{scheme.replace('redis', 'rediss', 1)}:// instead of {scheme}://"
            )
        return None
    cert_reqs = options.pop("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError(f"option 'ssl_cert_reqs' must be one of {', '.join(_CERT_REQS)}")
    return Tls(
        ca_certs=options.pop("ssl_ca_certs", None),
        certfile=options.pop("ssl_certfile", None),
        keyfile=options.pop("ssl_keyfile", None),
        cert_reqs=next(c for c in _CERT_REQS if c == cert_reqs),
        check_hostname=_bool(options, "ssl_check_hostname", True),
    )


def _endpoint(text: str, default_port: int) -> Endpoint:
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or not host or ":" not in host:
            raise ValueError(f"bad IPv6 address {text!r}: write it as [address]:port")
        if tail and not tail.startswith(":"):
            raise ValueError(f"bad host {text!r}: expected [address]:port")
        port_text = tail[1:] if tail else None
    else:
        host, colon, port_text_ = text.partition(":")
        if ":" in port_text_:
            raise ValueError(f"bad host {text!r}: put an IPv6 address in brackets, [::1]:6379")
        if not _HOST.fullmatch(host):
            raise ValueError(f"bad host name {host!r} in {text!r}")
        port_text = port_text_ if colon else None
    if port_text is None:
        return Endpoint(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {text!r}: expected 1-65535")
    return Endpoint(host, int(port_text))


def _endpoints(hosts: str, default_port: int, what: str) -> tuple[Endpoint, ...]:
    if not hosts:
        raise ValueError(f"no {what} host: expected host[:port][,host[:port]...]")
    out: list[Endpoint] = []
    for item in hosts.split(","):
        if not item:
            raise ValueError(f"empty entry in the {what} host list {hosts!r}")
        endpoint = _endpoint(item, default_port)
        if endpoint in out:
            raise ValueError(f"{what} host {endpoint} is listed twice")
        out.append(endpoint)
    return tuple(out)


def _db(text: str, form: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad database {text!r}: expected a number ({form})")
    return int(text)


def _single(
    scheme: str, hosts: str, path: str, credentials: Credentials, tls: Tls | None
) -> SingleTarget:
    if "," in hosts:
        raise ValueError(
            f"{scheme}:// takes one host; for several, use redis+sentinel:// or redis+cluster://"
        )
    if not hosts:
        raise ValueError(f"no host: expected {scheme}://host[:port][/db]")
    if "/" in path:
        raise ValueError(f"bad path /{path}: expected {scheme}://host[:port][/db]")
    db = _db(path, f"{scheme}://host[:port]/db") if path else 0
    return SingleTarget(_endpoint(hosts, DATA_PORT), None, db, credentials, tls)


def _unix(hosts: str, path: str, credentials: Credentials, options: dict[str, str]) -> SingleTarget:
    if hosts:
        raise ValueError(f"unix:// takes no host ({hosts!r}): unix:///path/to/redis.sock")
    if not path or path.endswith("/"):
        raise ValueError("no socket path: unix:///path/to/redis.sock[?db=N]")
    db_text = options.pop("db", None)
    db = _db(db_text, "unix:///path/to/redis.sock?db=N") if db_text is not None else 0
    return SingleTarget(None, "/" + unquote(path), db, credentials, None)


def _sentinel(
    hosts: str, path: str, credentials: Credentials, tls: Tls | None, options: dict[str, str]
) -> SentinelTarget:
    sentinels = _endpoints(hosts, SENTINEL_PORT, "sentinel")
    form = "redis+sentinel://host:port[,host:port...]/MASTER[/db]"
    master, _, db_text = path.partition("/")
    master = unquote(master)
    if not master:
        raise ValueError(f"no master name: expected {form}")
    if not _MASTER.fullmatch(master):
        raise ValueError(f"bad master name {master!r}: no spaces or slashes")
    if "/" in db_text:
        raise ValueError(f"bad path /{path}: expected {form}")
    db = _db(db_text, form) if db_text else 0
    username = options.pop("sentinel_username", None)
    password = options.pop("sentinel_password", None)
    sentinel_tls_on = _bool(options, "sentinel_ssl", tls is not None)
    return SentinelTarget(
        sentinels=sentinels,
        master=master,
        db=db,
        credentials=credentials,
        tls=tls,
        sentinel_credentials=Credentials(username, password),
        sentinel_tls=(tls or Tls()) if sentinel_tls_on else None,
    )


def _cluster(hosts: str, path: str, credentials: Credentials, tls: Tls | None) -> ClusterTarget:
    nodes = _endpoints(hosts, DATA_PORT, "cluster")
    if path not in ("", "0"):
        raise ValueError(f"bad path /{path}: a Redis Cluster has only database 0")
    return ClusterTarget(nodes, credentials, tls)
