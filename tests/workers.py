"""Worker processes for the concurrency tests: one process, one recorder,
one connection pool each; results travel back through a queue.

Processes are spawned (not forked) so that no engine or connection is ever
shared with the parent.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import queue
import sqlite3
import time
from collections.abc import Callable, Sequence
from multiprocessing.synchronize import Barrier
from typing import Any

import psycopg
from sqlalchemy import create_engine, exc, text

from callindex import CallRecorder, DatabaseRetryPolicy, UnknownCallError

SPAWN = multiprocessing.get_context("spawn")


def run_workers(
    target: Callable[..., Any], args_per_worker: Sequence[tuple[Any, ...]], timeout: float = 120
) -> list[Any]:
    """Run ``target(barrier, results, *args)`` in one process per args tuple,
    all released together by ``barrier``; return what each put on ``results``."""
    barrier = SPAWN.Barrier(len(args_per_worker))
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=target, args=(barrier, results, *args)) for args in args_per_worker
    ]
    for process in processes:
        process.start()
    collected = []
    try:
        for _ in processes:
            collected.append(results.get(timeout=timeout))
    except queue.Empty:
        raise AssertionError(f"a worker sent no result within {timeout}s") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    assert not failed, f"worker processes exited with {failed}"
    errors = [r for r in collected if isinstance(r, str)]
    assert not errors, errors
    return collected


def spawn_until_held(target: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """Start ``target(*args, held, report)`` in a process and wait until it sets
    ``held``; return the process and its ``report`` queue."""
    held = SPAWN.Event()
    report = SPAWN.Queue()
    process = SPAWN.Process(target=target, args=(*args, held, report))
    process.start()
    assert held.wait(timeout=60), "the worker never reached the point to stop it at"
    return process, report


def allocate_many(
    barrier: Barrier, results: Any, url: str, state_id: str, times: int, count: int = 1
) -> None:
    """Allocate ``times`` blocks of ``count`` and report ``[(first, count), ...]``."""
    try:
        with CallRecorder(url) as recorder:
            barrier.wait()
            blocks = [(recorder.allocate_call_index(state_id, count), count) for _ in range(times)]
        results.put(blocks)
    except Exception as error:  # reported to the parent, which fails the test
        results.put(f"{type(error).__name__}: {error}")


def allocate_once(url: str, state_id: str, started: Any, results: Any) -> None:
    """Signal ``started``, allocate one index, report it."""
    try:
        with CallRecorder(url) as recorder:
            recorder.engine.connect().close()  # connect before signalling
            started.set()
            results.put(recorder.allocate_call_index(state_id))
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


class _RetryCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.retries += 1


def count_retries() -> _RetryCounter:
    """Count the retries callindex logs in this process."""
    counter = _RetryCounter()
    logging.getLogger("callindex.retry").addHandler(counter)
    return counter


def record_many(
    barrier: Barrier,
    results: Any,
    url: str,
    worker: str,
    states: list[str],
    calls: int,
    policy: DatabaseRetryPolicy | None = None,
    pause: float = 0.0,
    open_states: bool = False,
    engine_connect_args: dict[str, Any] | None = None,
    early_release: bool | None = None,
    auto_open: bool = False,
) -> None:
    """Record ``calls`` calls round-robin over ``states`` (opening each first
    when ``open_states``; by the recorder when ``auto_open``), alternating
    one-shot and two-phase calls; report
    ``{"acknowledged": {call_id: [state, index]}, "retries": n}``. Only calls
    whose write returned are acknowledged. With ``engine_connect_args`` the
    recorder is built from an SQLAlchemy Engine made with them."""
    try:
        retries = count_retries()
        acknowledged: dict[str, tuple[str, int]] = {}
        target: Any = url
        if engine_connect_args is not None:
            target = create_engine(url, connect_args=engine_connect_args)
        with CallRecorder(
            target, retry=policy, early_release=early_release, auto_open=auto_open
        ) as recorder:
            barrier.wait()
            for n in range(calls):
                state_id = states[n % len(states)]
                if open_states and n < len(states):
                    recorder.open_state(state_id)
                call_id = f"{worker}-{n}"
                if n % 2:
                    begun = recorder.begin_call(state_id, "llm", {"n": n}, call_id=call_id)
                    call = recorder.finish_call(begun.call_id, "success", {"n": n})
                else:
                    call = recorder.record_call(
                        state_id, "http", "success", {"n": n}, call_id=call_id
                    )
                acknowledged[call.call_id] = (call.state_id, call.call_index)
                if pause:
                    time.sleep(pause)
        results.put({"acknowledged": acknowledged, "retries": retries.retries})
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def record_many_async(
    barrier: Barrier,
    results: Any,
    url: str,
    worker: str,
    states: list[str],
    tasks: int,
    calls_per_task: int,
) -> None:
    """``tasks`` concurrent asyncio tasks on one :class:`AsyncCallRecorder`, each
    recording ``calls_per_task`` calls round-robin over ``states`` (one-shot
    and two-phase alternating); reports like :func:`record_many`."""
    import asyncio

    from callindex import AsyncCallRecorder

    async def main() -> dict[str, tuple[str, int]]:
        acknowledged: dict[str, tuple[str, int]] = {}
        async with AsyncCallRecorder(url) as recorder:

            async def task(t: int) -> None:
                for n in range(calls_per_task):
                    state_id = states[(t + n) % len(states)]
                    call_id = f"{worker}-{t}-{n}"
                    if n % 2:
                        begun = await recorder.begin_call(state_id, "llm", {"n": n}, call_id)
                        call = await recorder.finish_call(begun.call_id, "success", {"n": n})
                    else:
                        call = await recorder.record_call(
                            state_id, "http", "success", {"n": n}, call_id=call_id
                        )
                    acknowledged[call.call_id] = (call.state_id, call.call_index)

            await recorder.is_open(states[0])  # connect before the start line
            barrier.wait()
            await asyncio.gather(*(task(t) for t in range(tasks)))
        return acknowledged

    try:
        retries = count_retries()
        acknowledged = asyncio.run(main())
        results.put({"acknowledged": acknowledged, "retries": retries.retries})
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def record_same_ids(barrier: Barrier, results: Any, url: str, state_id: str, calls: int) -> None:
    """Record call ids ``same-0..`` that another process records at the same time."""
    try:
        with CallRecorder(url) as recorder:
            barrier.wait()
            got = {}
            for n in range(calls):
                call = recorder.record_call(
                    state_id, "http", "success", {"n": n}, call_id=f"same-{n}"
                )
                got[call.call_id] = call.call_index
        results.put(got)
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def allocate_pairs(
    barrier: Barrier, results: Any, url: str, states: list[str], rounds: int
) -> None:
    """Allocate for several states in one caller transaction, ``rounds`` times."""
    try:
        retries = count_retries()
        got: list[dict[str, int]] = []
        with CallRecorder(url) as recorder:
            barrier.wait()
            for _ in range(rounds):
                with recorder.engine.begin() as conn:
                    got.append(
                        recorder.allocate_call_indices(dict.fromkeys(states, 1), connection=conn)
                    )
                    time.sleep(0.001)
        results.put({"allocated": got, "retries": retries.retries})
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def lock_in_given_order(
    barrier: Barrier, results: Any, url: str, states: list[str], rounds: int
) -> None:
    """The control: bump counters in the order given, pausing between them, as
    code that does not sort would. Reports how many rounds hit a deadlock."""
    deadlocks = 0
    with CallRecorder(url) as recorder:
        barrier.wait()
        for _ in range(rounds):
            try:
                with recorder.engine.begin() as conn:
                    for state_id in states:
                        conn.execute(
                            text(
                                "UPDATE call_index_counters SET next_index = next_index + 1 "
                                "WHERE state_id = :s"
                            ),
                            {"s": state_id},
                        )
                        time.sleep(0.01)
            except exc.OperationalError as error:
                if getattr(error.orig, "sqlstate", None) != "40P01":
                    raise
                deadlocks += 1
    results.put(deadlocks)


def hold_allocation(url: str, state_id: str, held: Any, report: Any) -> None:
    """Allocate inside an open transaction, report the index, then hang until killed."""
    with CallRecorder(url) as recorder, recorder.engine.begin() as conn:
        report.put(recorder.allocate_call_index(state_id, connection=conn))
        held.set()
        time.sleep(600)


def hang_between_begin_and_finish(url: str, state_id: str, held: Any, report: Any) -> None:
    """Begin a call, report it, then hang (as if the external call never returned)."""
    with CallRecorder(url) as recorder:
        call = recorder.begin_call(state_id, "http", {"url": "https://slow.example"})
        report.put((call.call_id, call.call_index))
        held.set()
        time.sleep(600)


def hold_sqlite_write_lock(path: str, held: Any, seconds: float) -> None:
    """Take SQLite's write lock with BEGIN IMMEDIATE and keep it for ``seconds``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    held.set()
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


