"""``AsyncCallRecorder``: the recorder's methods for asyncio, with the same
guarantees, on PostgreSQL (psycopg's asyncio connections) and SQLite (a
worker thread per file).

Every test checks the table afterwards (``assert_trail_sound``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, create_engine, event, make_url, text

from callindex import (
    AsyncAuditedHTTPClient,
    AsyncAuditedLLMClient,
    AsyncCallRecorder,
    AuditedHTTPClient,
    CallAlreadyFinishedError,
    CallIdConflictError,
    CallRecorder,
    ConfigurationError,
    IndexNotReservedError,
    IndexTakenError,
    InvalidCallError,
    InvalidStateIdError,
    UnknownCallError,
    UnknownStateError,
)
from callindex.loopback import LoopbackAPI, Reply

from conftest import PG_URL, assert_trail_sound, call_rows, counter_value
from workers import record_many_async, run_workers

T = TypeVar("T")


def run(
    url: str | Engine, scenario: Callable[[AsyncCallRecorder], Awaitable[T]], **options: Any
) -> T:
    """``scenario(recorder)`` on a new event loop, with a recorder closed afterwards."""

    async def main() -> T:
        async with AsyncCallRecorder(url, **options) as recorder:
            return await scenario(recorder)

    return asyncio.run(main())


def acknowledged(calls: list[Any]) -> dict[str, tuple[str, int]]:
    return {call.call_id: (call.state_id, call.call_index) for call in calls}


class TestTheSameMethodsAsTheSyncRecorder:
    def test_allocation_recording_and_reading(self, db_url: str) -> None:
        async def scenario(recorder: AsyncCallRecorder) -> None:
            await recorder.open_state("s1")
            await recorder.open_state("s1")  # idempotent
            assert await recorder.is_open("s1")
            assert not await recorder.is_open("nowhere")
            first = await recorder.record_call("s1", "http", "success", {"q": 1}, {"a": 1})
            begun = await recorder.begin_call("s1", "llm", {"prompt": "hi"})
            assert (first.call_index, begun.call_index, begun.status) == (0, 1, "pending")
            finished = await recorder.finish_call(begun.call_id, "success", {"text": "hello"})
            assert (finished.status, finished.response) == ("success", {"text": "hello"})
            assert await recorder.allocate_call_index("s1", 3) == 2
            await recorder.open_state("s2")
            assert await recorder.allocate_call_indices({"s2": 2, "s1": 1}) == {"s1": 5, "s2": 0}
            at = await recorder.record_call("s1", "sql", "success", {}, call_index=3)
            assert at.call_index == 3
            stored = await recorder.calls("s1")
            assert [c.call_index for c in stored] == [0, 1, 3]
            assert await recorder.get_call(first.call_id) == stored[0]
            assert await recorder.get_call("never-recorded") is None
            assert stored[0].request_hash is not None
            found = await recorder.calls_with_request_hash(stored[0].request_hash)
            assert [c.call_id for c in found] == [first.call_id]
            report = await recorder.verify(hashes=True)
            assert report.ok, report.as_json()

        run(db_url, scenario)
        # What the async recorder wrote, the sync recorder reads the same way.
        with CallRecorder(db_url) as sync:
            assert [c.call_index for c in sync.calls("s1")] == [0, 1, 3]
            assert sync.calls("s1")[1].response == {"text": "hello"}

    def test_a_call_id_is_recorded_once(self, db_url: str) -> None:
        async def scenario(recorder: AsyncCallRecorder) -> None:
            await recorder.open_state("s1")
            once = await recorder.record_call("s1", "http", "success", {"n": 1}, call_id="c1")
            again = await recorder.record_call("s1", "http", "success", {"n": 1}, call_id="c1")
            assert again == once
            with pytest.raises(CallIdConflictError):
                await recorder.record_call("s1", "http", "success", {"n": 2}, call_id="c1")
            begun = await recorder.begin_call("s1", "llm", {}, call_id="c2")
            assert await recorder.begin_call("s1", "llm", {}, call_id="c2") == begun
            await recorder.finish_call("c2", "error", error={"type": "timeout"})
            await recorder.finish_call("c2", "error", error={"type": "timeout"})  # same: fine
            with pytest.raises(CallAlreadyFinishedError):
                await recorder.finish_call("c2", "success", {"late": True})
            with pytest.raises(UnknownCallError):
                await recorder.finish_call("c3", "success")

        run(db_url, scenario)
        assert [row[2] for row in call_rows(db_url)] == [0, 1]
        assert counter_value(db_url, "s1") == 2

    def test_refusals_are_typed_and_write_nothing(self, db_url: str) -> None:
        async def scenario(recorder: AsyncCallRecorder) -> None:
            with pytest.raises(UnknownStateError):
                await recorder.record_call("never-opened", "http", "success", {})
            with pytest.raises(UnknownStateError):
                await recorder.allocate_call_index("never-opened")
            await recorder.open_state("s1")
            with pytest.raises(InvalidStateIdError):
                await recorder.record_call("", "http", "success", {})
            with pytest.raises(InvalidCallError):
                await recorder.record_call("s1", "HTTP!", "success", {})
            with pytest.raises(InvalidCallError):
                await recorder.record_call("s1", "http", "pending", {})
            with pytest.raises(InvalidCallError):
                await recorder.record_call("s1", "http", "success", {}, latency_ms=-1)
            with pytest.raises(IndexNotReservedError):
                await recorder.record_call("s1", "http", "success", {}, call_index=0)
            await recorder.allocate_call_index("s1")
            await recorder.record_call("s1", "http", "success", {}, call_index=0)
            with pytest.raises(IndexTakenError):
                await recorder.record_call("s1", "http", "success", {"b": 1}, call_index=0)

        run(db_url, scenario)
        assert len(call_rows(db_url)) == 1
        assert counter_value(db_url, "s1") == 1
        assert counter_value(db_url, "never-opened") is None

    def test_auto_open(self, db_url: str) -> None:
        async def scenario(recorder: AsyncCallRecorder) -> list[int]:
            calls = [await recorder.record_call("new", "http", "success", {}) for _ in range(3)]
            return [call.call_index for call in calls]

        assert run(db_url, scenario, auto_open=True) == [0, 1, 2]

    def test_a_sync_client_refuses_an_async_recorder(self, db_url: str) -> None:
        async def scenario(recorder: AsyncCallRecorder) -> None:
            with pytest.raises(ConfigurationError, match="AsyncCallRecorder"):
                AuditedHTTPClient(recorder, "s1")

        run(db_url, scenario)


class _RefusingExecutor(ThreadPoolExecutor):
    """A default executor that fails any work handed to a thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        raise AssertionError(f"{fn!r} was sent to a worker thread")


