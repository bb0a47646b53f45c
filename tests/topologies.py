"""Real Redis topologies for tests: a 3+3 Redis Cluster and a Sentinel set, on loopback.

Started from the Debian binaries (``redis-server``, ``redis-cli``, ``redis-sentinel``) on free
127.0.0.1 ports, with timeouts short enough that a failover takes a few seconds. The helpers
change the topology the way production does (``CLUSTER FAILOVER``, ``SENTINEL FAILOVER``, SIGKILL
of a primary) and return only once every node and sentinel agrees on the new one, so a test can
go on without sleeping. ``heal()`` restarts what a test killed and waits for a full topology
(every primary with a linked replica), so one topology can serve many tests in turn.

Every wait here polls: a child process's state has no event to await.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

# Short enough that a failover takes seconds, long enough that a loaded CI machine (two cores
# shared by several test runs) does not see a node as down because it was slow.
CLUSTER_NODE_TIMEOUT_MS = 1500
SENTINEL_DOWN_AFTER_MS = 1500
SENTINEL_FAILOVER_TIMEOUT_MS = 6000
MASTER_NAME = "mymaster"
# No persistence; a replica's full sync starts at once (Redis 7 waits 5 s by default for more
# replicas to share a diskless transfer).
DATA_NODE_ARGS = ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.05


# The servers the tests start get ports below the kernel's ephemeral range (32768-60999 by
# default): a port found free by binding port 0 is an ephemeral one, which any outgoing
# connection of the run may take before the server binds it (seen in CI: a cluster node's bus
# port, picked when the topology was built, was taken by the time the node started). Ports are
# handed out once per test process, so two servers never get the same one.
_SERVER_PORTS = range(20000, 32000)
_given: set[int] = set()
_pick = random.Random()  # its own: hypothesis seeds the module's generator per example


def free_port() -> int:
    for _ in range(1000):
        port = _pick.choice(_SERVER_PORTS)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as s:  # that range is used up: an ephemeral port, as a last resort
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run `make setup` (or `make test`), which installs it")
    return path


def wait_for(
    check: Callable[[], bool], *, what: str, timeout: float = WAIT_SECONDS, log: Path | None = None
) -> float:
    """Poll ``check`` until it holds; the seconds it took. Errors from ``check`` count as False."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() - started > timeout:
            tail = f"\n{log.name}:\n{log.read_text(errors='replace')[-3000:]}" if log else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(POLL_SECONDS)


def command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def info(client: redis.Redis, section: str) -> dict[str, Any]:
    reply: dict[str, Any] = client.info(section)
    return reply


class Node:
    """One redis-server (or redis-sentinel) child process; restartable on the same port."""

    def __init__(self, workdir: Path, name: str, args: list[str], *, sentinel: bool = False):
        self.workdir = workdir
        self.name = name
        self.port = free_port()
        self.sentinel = sentinel
        self._args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{name}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 0.5)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> None:
        if self.sentinel:
            # Sentinel rewrites its config file, so it needs one of its own.
            conf = self.workdir / f"{self.name}.conf"
            if not conf.exists():
                conf.write_text("\n".join(self._args) + "\n")
            cmd = [binary("redis-sentinel"), str(conf), "--port", str(self.port)]
        else:
            cmd = [binary("redis-server"), "--port", str(self.port), *self._args]
        cmd += ["--bind", "127.0.0.1", "--dir", str(self.workdir), "--logfile", str(self.log)]
        self.proc = subprocess.Popen(cmd)
        with self.client() as c:
            wait_for(lambda: bool(c.ping()), what=f"{self.name} to answer PING", log=self.log)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to peers, nothing flushed."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def role(self) -> str:
        with self.client() as c:
            reply: Any = command(c, "ROLE")
        role = reply[0]
        return role.decode() if isinstance(role, bytes) else str(role)

    def replica_linked(self) -> bool:
        with self.client() as c:
            repl = info(c, "replication")
        return repl.get("role") == "slave" and repl.get("master_link_status") == "up"


# -- Redis Cluster --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNodeView:
    node_id: str
    port: int
    primary: bool
    primary_id: str | None
    failed: bool
    slots: tuple[tuple[int, int], ...]