def call_with_both_clients(
    barrier: Barrier, results: Any, url: str, api_url: str, state_id: str, calls: int
) -> None:
    """Make ``calls`` HTTP calls and ``calls`` LLM calls on one state, interleaved."""
    from callindex import AuditedHTTPClient, AuditedLLMClient

    try:
        with (
            CallRecorder(url) as recorder,
            AuditedHTTPClient(recorder, state_id, base_url=api_url) as http,
            AuditedLLMClient(recorder, state_id, base_url=f"{api_url}/v1", model="m") as llm,
        ):
            barrier.wait()
            for n in range(calls):
                http.get(f"/items/{n}").raise_for_status()
                llm.chat([{"role": "user", "content": f"call {n}"}])
        results.put(calls * 2)
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def request_and_hang(url: str, api_url: str, state_id: str, held: Any, report: Any) -> None:
    """Start a request the server answers very slowly; the parent kills us mid-request."""
    from callindex import AuditedHTTPClient

    with (
        CallRecorder(url) as recorder,
        AuditedHTTPClient(recorder, state_id, base_url=api_url) as http,
    ):
        held.set()
        http.get("/items/slow")


def upgrade_once(barrier: Barrier, results: Any, url: str) -> None:
    """Upgrade the schema, released at the same moment as the other workers."""
    try:
        with CallRecorder(url) as recorder:
            barrier.wait()
            recorder.upgrade()
        results.put(True)
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def legacy_write_many(
    barrier: Barrier, results: Any, url: str, states: list[str], calls: int, pause: float = 0.0
) -> None:
    """The upstream writer in a process of its own: ``calls`` inserts round-robin
    over ``states``; report ``{"recorded": [call_id], "lost": n, "slowest": s}``."""
    from legacy import LegacyWriter

    try:
        writer = LegacyWriter(url)
        recorded, lost, slowest = [], 0, 0.0
        barrier.wait()
        for n in range(calls):
            outcome = writer.record(states[n % len(states)])
            if outcome is None:
                lost += 1
            else:
                recorded.append(outcome[0])
                slowest = max(slowest, outcome[1])
            if pause:
                time.sleep(pause)
        writer.close()
        results.put({"recorded": recorded, "lost": lost, "slowest": slowest})
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def backfill_after_barrier(barrier: Barrier, results: Any, url: str, delay: float) -> None:
    """callindex's counter backfill, a state per transaction, ``delay`` seconds
    after the writers start; reports ``{"states": n, "batches": n}``."""
    from callindex import adoption
    from callindex.database import Database

    try:
        barrier.wait()
        time.sleep(delay)
        states, batches = adoption.backfill_counters(Database(url), batch_states=1)
        results.put({"states": states, "batches": batches})
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def write_as(barrier: Barrier, results: Any, kind: str, *args: Any) -> None:
    """One worker of a mixed run, tagged with its ``kind``: "legacy"
    (legacy_write_many), "callindex" (record_many) or "backfill"."""
    target = {
        "legacy": legacy_write_many,
        "callindex": record_many,
        "backfill": backfill_after_barrier,
    }[kind]

    class Tag:
        def put(self, value: Any) -> None:
            results.put(value if isinstance(value, str) else {"kind": kind, **value})

    target(barrier, Tag(), *args)