def test_postgresql_writes_and_reads_need_no_thread(postgresql_url: str) -> None:
    """After the first write (which checks the schema revision once), every
    allocation, record and read runs on the event loop: a default executor
    that refuses work is never called, and no thread is started."""

    async def scenario(recorder: AsyncCallRecorder) -> list[Any]:
        await recorder.open_state("s1")
        asyncio.get_running_loop().set_default_executor(_RefusingExecutor())
        threads = threading.active_count()

        async def one(n: int) -> Any:
            call = await recorder.record_call("s1", "http", "success", {"n": n})
            begun = await recorder.begin_call("s1", "llm", {"n": n})
            await recorder.finish_call(begun.call_id, "success", {"n": n})
            await recorder.get_call(call.call_id)
            return [call, begun]

        pairs = await asyncio.gather(*(one(n) for n in range(100)))
        await recorder.allocate_call_index("s1")
        await recorder.calls("s1")
        assert threading.active_count() <= threads  # none started
        return [call for pair in pairs for call in pair]

    calls = run(postgresql_url, scenario)
    assert sorted(call.call_index for call in calls) == list(range(200))
    assert_trail_sound(postgresql_url, acknowledged(calls), gapless=False)  # 200 is allocated


def test_many_processes_with_many_tasks_each_share_one_hot_state(db_url: str) -> None:
    """Four processes, each with 25 concurrent tasks on one AsyncCallRecorder,
    recording 8 calls per task on a hot state and a cold one."""
    with CallRecorder(db_url) as recorder:
        recorder.open_state("hot")
        recorder.open_state("cold")
    plans = [(db_url, f"w{n}", ["hot", "hot", "hot", "cold"], 25, 8) for n in range(4)]
    results = run_workers(record_many_async, plans, timeout=240)
    merged: dict[str, tuple[str, int]] = {}
    for result in results:
        merged.update({cid: (s, i) for cid, (s, i) in result["acknowledged"].items()})
    assert len(merged) == 4 * 25 * 8
    assert len(call_rows(db_url)) == 800
    assert_trail_sound(db_url, merged)  # no duplicate, nothing lost, no gap


