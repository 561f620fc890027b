"""Measure 1,000 concurrent async audited HTTP calls against the loopback
server, recorded two ways, and print medians and their ratios.

    python bench/async_clients.py --db postgresql+psycopg://USER@HOST/SCRATCH --repeats 5
    python bench/async_clients.py --db sqlite:////tmp/SCRATCH.db --repeats 5

Three approaches, alternated within each repeat so that noise hits all alike:

- ``bare``: a plain ``httpx.AsyncClient``, nothing recorded (the baseline);
- ``thread-pool``: ``AsyncAuditedHTTPClient`` with a ``CallRecorder``, whose
  database work the transport runs in worker threads (at most 8);
- ``async``: ``AsyncAuditedHTTPClient`` with an ``AsyncCallRecorder``, awaited
  on the event loop.

Each round opens a fresh state, starts ``--calls`` tasks at once with
``asyncio.gather`` (each one GET, body read, its own wall latency timed) and
times the whole. All three use the same connection limits (``--max-connections``,
default 100: httpcore 1.0's pool does bookkeeping per pooled connection on
every request event, so at 1,000 connections the client's own pool dominates,
bare included) and the same generous timeout. The loopback server runs in a
process of its own. Added latency is a round's percentile minus
the bare round's of the same repeat. After each recorded round the state's
calls are checked: indices 0..calls-1, all ``success``. One untimed warm-up
round of each approach comes first. Use a scratch database.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from callindex import AsyncAuditedHTTPClient, AsyncCallRecorder, CallRecorder
from callindex.loopback import LoopbackAPI

APPROACHES = ("bare", "thread-pool", "async")
TIMEOUT = httpx.Timeout(120.0)  # the same for all three


@dataclass(frozen=True)
class Round:
    """One round of one approach: calls per second and per-call latency (ms)."""

    throughput: float
    p50_ms: float
    p99_ms: float


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile of ``values``, by linear interpolation."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def one_call(client: httpx.AsyncClient, n: int) -> float:
    """GET one item, read its body; the wall latency in milliseconds."""
    started = time.perf_counter()
    response = await client.get(f"/items/{n}")
    response.raise_for_status()
    response.json()
    return (time.perf_counter() - started) * 1000


async def timed_round(client: httpx.AsyncClient, calls: int) -> Round:
    async with client:
        started = time.perf_counter()
        latencies = await asyncio.gather(*(one_call(client, n) for n in range(calls)))
        wall = time.perf_counter() - started
    return Round(calls / wall, percentile(latencies, 0.50), percentile(latencies, 0.99))


def check_recorded(checker: CallRecorder, state_id: str, calls: int) -> None:
    """Fail loudly unless ``state_id`` holds exactly ``calls`` successful calls 0..calls-1."""
    recorded = checker.calls(state_id)
    indices = sorted(call.call_index for call in recorded)
    statuses = {call.status for call in recorded}
    if indices != list(range(calls)) or statuses != {"success"}:
        raise SystemExit(
            f"state {state_id}: {len(recorded)} calls recorded, expected {calls} "
            f"with indices 0..{calls - 1}; indices {indices[:3]}..{indices[-3:]}, "
            f"statuses {sorted(statuses)}"
        )


async def measure(
    db: str, url: str, calls: int, repeats: int, connections: int
) -> dict[str, list[Round]]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    def inner() -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport(limits=limits)

    results: dict[str, list[Round]] = {name: [] for name in APPROACHES}
    with CallRecorder(db) as sync_recorder, CallRecorder(db) as checker:
        async with AsyncCallRecorder(db) as async_recorder:
            recorders: dict[str, CallRecorder | AsyncCallRecorder] = {
                "thread-pool": sync_recorder,
                "async": async_recorder,
            }

            async def run(name: str, n_calls: int) -> Round:
                if name == "bare":
                    client = httpx.AsyncClient(base_url=url, timeout=TIMEOUT, transport=inner())
                    return await timed_round(client, n_calls)
                recorder = recorders[name]
                state_id = f"bench-async-{uuid.uuid4().hex[:12]}"
                if isinstance(recorder, AsyncCallRecorder):
                    await recorder.open_state(state_id)
                else:
                    recorder.open_state(state_id)
                client = AsyncAuditedHTTPClient(
                    recorder,
                    state_id,
                    base_url=url,
                    timeout=TIMEOUT,
                    retry=None,
                    inner=inner(),
                )
                result = await timed_round(client, n_calls)
                check_recorded(checker, state_id, n_calls)
                return result

            for name in APPROACHES:  # warm-up: pools, schema check, imports
                await run(name, min(calls, 100))
            for _ in range(repeats):
                for name in APPROACHES:
                    results[name].append(await run(name, calls))
    return results


def median_of(rounds: list[Round], value: Callable[[Round], float]) -> float:
    return statistics.median(value(r) for r in rounds)


def added(results: dict[str, list[Round]], name: str, value: Callable[[Round], float]) -> float:
    """The median over repeats of ``value`` minus the same repeat's bare round."""
    pairs = zip(results[name], results["bare"], strict=True)
    return statistics.median(value(r) - value(bare) for r, bare in pairs)


