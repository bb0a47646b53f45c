"""The README's "Benchmarks" section, generated from a run's results (``make bench`` writes it to
bench/README-section.md; a quick run to bench/results/quick/README-section.md)."""

from __future__ import annotations

from typing import Any

from bench.machine import one_line

HOW = """\
```sh
make bench         # the whole suite, about 15 minutes; prints the tables below (ARGS=--repeats 3)
make bench-quick   # the same scenarios at small sizes, about a minute (the test suite runs it
                   # as a smoke test: tests/functional/test_bench_smoke.py)
.venv/bin/python -m bench --profile 10 --profile-load streams1000   # py-spy the sidecar
# Before/after in one run: another checkout's sidecar interleaved in the same cells
git archive main sidecar | tar -x -C /tmp/base
.venv/bin/python -m bench --only tee readers saturation --baseline /tmp/base --levels 300 1000
```

Both targets set everything up first (`.venv`, `redis-server`, and two bench-only virtualenvs:
`bench/.venv-letta` with `letta` 0.16.x from PyPI for the in-process peer, `bench/.venv-tools`
with py-spy). Every figure of a run, per repeat, is written as JSON under `bench/results/<mode>/`
(`summary.json`, one file per scenario, `tables.md`).

How it measures, on one machine, everything on 127.0.0.1:

- **Processes.** A private `redis-server` (no persistence), the bench upstream (raw asyncio,
  HTTP/1.1 chunked SSE: ~165-byte Letta-style `assistant_message` JSON events, `seq_id`/`run_id`
  null so the sidecar fills them, each carrying its send time), `python -m sidecar serve` with its
  defaults, a plain aiohttp reverse proxy without tee (`bench/plainproxy.py`, the sidecar's stack
  and settings, no parsing), the load generator (raw asyncio sockets, its own process), and
  Letta's code in its own process. CPU seconds come from `/proc/<pid>/stat`, RSS from
  `/proc/<pid>/statm`, Redis figures from `INFO` and `CLIENT LIST`, the writer's from the
  sidecar's `/metrics`.
- **Latency** is receive time at the client minus the upstream's send time embedded in the event,
  for the events sent once every stream is open (the steady state); *added* latency is a path's
  percentile minus direct-to-upstream's in the same repeat. Streams run at a token rate, evenly
  phased (not in lockstep).
- **A replay reader on every run** (the fault suite's load shape): each sidecar stream is also
  followed live through the replay API by a reader that connects at the run's first event: live
  latency, replay-follow lag (send → reader receive), first byte (request → response head),
  drops, CPU per live event against the plain proxy carrying the same streams.
- **Worker processes**: `serve --workers N` carries N x the streams (a reader each) beside the
  plain proxy, then a saturation cell; CPU is summed over the supervisor and its workers.
- **Opening runs**: short runs (5 events at the token rate) opened one after another at 100
  per second: the CPU one run costs the process under test (its events included), and the
  first byte (connect and request -> response head) while runs keep opening.
- **All open after**: each cell logs when the last stream got its response head. A process that
  accepts slowly staggers the streams, and its latency then looks better than it is (fewer
  streams run at once in the measured window): compare cells whose streams were all open
  before the window (ramp + settle).
- **Saturation**: streams sent as fast as the path takes them; events/s received, and the
  events per CPU-second of the process under test (what one core would do: on a 2-core machine
  the upstream, the load generator and Redis take the rest).
- **Sustained saturation**: one long saturating cell (100 streams x 15,000 events, 1.5 million
  in all) per sidecar: what it relayed, what reached Redis (counted with `XLEN` after the
  writer was done), what was dropped, the stored events/s over the time until the writer was
  done, and how long the tees held their reads for the writer (pacing). With `--baseline` the
  other checkout gets its own cell.
- **Peers, same run, same Redis**: direct to the upstream (the floor of any proxy), the plain
  aiohttp proxy (the floor of any Python proxy), `redis-benchmark` XADD pipelined 50 deep on 1
  and 50 connections (Redis's own limit), and Letta 0.16.x: its `create_background_stream_processor`
  (one `RedisSSEStreamWriter` per run, its defaults) fed the same events in-process, and its
  `redis_sse_stream_generator` reader (its defaults: pages of 100, 0.1 s poll), both over its
  `AsyncRedisClient` as `get_redis_client()` builds it (a 50-connection pool). Letta's code is
  not changed or stubbed; its virtualenv also has `asyncpg` (its ORM imports it) and `hiredis`
  (the parser the sidecar uses). Letta's peers run in-process, without HTTP, which favours them.
- **Honesty**: every cell is repeated, peers interleaved with the sidecar inside each repeat (so a
  noisy moment hits all alike); tables show the median and (min-max); nothing is tuned for the
  bench (the sidecar runs with its defaults).
"""


def section(results: dict[str, Any], tables: str, note: str = "") -> str:
    cfg = results["config"]
    parts = [
        "## Benchmarks",
        HOW,
        f"### Results ({cfg['mode']} run: `{results['command']}`)",
    ]
    if note:
        parts.append(note)
    parts.append(
        f"Measured on {one_line(results['machine'])}; load average at the start "
        f"{_load(results['machine'].get('loadavg_start'))}, at the end "
        f"{_load(results['machine'].get('loadavg_end'))}. {cfg['repeats']} repeats of every cell; "
        f"{results['total_seconds']:.0f} s in all."
    )
    if results.get("letta_error"):
        parts.append(f"The Letta peer was not measured: {results['letta_error']}")
    body = tables.split("\n\n", 1)[1] if "\n\n" in tables else tables
    parts.append(body.replace("### ", "#### "))
    return "\n\n".join(parts) + "\n"


def _load(value: Any) -> str:
    if not value:
        return "n/a"
    return "/".join(f"{v:.2f}" for v in value)