# Seconds between starting a write and cancelling it, from before it starts
# (None: the task never ran) to about when it commits.
_CANCEL_AFTER = (None, 0, 0.0001, 0.0003, 0.0006, 0.001, 0.0015, 0.002, 0.003)


class TestCancellationMidWrite:
    """A cancelled ``record_call`` is recorded whole or not at all, and a
    retry with the same ``call_id`` finds out which."""

    def test_cancelled_at_random_points_then_retried(self, db_url: str) -> None:
        rng = random.Random(7)

        async def scenario(recorder: AsyncCallRecorder) -> tuple[list[Any], dict[str, int]]:
            await recorder.open_state("s1")
            seen = {"recorded": 0, "not recorded": 0}
            calls = []
            for n in range(120):
                call_id = f"c{n}"
                write = asyncio.create_task(
                    recorder.record_call("s1", "http", "success", {"n": n}, call_id=call_id)
                )
                delay = rng.choice(_CANCEL_AFTER)
                if delay is not None:
                    await asyncio.sleep(delay)
                write.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await write
                seen["recorded" if await recorder.get_call(call_id) else "not recorded"] += 1
                retried = await recorder.record_call(
                    "s1", "http", "success", {"n": n}, call_id=call_id
                )
                calls.append(retried)
            return calls, seen

        calls, seen = run(db_url, scenario)
        print(f"cancelled writes: {seen}")
        assert seen["recorded"] and seen["not recorded"]
        assert len({call.call_id for call in calls}) == 120
        assert len(call_rows(db_url)) == 120  # each call exactly once
        assert_trail_sound(db_url, acknowledged(calls))  # and without a gap

    def test_postgresql_cancelled_while_waiting_for_the_counter_row(
        self, postgresql_url: str
    ) -> None:
        """The statement is cancelled on the server: nothing is written, the
        counter is untouched, and the retry records the call at the index the
        cancelled write would have had."""
        dsn = make_url(postgresql_url).set(drivername="postgresql").render_as_string(False)
        with CallRecorder(postgresql_url) as sync:
            sync.open_state("s1")

        async def scenario(recorder: AsyncCallRecorder) -> Any:
            await recorder.is_open("s1")
            with psycopg.connect(dsn) as holder:
                holder.execute("SELECT * FROM call_index_counters WHERE state_id = 's1' FOR UPDATE")
                write = asyncio.create_task(
                    recorder.record_call("s1", "http", "success", {}, call_id="c1")
                )
                await _until_waiting_for_a_lock(dsn)
                write.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await write
                holder.rollback()
            assert await recorder.get_call("c1") is None
            return await recorder.record_call("s1", "http", "success", {}, call_id="c1")

        call = run(postgresql_url, scenario)
        assert call.call_index == 0
        assert counter_value(postgresql_url, "s1") == 1
        assert_trail_sound(postgresql_url, acknowledged([call]))

    def test_sqlite_cancelled_while_its_worker_writes(self, sqlite_url: str) -> None:
        """The worker thread finishes the transaction it began: the call is
        recorded, and the retry returns it instead of recording it again."""
        path = make_url(sqlite_url).database
        assert path is not None
        with CallRecorder(sqlite_url) as sync:
            sync.open_state("s1")

        async def scenario(recorder: AsyncCallRecorder) -> Any:
            await recorder.is_open("s1")
            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            write = asyncio.create_task(
                recorder.record_call("s1", "http", "success", {}, call_id="c1")
            )
            await asyncio.sleep(0.3)  # the worker is inside the write, waiting for the lock
            write.cancel()
            with pytest.raises(asyncio.CancelledError):
                await write
            holder.execute("ROLLBACK")
            holder.close()
            for _ in range(100):  # the abandoned write completes on the worker
                if await recorder.get_call("c1"):
                    break
                await asyncio.sleep(0.05)
            assert await recorder.get_call("c1") is not None
            return await recorder.record_call("s1", "http", "success", {}, call_id="c1")

        call = run(sqlite_url, scenario)
        assert call.call_index == 0
        assert len(call_rows(sqlite_url)) == 1
        assert_trail_sound(sqlite_url, acknowledged([call]))


