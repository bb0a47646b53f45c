"""The OpenAPI document against a live sidecar (the real CLI in a subprocess), auth off and on:
``GET /sidecar/v1/openapi.json`` serves it, and schemathesis replays it (issue 11, case 8): no
5xx, no crash, every response as documented.

The examples budget keeps ``make test`` quick (``SCHEMATHESIS_MAX_EXAMPLES``, default 15 per
operation); ``make fuzz`` runs the ``fuzz``-marked long version (300).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from sidecar.openapi import openapi_document
from tests.conftest import Upstream
from tests.functional.helpers import DONE, stop, stream, token
from tests.functional.test_shutdown import ServeFactory, serve  # noqa: F401  (the fixture)

ST = Path(sys.executable).parent / "st"
PATH = "/v1/agents/agent-1/messages/stream"
SECRET = "s3cret"


async def schemathesis(url: str, *args: str, timeout: float, cwd: Path) -> tuple[int, str]:
    # (In its own directory: schemathesis keeps a cache of what it found where it runs.)
    proc = await asyncio.create_subprocess_exec(
        str(ST),
        "run",
        f"{url}/sidecar/v1/openapi.json",
        "--checks",
        "all",
        "--workers",
        "1",
        "--seed",
        "11",
        "--request-timeout",
        "10",
        "--no-color",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def fuzz_a_live_sidecar(
    serve: ServeFactory,  # noqa: F811
    upstream: Upstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    auth: bool,
    examples: int,
    timeout: float,
) -> None:
    if auth:
        monkeypatch.setenv("SSE_SIDECAR_REPLAY_TOKEN", SECRET)
        monkeypatch.setenv("SSE_SIDECAR_SIGNING_KEY", "k")
    served = await serve(1.0)
    async with http.get(served.url + "/sidecar/v1/openapi.json") as resp:
        assert resp.status == 200
        assert await resp.json() == openapi_document(auth=auth)
    # The run the document's examples name, finished: status, replay and cancel find it.
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    view = await stream(http, served.url + PATH, json={}, headers={"X-Run-Id": "run-42"})
    assert view.status == 200
    args = ["--max-examples", str(examples)]
    if auth:
        args += ["--header", f"Authorization: Bearer {SECRET}"]
    code, output = await schemathesis(served.url, *args, timeout=timeout, cwd=tmp_path)
    assert code == 0, output
    assert "5xx" not in output
    served.sigterm()
    assert await served.exit_code(10) == 0
    log = served.output()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


@pytest.mark.parametrize("auth", [False, True], ids=["auth_off", "auth_on"])
async def test_schemathesis_finds_nothing(
    serve: ServeFactory,  # noqa: F811
    upstream: Upstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    auth: bool,
) -> None:
    examples = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "15"))
    await fuzz_a_live_sidecar(
        serve, upstream, http, monkeypatch, tmp_path, auth=auth, examples=examples, timeout=50
    )


@pytest.mark.fuzz
@pytest.mark.timeout(900)
@pytest.mark.parametrize("auth", [False, True], ids=["auth_off", "auth_on"])
async def test_schemathesis_finds_nothing_long(
    serve: ServeFactory,  # noqa: F811
    upstream: Upstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    auth: bool,
) -> None:
    await fuzz_a_live_sidecar(
        serve, upstream, http, monkeypatch, tmp_path, auth=auth, examples=300, timeout=850
    )
