"""The processes of a bench run: Redis, the upstream, the proxies, the workers.

Everything binds 127.0.0.1 on free ports, logs under the run's work directory, and is stopped
(SIGTERM, then SIGKILL) when the ``Stack`` closes, in reverse order of start.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.common import proc_cpu_seconds, proc_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable  # the project's virtualenv: sidecar, aiohttp, redis-py
LETTA_PYTHON = ROOT / "bench" / ".venv-letta" / "bin" / "python"
LETTA_SETUP_LOG = ROOT / "bench" / ".venv-letta.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not listen on {port} within {timeout}s; see {log}")


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss(self) -> int:
        return proc_rss_bytes(self.pid)


class Worker:
    """A bench worker process (load generator, Letta peer) speaking line-JSON on stdin/stdout."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        self._log_file: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
        )
        self.pid = self.proc.pid
        self._ready = False

    def wait_ready(self, timeout: float = 120) -> None:
        if not self._ready:
            self._read(timeout)  # the ready line
            self._ready = True

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{self.name}: no answer within {timeout}s (log: {self.log})")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()}); see {self.log}")
        reply: dict[str, Any] = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"{self.name}: {reply['error']} (log: {self.log})")
        result: dict[str, Any] = reply["result"]
        return result

    def call(self, op: str, timeout: float = 300, **args: Any) -> dict[str, Any]:
        self.wait_ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(timeout)

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss(self) -> int:
        return proc_rss_bytes(self.pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


class Stack:
    """Starts services and workers; stops them all, newest first. Services are spawned without
    waiting (``wait`` does), so that they start side by side."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._services: list[Service] = []
        self._workers: list[Worker] = []
        self._logs: list[IO[bytes]] = []

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        f = open(log, "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(f)
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env if env is not None else base_env(),
            start_new_session=True,
        )
        return proc, log

    def redis(self) -> Service:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server not found: run `make bench` (it installs it)")
        port = free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(data), "--maxclients", "10000"]
        proc, log = self._spawn("redis", argv)
        wait_port(port, proc, log)
        return self._add(Service("redis", proc, port, log))

    def upstream(self) -> Service:
        port = free_port()
        proc, log = self._spawn("upstream", [PYTHON, "-m", "bench.upstream", "--port", str(port)])
        return self._add(Service("upstream", proc, port, log))

    def plain_proxy(self, upstream: Service) -> Service:
        port = free_port()
        argv = [PYTHON, "-m", "bench.plainproxy", "--port", str(port)]
        argv += ["--upstream-url", f"http://127.0.0.1:{upstream.port}"]
        proc, log = self._spawn("plainproxy", argv)
        return self._add(Service("plainproxy", proc, port, log))

    def wait(self, *services: Service) -> None:
        """Until each listens (every port of it)."""
        for svc in services:
            for port in (svc.port, *svc.extra.values()):
                wait_port(port, svc.proc, svc.log)

    def sidecar(
        self,
        upstream: Service,
        redis: Service,
        name: str = "sidecar",
        *,
        root: Path | None = None,
        flags: tuple[str, ...] = (),
    ) -> Service:
        """``python -m sidecar serve`` with its defaults, but for where it listens and points
        (and ``flags``); ``root``: import the ``sidecar`` package from there instead."""
        port, admin = free_port(), free_port()
        argv = [PYTHON, "-m", "sidecar", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--admin-port", str(admin)]
        argv += ["--upstream-url", f"http://127.0.0.1:{upstream.port}"]
        argv += ["--redis-url", f"redis://127.0.0.1:{redis.port}/0", *flags]
        env = {k: v for k, v in base_env().items() if not k.startswith(("SSE_SIDECAR_", "OTEL_"))}
        if root is not None:
            # `python -m` imports from its working directory first.
            env["PYTHONPATH"] = str(root.resolve())
        proc, log = self._spawn(name, argv, env, cwd=(root or ROOT).resolve())
        return self._add(Service(name, proc, port, log, {"admin": admin}))

    def loadgen(self) -> Worker:
        return self._worker("loadgen", [PYTHON, "-m", "bench.loadgen"], base_env())

    def letta(self) -> Worker:
        env = base_env()
        letta_dir = self.workdir / "letta-home"
        letta_dir.mkdir(exist_ok=True)
        env["LETTA_DIR"] = str(letta_dir)  # its log file, not ~/.letta
        return self._worker("letta", [str(LETTA_PYTHON), "-m", "bench.letta_peer"], env)

    def _worker(self, name: str, argv: list[str], env: dict[str, str]) -> Worker:
        worker = Worker(name, argv, self.workdir / f"{name}.log", env)
        self._workers.append(worker)
        return worker

    def _add(self, service: Service) -> Service:
        self._services.append(service)
        return service

    def stop(self, service: Service) -> None:
        _terminate(service.proc)
        self._services.remove(service)

    def close(self) -> None:
        for worker in reversed(self._workers):
            worker.close()
        for service in reversed(self._services):
            _terminate(service.proc)
        for f in self._logs:
            f.close()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def http_get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body.decode()