async def _until_waiting_for_a_lock(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(200):
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'callindex' AND wait_event_type = 'Lock'"
            )
            row = await cursor.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the write never waited for the counter row")


@pytest.fixture
def api() -> Iterator[LoopbackAPI]:
    with LoopbackAPI() as server:
        yield server


class TestTheAsyncClientsOnAnAsyncRecorder:
    def test_http_and_llm_calls_with_a_retry_share_one_numbering(
        self, db_url: str, api: LoopbackAPI
    ) -> None:
        async def scenario(recorder: AsyncCallRecorder) -> None:
            await recorder.open_state("s1")
            api.plan(Reply.too_many_requests("0"))
            async with (
                AsyncAuditedHTTPClient(recorder, "s1", base_url=api.url) as http,
                AsyncAuditedLLMClient(
                    recorder, "s1", base_url=f"{api.url}/v1", model="m", api_key="sk-secret-1"
                ) as llm,
            ):
                responses = await asyncio.gather(
                    *(http.get(f"/items/{n}") for n in range(10)),
                    *(llm.chat([{"role": "user", "content": f"q{n}"}]) for n in range(5)),
                )
            assert len(responses) == 15

        run(db_url, scenario)
        with CallRecorder(db_url) as sync:
            calls = sync.calls("s1")
        assert [c.call_index for c in calls] == list(range(16))  # 15 calls and one 429
        assert sorted(c.status for c in calls).count("error") == 1
        assert all(c.status in {"success", "error"} for c in calls)
        assert {c.call_type for c in calls} == {"http", "llm"}
        assert "sk-secret-1" not in str([c.as_json() for c in calls])
        assert_trail_sound(db_url, acknowledged(calls))

    def test_a_request_cancelled_in_flight_is_finished_as_cancelled(
        self, db_url: str, api: LoopbackAPI
    ) -> None:
        async def scenario(recorder: AsyncCallRecorder) -> None:
            await recorder.open_state("s1")
            api.plan(Reply(delay=2.0))
            async with AsyncAuditedHTTPClient(recorder, "s1", base_url=api.url, retry=None) as http:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(http.get("/items/1"), 0.3)

        run(db_url, scenario)
        with CallRecorder(db_url) as sync:
            (call,) = sync.calls("s1")
        assert (call.status, call.error["type"]) == ("error", "cancelled")
        assert_trail_sound(db_url, acknowledged([call]))

    def test_a_failed_begin_means_the_request_is_not_sent(
        self, db_url: str, api: LoopbackAPI
    ) -> None:
        async def scenario(recorder: AsyncCallRecorder) -> None:
            async with AsyncAuditedHTTPClient(recorder, "unopened", base_url=api.url) as http:
                with pytest.raises(UnknownStateError):
                    await http.get("/items/1")

        run(db_url, scenario)
        assert api.stats["requests"] == 0
        assert call_rows(db_url) == []

    @pytest.mark.parametrize("pause_in", ["begin_call", "finish_call"])
    def test_a_task_cancelled_while_its_call_is_being_recorded(
        self, db_url: str, api: LoopbackAPI, pause_in: str
    ) -> None:
        """``Task.cancel()`` (asyncio's own, not an anyio scope) lands while
        ``begin_call`` has written its row but not returned, or while
        ``finish_call`` is about to write: the recording ends all the same,
        and the cancellation reaches the caller afterwards."""

        async def main() -> None:
            recorder = _PausingRecorder(db_url, pause_in=pause_in)
            async with recorder:
                await recorder.open_state("s1")
                async with AsyncAuditedHTTPClient(
                    recorder, "s1", base_url=api.url, retry=None
                ) as http:
                    task = asyncio.create_task(http.get("/items/1"))
                    await recorder.pausing.wait()
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task

        asyncio.run(main())
        with CallRecorder(db_url) as sync:
            (call,) = sync.calls("s1")
        if pause_in == "begin_call":  # not sent, and finished as cancelled
            assert api.stats["requests"] == 0
            assert (call.status, call.error["type"]) == ("error", "cancelled")
        else:  # the response came: finished with it
            assert api.stats["requests"] == 1
            assert (call.status, call.response["status_code"]) == ("success", 200)
        assert len(call_rows(db_url)) == 1
        assert_trail_sound(db_url, acknowledged([call]))


