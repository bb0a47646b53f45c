"""A plain aiohttp reverse proxy, no tee: the floor for any Python proxy in this bench.

``python -m bench.plainproxy --port P --upstream-url URL`` forwards every request (method, raw
path, end-to-end headers, streamed body) and streams the response back chunk by chunk as it
arrives, on the same stack and settings as the sidecar (aiohttp server and client, default
asyncio loop, unbounded upstream pool, no decompression, handler cancellation, no access log).
It neither parses, numbers nor stores anything.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BASE = web.AppKey("base", str)


def end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = URL(request.app[BASE] + request.raw_path, encoded=True)
    body = await request.read() if request.body_exists else None
    async with session.request(
        request.method,
        url,
        headers=end_to_end(request.headers),
        data=body,
        allow_redirects=False,
    ) as upstream:
        resp = web.StreamResponse(status=upstream.status, headers=end_to_end(upstream.headers))
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def serve(port: int, upstream_url: str) -> None:
    app = web.Application()
    app[BASE] = upstream_url.rstrip("/")
    app.router.add_route("*", "/{tail:.*}", proxy)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=300),
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    # The sidecar's listen backlog (sidecar.app.LISTEN_BACKLOG), so that both accept alike.
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"plain proxy listening on http://127.0.0.1:{port} -> {upstream_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-url", required=True)
    args = parser.parse_args()
    from bench.common import raise_nofile

    raise_nofile()
    asyncio.run(serve(args.port, args.upstream_url))


if __name__ == "__main__":
    main()