def record_through_version_1(
    barrier: Barrier, results: Any, dsn: str, worker: str, state_id: str, calls: int, pause: float
) -> None:
    """A worker of an earlier callindex during a rolling upgrade: it records
    ``calls`` calls through the version-1 function ``callindex_record_call``
    (payloads as JSON text) and reports ``{"acknowledged": {...}}``."""
    try:
        request = "{}"
        request_hash = hashlib.sha256(request.encode()).hexdigest()
        acknowledged: dict[str, tuple[str, int]] = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            barrier.wait()
            for n in range(calls):
                call_id = f"{worker}-{n}"
                row = conn.execute(
                    "SELECT call_index FROM callindex_record_call("
                    "%s, %s, 'http', 'success', %s::text, %s, NULL::text, NULL, NULL::text, "
                    "NULL, NULL)",
                    (call_id, state_id, request, request_hash),
                ).fetchone()
                assert row is not None, "the state is open"
                acknowledged[call_id] = (state_id, row[0])
                time.sleep(pause)
        results.put({"acknowledged": acknowledged})
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def record_through_failover(
    barrier: Barrier,
    results: Any,
    url: str,
    worker: str,
    stop: Any,
    early_release: bool,
    last_returned: Any,
    slot: int,
) -> None:
    """Until ``stop`` is set, cycle through ``record_call`` on the shared state,
    ``begin_call``/``finish_call`` on the worker's own state, a reservation of
    three indices on the shared state and ``record_call`` on the own state;
    report what was acknowledged, when each operation returned, and how many
    database retries it took. ``last_returned[slot]`` follows the last return."""
    try:
        retries = count_retries()
        policy = DatabaseRetryPolicy(
            max_attempts=1_000, max_seconds=60, initial_wait=0.05, max_wait=0.5, attempt_timeout=5
        )
        own = f"{worker}-own"
        acknowledged: dict[str, tuple[str, int]] = {}
        reservations: list[tuple[str, int, int]] = []
        returned: list[float] = []
        lost_begins = 0
        with CallRecorder(url, retry=policy, early_release=early_release) as recorder:
            recorder.open_state(own)
            barrier.wait()
            n = 0
            while not stop.is_set():
                call_id = f"{worker}-{n}"
                step = n % 4
                if step == 0:
                    call = recorder.record_call(
                        "shared", "http", "success", {"n": n}, call_id=call_id
                    )
                elif step == 1:
                    begun = recorder.begin_call(own, "llm", {"n": n}, call_id=call_id)
                    try:
                        call = recorder.finish_call(begun.call_id, "success", {"n": n})
                    except UnknownCallError:
                        # Begun on a primary whose asynchronous standby never
                        # got it, then promoted: the pending call is gone.
                        lost_begins += 1
                        n += 1
                        continue
                elif step == 2:
                    first = recorder.allocate_call_index("shared", 3)
                    reservations.append(("shared", first, 3))
                else:
                    call = recorder.record_call(own, "http", "success", {"n": n}, call_id=call_id)
                if step != 2:
                    acknowledged[call.call_id] = (call.state_id, call.call_index)
                returned.append(time.time())
                last_returned[slot] = returned[-1]
                n += 1
                time.sleep(0.002)
        results.put(
            {
                "acknowledged": acknowledged,
                "reservations": reservations,
                "returned": returned,
                "retries": retries.retries,
                "lost_begins": lost_begins,
            }
        )
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")