class _PausingRecorder(AsyncCallRecorder):
    """Pauses for a while in ``begin_call`` after its row is written, or in
    ``finish_call`` before it writes (``pause_in``), and sets ``pausing``."""

    def __init__(self, url: str, *, pause_in: str) -> None:
        super().__init__(url)
        self.pause_in = pause_in
        self.pausing = asyncio.Event()

    async def _pause(self, method: str) -> None:
        if method == self.pause_in:
            self.pausing.set()
            await asyncio.sleep(0.5)

    async def begin_call(self, *args: Any, **kwargs: Any) -> Any:
        call = await super().begin_call(*args, **kwargs)
        await self._pause("begin_call")
        return call

    async def finish_call(self, *args: Any, **kwargs: Any) -> Any:
        await self._pause("finish_call")
        return await super().finish_call(*args, **kwargs)


def test_the_recorder_works_on_successive_event_loops(db_url: str) -> None:
    with CallRecorder(db_url) as sync:
        sync.open_state("s1")

    async def record(recorder: AsyncCallRecorder) -> int:
        return (await recorder.record_call("s1", "http", "success", {})).call_index

    recorder = AsyncCallRecorder(db_url)
    try:
        assert [asyncio.run(record(recorder)) for _ in range(3)] == [0, 1, 2]
    finally:
        asyncio.run(recorder.close())
    with CallRecorder(db_url) as sync, sync.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM calls")).scalar_one() == 3