def cluster_nodes(client: redis.Redis) -> list[ClusterNodeView]:
    raw = command(client, "CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    out = []
    for line in text.splitlines():
        parts = line.split()
        node_id, addr, flags, primary_id = parts[0], parts[1], parts[2].split(","), parts[3]
        slots = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        out.append(
            ClusterNodeView(
                node_id=node_id,
                port=int(addr.split("@")[0].rsplit(":", 1)[1]),
                primary="master" in flags,
                primary_id=None if primary_id == "-" else primary_id,
                failed="fail" in flags or "fail?" in flags,
                slots=tuple(slots),
            )
        )
    return out


class RedisClusterTopology:
    """Three primaries and three replicas, every slot covered, failovers in seconds."""

    def __init__(self, workdir: Path, *, primaries: int = 3) -> None:
        self.workdir = workdir
        self.nodes: list[Node] = []
        for i in range(primaries * 2):
            name = f"cluster-{i}"
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / f"{name}-nodes.conf"),
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                # The bus port would be port + 10000, which may be taken: pick a free one.
                "--cluster-port", str(free_port()),
                # A replica may always take over (tests pause replication on purpose), and
                # replicas stay where they are put.
                "--cluster-replica-validity-factor", "0",
                "--cluster-allow-replica-migration", "no",
                *DATA_NODE_ARGS,
            ]  # fmt: skip
            self.nodes.append(Node(workdir, name, args))

    @property
    def url(self) -> str:
        """The sidecar's URL for this cluster: every node as a startup node."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        result = subprocess.run(
            [
                binary("redis-cli"), "--cluster", "create",
                *(n.address for n in self.nodes),
                "--cluster-replicas", "1", "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def view(self) -> list[ClusterNodeView]:
        """CLUSTER NODES as seen by a live node."""
        live = next(n for n in self.nodes if n.alive)
        with live.client() as c:
            return cluster_nodes(c)

    def primaries(self) -> list[Node]:
        return [self.node(v.port) for v in self.view() if v.primary and not v.failed]

    def replica_of(self, primary: Node) -> Node:
        views = self.view()
        pid = next(v.node_id for v in views if v.port == primary.port)
        return next(self.node(v.port) for v in views if v.primary_id == pid)

    def primary_for_slot(self, slot: int) -> Node:
        for v in self.view():
            if v.primary and not v.failed and any(lo <= slot <= hi for lo, hi in v.slots):
                return self.node(v.port)
        raise LookupError(f"no live primary serves slot {slot}")

    def primary_for_key(self, key: str) -> Node:
        live = next(n for n in self.nodes if n.alive)
        with live.client() as c:
            slot = int(command(c, "CLUSTER", "KEYSLOT", key))
        return self.primary_for_slot(slot)

    def _agreed(self) -> bool:
        """Every live node says ok, covers every slot, and sees the same roles and slots.

        Roles matter as much as slots: a replica that some nodes still see as a primary is
        refused their vote, and its ``CLUSTER FAILOVER`` times out.
        """
        views = []
        for node in self.nodes:
            if not node.alive:
                continue
            with node.client() as c:
                ci = _cluster_info(c)
                if ci.get("cluster_state") != "ok" or ci.get("cluster_slots_ok") != "16384":
                    return False
                nodes = cluster_nodes(c)
            ports = {v.node_id: v.port for v in nodes}
            views.append(
                sorted(
                    (v.port, v.primary, ports.get(v.primary_id or ""), v.failed, v.slots)
                    for v in nodes
                )
            )
        return all(v == views[0] for v in views)

    def wait_agreed(self, what: str) -> float:
        return wait_for(self._agreed, what=what)

    def wait_healthy(self) -> float:
        """Every node up, every primary with a linked replica, all nodes in agreement."""

        def healthy() -> bool:
            if not self._agreed():
                return False
            views = self.view()
            primaries = [v for v in views if v.primary and v.slots]
            replicas = [v for v in views if not v.primary]
            return (
                len(primaries) == len(self.nodes) // 2
                and all(any(r.primary_id == p.node_id for r in replicas) for p in primaries)
                and all(self.node(r.port).replica_linked() for r in replicas)
            )

        return wait_for(healthy, what="a healthy cluster (3 primaries, 3 linked replicas)")

    def failover(self, replica: Node, *option: str) -> float:
        """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on ``replica``; seconds until all agree."""
        started = time.monotonic()
        with replica.client() as c:
            command(c, "CLUSTER", "FAILOVER", *option)
        wait_for(lambda: replica.role() == "master", what=f"{replica.name} to become primary")
        self.wait_agreed(f"the cluster to agree that {replica.name} is primary")
        return time.monotonic() - started

    def kill_primary(self, primary: Node) -> tuple[Node, float]:
        """SIGKILL ``primary``; its replica, and the seconds until the cluster agreed on it."""
        replica = self.replica_of(primary)
        started = time.monotonic()
        primary.kill()
        wait_for(lambda: replica.role() == "master", what=f"{replica.name} to take over")
        self.wait_agreed(f"the cluster to agree that {replica.name} took over")
        return replica, time.monotonic() - started

    def restart(self, node: Node) -> float:
        """Start a killed node again (it rejoins as a replica); seconds until healthy."""
        started = time.monotonic()
        node.start()
        self.wait_healthy()
        return time.monotonic() - started

    def node_id(self, node: Node) -> str:
        return next(v.node_id for v in self.view() if v.port == node.port)

    def start_migration(self, slot: int, source: Node, target: Node) -> None:
        """Mark ``slot`` migrating from ``source`` to ``target`` (its keys still on source)."""
        with target.client() as t:
            command(t, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        with source.client() as s:
            command(s, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))

    def migrate_keys(self, source: Node, target: Node, *keys: str) -> None:
        with source.client() as s:
            command(s, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)

    def finish_migration(self, slot: int, target: Node) -> None:
        """Give ``slot`` to ``target`` on every primary; return once all nodes agree."""
        target_id = self.node_id(target)
        for primary in [target, *(p for p in self.primaries() if p is not target)]:
            with primary.client() as c:
                command(c, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_agreed(f"slot {slot} on {target.name}")

    def heal(self) -> None:
        for node in self.nodes:
            if not node.alive:
                node.start()
        for node in self.nodes:
            with node.client() as c:
                command(c, "CLIENT", "UNPAUSE")  # undo a test's pause, if any
        self.wait_healthy()

    def flushall(self) -> None:
        for primary in self.primaries():
            with primary.client() as c:
                c.flushall()
        # Every node: a replica keeps the scripts it loaded while it was a primary.
        for node in self.nodes:
            with node.client() as c:
                c.script_flush()


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    raw = command(client, "CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: v.strip() for k, v in pairs}


# -- Redis Sentinel -------------------------------------------------------------------------


class SentinelTopology:
    """A primary, one replica and three sentinels (quorum 2), failovers in seconds."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.primary_node = Node(workdir, "data-0", DATA_NODE_ARGS)
        self.replica_node = Node(workdir, "data-1", DATA_NODE_ARGS)
        self.data_nodes = [self.primary_node, self.replica_node]
        self.sentinels: list[Node] = []
        for i in range(3):
            conf = [
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary_node.port} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} {SENTINEL_DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER_NAME} {SENTINEL_FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ]
            self.sentinels.append(Node(workdir, f"sentinel-{i}", conf, sentinel=True))

    @property
    def url(self) -> str:
        hosts = ",".join(s.address for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> None:
        self.primary_node.start()
        self.replica_node._args = [
            *self.replica_node._args,
            "--replicaof", "127.0.0.1", str(self.primary_node.port),
        ]  # fmt: skip
        self.replica_node.start()
        wait_for(self.replica_node.replica_linked, what="the replica to sync")
        for s in self.sentinels:
            s.start()
        self.wait_healthy()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data_nodes]:
            node.stop()

    def _master_addr(self, sentinel: Node) -> int:
        with sentinel.client() as c:
            reply: Any = command(c, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(reply[1])

    def primary(self) -> Node:
        """The data node every live sentinel names as the primary."""
        ports = {self._master_addr(s) for s in self.sentinels if s.alive}
        if len(ports) != 1:
            raise LookupError(f"sentinels disagree on the primary: {ports}")
        port = ports.pop()
        return next(n for n in self.data_nodes if n.port == port)

    def replica(self) -> Node:
        primary = self.primary()
        return next(n for n in self.data_nodes if n is not primary)

    def _agree_on(self, node: Node) -> bool:
        return all(self._master_addr(s) == node.port for s in self.sentinels if s.alive)

    def wait_healthy(self) -> float:
        """Sentinels agree on a primary that has a linked replica, and know each other."""

        def healthy() -> bool:
            primary = self.primary()
            replica = self.replica()
            if not (primary.alive and replica.alive and primary.role() == "master"):
                return False
            if not replica.replica_linked():
                return False
            for s in self.sentinels:
                with s.client() as c:
                    state: Any = c.sentinel_master(MASTER_NAME)
                if (
                    state["num-other-sentinels"] != len(self.sentinels) - 1
                    or state["num-slaves"] < 1
                    or state["is_sdown"]
                    or state["is_odown"]
                ):
                    return False
                with s.client() as c:
                    replicas: Any = c.sentinel_slaves(MASTER_NAME)
                if not any(
                    r["port"] == replica.port
                    and r["role-reported"] == "slave"
                    and r["master-link-status"] == "ok"
                    and r["master-port"] == primary.port
                    and not (r["is_sdown"] or r["is_disconnected"])
                    for r in replicas
                ):
                    return False
            return True

        return wait_for(healthy, what="a healthy sentinel set (agreed primary, linked replica)")

    def failover(self) -> tuple[Node, float]:
        """``SENTINEL FAILOVER``; the new primary and the seconds until all sentinels agree."""
        new = self.replica()
        started = time.monotonic()
        with self.sentinels[0].client() as c:
            command(c, "SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for(lambda: self._agree_on(new) and new.role() == "master", what="the failover")
        return new, time.monotonic() - started

    def kill_primary(self) -> tuple[Node, Node, float]:
        """SIGKILL the primary: (killed, new primary, seconds until every sentinel names it)."""
        old, new = self.primary(), self.replica()
        started = time.monotonic()
        old.kill()
        wait_for(
            lambda: self._agree_on(new) and new.role() == "master",
            what=f"the sentinels to promote {new.name}",
        )
        return old, new, time.monotonic() - started

    def restart(self, node: Node) -> float:
        """Start a killed data node again; seconds until it is the primary's linked replica.

        It comes back as a primary with an empty dataset; the sentinels turn it into a replica
        when they see it (their INFO period is 10 s, so this takes up to about that).
        """
        started = time.monotonic()
        node.start()
        wait_for(node.replica_linked, what=f"the sentinels to turn {node.name} into a replica")
        return time.monotonic() - started

    def flushall(self) -> None:
        with self.primary().client() as c:
            c.flushall()
            c.script_flush()


# -- fixtures (tests/conftest.py loads this module as a plugin) -----------------------------


@pytest.fixture(scope="session")
def redis_cluster_topology(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterTopology]:
    topology = RedisClusterTopology(tmp_path_factory.mktemp("cluster"))
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.fixture
def redis_cluster(redis_cluster_topology: RedisClusterTopology) -> RedisClusterTopology:
    """The shared cluster, healed (a previous test may have killed a node) and empty."""
    redis_cluster_topology.heal()
    redis_cluster_topology.flushall()
    return redis_cluster_topology


@pytest.fixture(scope="session")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """Shared by the tests that do not change the topology (use ``failover_sentinel`` then)."""
    topology = SentinelTopology(tmp_path_factory.mktemp("sentinel"))
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.fixture
def sentinel_set(sentinel_topology: SentinelTopology) -> SentinelTopology:
    sentinel_topology.flushall()
    return sentinel_topology


@pytest.fixture
def failover_sentinel(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A private sentinel set a test may fail over and kill: a new one starts in about 2 s,
    while a used one takes the sentinels' 10 s INFO period to look whole again."""
    topology = SentinelTopology(tmp_path)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