def report(results: dict[str, list[Round]]) -> None:
    print(
        f"{'approach':<12} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'p50 added':>10} {'p99 added':>10}"
    )
    for name in APPROACHES:
        rounds = results[name]
        line = (
            f"{name:<12} {median_of(rounds, lambda r: r.throughput):>9,.0f} "
            f"{median_of(rounds, lambda r: r.p50_ms):>8.1f} "
            f"{median_of(rounds, lambda r: r.p99_ms):>8.1f}"
        )
        if name != "bare":
            line += (
                f" {added(results, name, lambda r: r.p50_ms):>10.1f}"
                f" {added(results, name, lambda r: r.p99_ms):>10.1f}"
            )
        print(line)
    print()
    print("per repeat (calls/s):")
    for name in APPROACHES:
        print(f"  {name:<12} " + " ".join(f"{r.throughput:>7,.0f}" for r in results[name]))
    pool, native = results["thread-pool"], results["async"]
    throughput = median_of(native, lambda r: r.throughput) / median_of(pool, lambda r: r.throughput)
    p50 = added_ratio(results, lambda r: r.p50_ms)
    p99 = added_ratio(results, lambda r: r.p99_ms)
    p99_total = median_of(native, lambda r: r.p99_ms) / median_of(pool, lambda r: r.p99_ms)
    print()
    print(
        f"async / thread-pool: throughput {throughput:.2f}x, "
        f"p50 added latency {p50}, p99 added latency {p99} (p99 itself {p99_total:.2f}x)"
    )


def added_ratio(results: dict[str, list[Round]], value: Callable[[Round], float]) -> str:
    """async's added latency over thread-pool's, or why there is no ratio."""
    native, pool = added(results, "async", value), added(results, "thread-pool", value)
    if native <= 0 or pool <= 0:
        return "n/a (an added latency <= 0: bare was slower)"
    return f"{native / pool:.2f}x"


def _serve(latency: float, urls: Any, stop: Any) -> None:
    with LoopbackAPI(latency=latency) as api:
        urls.put(api.url)
        stop.wait()


@contextmanager
def loopback_process(latency: float) -> Iterator[str]:
    """The loopback server in a process of its own (not competing with the
    client for this process's interpreter lock); its URL."""
    context = multiprocessing.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    server = context.Process(target=_serve, args=(latency, urls, stop), daemon=True)
    server.start()
    try:
        yield str(urls.get(timeout=30))
    finally:
        stop.set()
        server.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a scratch database URL")
    parser.add_argument("--calls", type=int, default=1000, help="concurrent calls per round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--max-connections",
        type=int,
        default=100,
        help="httpx connection limit, the same for the three approaches",
    )
    parser.add_argument(
        "--server-latency", type=float, default=0.0, help="seconds the server waits per request"
    )
    options = parser.parse_args()
    connections = options.max_connections
    with CallRecorder(options.db) as recorder:
        recorder.upgrade()
    with loopback_process(options.server_latency) as url:
        results = asyncio.run(measure(options.db, url, options.calls, options.repeats, connections))
    print(
        f"{options.calls} concurrent calls per round, {options.repeats} repeats, "
        f"max {connections} connections, server latency {options.server_latency * 1000:g} ms; "
        "medians over repeats"
    )
    report(results)


if __name__ == "__main__":
    main()