def test_close_releases_every_connection(postgresql_url: str) -> None:
    database = make_url(postgresql_url).database

    async def scenario(recorder: AsyncCallRecorder) -> None:
        await recorder.open_state("s1")
        await asyncio.gather(
            *(recorder.record_call("s1", "http", "success", {}) for _ in range(40))
        )

    run(postgresql_url, scenario)
    dsn = make_url(postgresql_url).set(drivername="postgresql", database="postgres")
    deadline = time.monotonic() + 10
    with psycopg.connect(dsn.render_as_string(False), autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'callindex'",
                (database,),
            ).fetchone()
            if (row and row[0] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert row is not None and row[0] == 0


def _connections(
    database: str | None, name: str = "callindex", *, settled_at: int | None = None
) -> int:
    """The server's sessions of ``database`` with application name ``name``;
    with ``settled_at``, once that many are left (or after 10 s: a closed
    session takes a moment to leave ``pg_stat_activity``)."""
    dsn = make_url(PG_URL).set(drivername="postgresql", database="postgres")
    deadline = time.monotonic() + 10
    with psycopg.connect(dsn.render_as_string(False), autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = %s",
                (database, name),
            ).fetchone()
            assert row is not None
            if settled_at is None or row[0] == settled_at or time.monotonic() > deadline:
                return int(row[0])
            time.sleep(0.05)


def test_the_connections_of_an_event_loop_are_closed_with_it(postgresql_url: str) -> None:
    """Each event loop gets connections of its own, closed when the loop shuts
    down (``asyncio.run`` ends), else found closed by the next loop, else when
    the recorder closes: used on loop after loop, the recorder keeps none of a
    loop that is gone."""
    database = make_url(postgresql_url).database
    with CallRecorder(postgresql_url) as sync:
        sync.open_state("s1")

    async def busy(recorder: AsyncCallRecorder) -> int:
        await asyncio.gather(
            *(recorder.record_call("s1", "http", "success", {}) for _ in range(40))
        )
        return _connections(database)

    def left(recorder: AsyncCallRecorder) -> int:
        recorder.engine.dispose()  # the engine's own pool (it checked the schema) aside
        return _connections(database, settled_at=0)

    recorder = AsyncCallRecorder(postgresql_url)
    unfinished = asyncio.new_event_loop()  # closed without shutting down: no hook runs
    running = asyncio.new_event_loop()  # still open when the recorder closes
    try:
        for _ in range(3):
            assert asyncio.run(busy(recorder)) >= 8
            assert left(recorder) == 0
        assert unfinished.run_until_complete(busy(recorder)) >= 8
        unfinished.close()
        assert _connections(database) >= 8
        assert asyncio.run(busy(recorder)) >= 8
        assert left(recorder) == 0
        assert running.run_until_complete(busy(recorder)) >= 8
    finally:
        asyncio.run(recorder.close())
        unfinished.close()
        running.close()
    assert _connections(database, settled_at=0) == 0
    assert len(call_rows(postgresql_url)) == 6 * 40


class TestAnEnginesConnectionArguments:
    """On an ``Engine``, the async recorder's own connections are made with the
    engine's connection arguments, as the sync recorder's are."""

    @pytest.fixture
    def elsewhere(self, postgresql_url: str) -> Iterator[Engine]:
        """An engine whose ``connect_args`` put its sessions in schema
        ``elsewhere`` (callindex's tables there too), under a name of their own."""
        dsn = make_url(postgresql_url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA elsewhere")
        engine = create_engine(
            postgresql_url,
            connect_args={
                "options": "-c search_path=elsewhere",
                "application_name": "callindex-elsewhere",
            },
        )
        try:
            with CallRecorder(engine) as sync:
                sync.upgrade()
                sync.open_state("s1")
            yield engine
        finally:
            engine.dispose()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DROP SCHEMA elsewhere CASCADE")

    def test_connect_args(self, postgresql_url: str, elsewhere: Engine) -> None:
        database = make_url(postgresql_url).database

        async def scenario(recorder: AsyncCallRecorder) -> list[Any]:
            recorded = await recorder.record_call("s1", "http", "success", {}, call_id="c1")
            begun = await recorder.begin_call("s1", "llm", {}, call_id="c2")
            finished = await recorder.finish_call(begun.call_id, "success", {"text": "hi"})
            assert [call.call_id for call in await recorder.calls("s1")] == ["c1", "c2"]
            assert _connections(database, "callindex-elsewhere") >= 1
            assert _connections(database) == 0  # none under the default name
            return [recorded, finished]

        calls = run(elsewhere, scenario)
        assert [(call.call_index, call.status) for call in calls] == [
            (0, "success"),
            (1, "success"),
        ]
        dsn = make_url(postgresql_url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(dsn) as conn:
            where = conn.execute(
                "SELECT (SELECT count(*) FROM elsewhere.calls), (SELECT count(*) FROM public.calls)"
            ).fetchone()
        assert where == (2, 0)

    def test_do_connect_listeners(self, postgresql_url: str, elsewhere: Engine) -> None:
        """A ``do_connect`` listener (one that sets a token per connection, say)
        changes the arguments of the async connections too."""
        database = make_url(postgresql_url).database

        @event.listens_for(elsewhere, "do_connect")
        def per_connection(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
            cparams["application_name"] = "callindex-listened"

        async def scenario(recorder: AsyncCallRecorder) -> int:
            await recorder.record_call("s1", "http", "success", {})
            return _connections(database, "callindex-listened")

        assert run(elsewhere, scenario) >= 1

    def test_an_engine_with_a_creator_of_its_own_is_refused(self, postgresql_url: str) -> None:
        """A ``creator`` makes sync driver connections only: the async recorder
        refuses the engine rather than connect some other way."""
        dsn = make_url(postgresql_url).set(drivername="postgresql").render_as_string(False)
        engine = create_engine(postgresql_url, creator=lambda: psycopg.connect(dsn))
        try:
            with pytest.raises(ConfigurationError, match="creator of its own"):
                AsyncCallRecorder(engine)
            with CallRecorder(engine) as sync:  # the sync recorder uses it
                sync.open_state("s1")
                assert sync.is_open("s1")
        finally:
            engine.dispose()


def _record_in_the_child(recorder: AsyncCallRecorder) -> None:
    async def main() -> None:
        await recorder.record_call("s1", "http", "success", {}, call_id="child")
        await recorder.close()

    asyncio.run(main())


def test_a_recorder_inherited_by_a_forked_child_records_there(db_url: str) -> None:
    """Made and used in the parent, then used in a child forked meanwhile (on
    SQLite, the child gets a worker thread of its own) and in the parent again."""
    with CallRecorder(db_url) as sync:
        sync.open_state("s1")
    recorder = AsyncCallRecorder(db_url)
    try:
        parent = asyncio.run(recorder.record_call("s1", "http", "success", {}, call_id="parent"))
        child = multiprocessing.get_context("fork").Process(
            target=_record_in_the_child, args=(recorder,)
        )
        child.start()
        child.join(60)
        if child.exitcode is None:
            child.kill()
            child.join()
            pytest.fail("the child hung recording its call")
        assert child.exitcode == 0
        again = asyncio.run(recorder.record_call("s1", "http", "success", {}, call_id="again"))
    finally:
        asyncio.run(recorder.close())
    rows = {(call_id, index) for call_id, _, index, _ in call_rows(db_url)}
    assert rows == {("parent", 0), ("child", 1), ("again", 2)}
    assert (parent.call_index, again.call_index) == (0, 2)
    assert_trail_sound(db_url, {call_id: ("s1", index) for call_id, index in rows})


def test_an_unreachable_database_is_retried_then_reported_without_its_password() -> None:
    from callindex import DatabaseRetryPolicy, DatabaseUnavailableError

    policy = DatabaseRetryPolicy(max_attempts=3, max_seconds=8, initial_wait=0.05, max_wait=0.1)
    url = "postgresql+psycopg://someone:hunter2-secret@127.0.0.1:1/nowhere?connect_timeout=2"

    async def main() -> None:
        async with AsyncCallRecorder(url, retry=policy) as recorder:
            await recorder.open_state("s1")

    with pytest.raises(DatabaseUnavailableError) as raised:
        asyncio.run(main())
    assert "hunter2-secret" not in str(raised.value)


def test_audited_client_requests_pass_httpx_mock_transport(db_url: str) -> None:
    """The async recorder under an httpx MockTransport inner transport."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"echo": request.url.path})

    async def scenario(recorder: AsyncCallRecorder) -> Any:
        await recorder.open_state("s1")
        async with AsyncAuditedHTTPClient(
            recorder, "s1", base_url="http://api.test", inner=httpx.MockTransport(handler)
        ) as http:
            return (await http.get("/x")).json()

    assert run(db_url, scenario) == {"echo": "/x"}
    with CallRecorder(db_url) as sync:
        (call,) = sync.calls("s1")
    assert call.response["body"]["json"] == {"echo": "/x"}
