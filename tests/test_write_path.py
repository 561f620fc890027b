"""The write path's guarantees, however the database and the process are set up:

* durable whatever ``synchronous_commit`` the server, URL or Engine says;
* safe across fork: a forked child never uses its parent's connections;
* never waiting without a bound: lock waits, slow statements and a caller's
  stalled transaction end within the retry policy, as ``ContentionError``;
  injected serialization failures are retried to a gapless result;
* a bounded number of connections per process, however many recorders.

Every test checks the table afterwards (``assert_trail_sound``).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from pgserver import postgres_binaries_available, throwaway_postgres
from sqlalchemy import create_engine, make_url, text

from callindex import (
    CallRecorder,
    ContentionError,
    DatabaseRetryPolicy,
    DatabaseUnavailableError,
)

from conftest import IN_CI, assert_trail_sound, call_rows
from workers import record_many, run_workers

FORK = multiprocessing.get_context("fork")


def _psycopg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# Durability


@pytest.mark.slow
def test_acknowledged_calls_survive_crashes_of_a_server_that_defaults_to_async_commit() -> None:
    """The server's default is ``synchronous_commit = off``, one worker's URL
    says ``off`` again, one builds its recorder from an Engine whose
    connections say ``off``, one always releases the counter row early: every
    acknowledged call still survives
    ``pg_ctl stop -m immediate``, at its index, and no index is handed out twice."""
    if not postgres_binaries_available():
        message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    with throwaway_postgres(synchronous_commit="off") as server:
        url = server.url
        with CallRecorder(url) as recorder:
            recorder.upgrade()
            for state_id in ("hot", "a", "b"):
                recorder.open_state(state_id)
        with psycopg.connect(_psycopg_dsn(url)) as conn:
            row = conn.execute("SHOW synchronous_commit").fetchone()
            assert row is not None and row[0] == "off"
        patient = DatabaseRetryPolicy(max_attempts=100, max_seconds=90, max_wait=0.5)
        off = {"options": "-c synchronous_commit=off"}
        url_off = f"{url}?options=-c%20synchronous_commit%3Doff"
        plans = [
            (url_off, "url", ["hot", "a"], 200, patient, 0.002),
            (url, "engine", ["hot", "b"], 200, patient, 0.002, False, off),
            (url_off, "early", ["hot"], 200, patient, 0.002, False, None, True),
        ]
        crashes: list[int] = []
        crasher = server.crash_at((150, 350), crashes)
        try:
            results = run_workers(record_many, plans, timeout=240)
        finally:
            crasher.join()
        assert len(crashes) == 2
        acknowledged: dict[str, tuple[str, int]] = {}
        for result in results:
            acknowledged.update({cid: (s, i) for cid, (s, i) in result["acknowledged"].items()})
        assert len(acknowledged) == 600
        assert sum(r["retries"] for r in results) >= 2
        assert_trail_sound(url, acknowledged)


def test_workers_of_an_earlier_version_record_through_the_sql_function(
    postgresql_url: str,
) -> None:
    """During a rolling upgrade, workers of the previous version call
    ``callindex_record_call``; it numbers the call itself, with or without the
    numbering trigger, and stays idempotent on call_id."""
    with CallRecorder(postgresql_url) as recorder, recorder.engine.begin() as conn:
        recorder.open_state("s1")
        recorder.record_call("s1", "http", "success", {}, call_id="new")
        record = text(
            "SELECT call_index FROM callindex_record_call_v2(:id, 's1', 'http', 'success', "
            "NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
        )
        assert conn.execute(record, {"id": "old"}).scalar_one() == 1
        assert conn.execute(record, {"id": "old"}).scalar_one() == 1
    assert_trail_sound(postgresql_url, {"new": ("s1", 0), "old": ("s1", 1)})


# Fork


def _record_in_child(
    recorder: CallRecorder, state_id: str, calls: int, start: Any, results: Any
) -> None:
    try:
        start.wait(timeout=30)
        indices = [
            recorder.record_call(state_id, "http", "success", {"pid": os.getpid(), "n": n})
            for n in range(calls)
        ]
        results.put([(c.call_id, c.state_id, c.call_index) for c in indices])
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


@pytest.mark.slow
def test_forked_children_use_connections_of_their_own(db_url: str) -> None:
    """A pre-fork server: the parent records (its pool holds connections), then
    forks four children that record on the same state with the inherited
    recorder, all at once and while the parent records too. Nobody hangs,
    nobody reads another's results, and every call is in the table once."""
    acknowledged: dict[str, tuple[str, int]] = {}
    with CallRecorder(db_url) as recorder:
        recorder.open_state("shared")
        first = recorder.record_call("shared", "http", "success", {"parent": 0})
        acknowledged[first.call_id] = ("shared", first.call_index)
        results = FORK.Queue()
        start = FORK.Barrier(5)
        children = [
            FORK.Process(target=_record_in_child, args=(recorder, "shared", 100, start, results))
            for _ in range(4)
        ]
        for child in children:
            child.start()
        start.wait(timeout=30)
        for n in range(100):
            call = recorder.record_call("shared", "http", "success", {"parent": n + 1})
            acknowledged[call.call_id] = ("shared", call.call_index)
        collected = [results.get(timeout=60) for _ in children]
        for child in children:
            child.join(timeout=30)
            assert child.exitcode == 0
        assert not [c for c in collected if isinstance(c, str)], collected
    for calls in collected:
        acknowledged.update({call_id: (state, index) for call_id, state, index in calls})
    assert len(acknowledged) == 501
    assert_trail_sound(db_url, acknowledged)


# Bounded waits


def _quick(**overrides: Any) -> DatabaseRetryPolicy:
    settings = {
        "max_attempts": 3,
        "max_seconds": 3.0,
        "initial_wait": 0.05,
        "max_wait": 0.2,
        "attempt_timeout": 0.5,
    }
    return DatabaseRetryPolicy(**(settings | overrides))


class TestNeverWaitingWithoutABound:
    def test_a_counter_held_by_a_stalled_transaction_times_out(self, db_url: str) -> None:
        with CallRecorder(db_url) as holder:
            holder.open_state("s1")
            with holder.engine.connect() as conn, conn.begin():
                held = holder.allocate_call_index("s1", connection=conn)
                assert held == 0
                started = time.monotonic()
                with (
                    CallRecorder(db_url, retry=_quick()) as writer,
                    pytest.raises(ContentionError),
                ):
                    writer.record_call("s1", "http", "success", {})
                waited = time.monotonic() - started
                conn.rollback()
        assert 0.5 <= waited < 6
        with CallRecorder(db_url) as recorder:
            call = recorder.record_call("s1", "http", "success", {})
        assert call.call_index == 0  # the rolled-back reservation left no gap
        assert_trail_sound(db_url, {call.call_id: ("s1", 0)})

    def test_the_documented_policy_that_used_to_hang_raises(self, postgresql_url: str) -> None:
        policy = DatabaseRetryPolicy(max_attempts=2, max_seconds=5)
        with CallRecorder(postgresql_url) as holder:
            holder.open_state("s1")
            with holder.engine.connect() as conn, conn.begin():
                holder.allocate_call_index("s1", connection=conn)
                started = time.monotonic()
                with (
                    CallRecorder(postgresql_url, retry=policy) as writer,
                    pytest.raises(ContentionError, match="lock timeout"),
                ):
                    writer.allocate_call_index("s1")
                assert time.monotonic() - started < 12

    def test_a_statement_slower_than_the_attempt_timeout_is_cancelled(
        self, postgresql_url: str
    ) -> None:
        with CallRecorder(postgresql_url) as owner, owner.engine.begin() as conn:
            owner.open_state("s1")
            conn.execute(
                text(
                    "CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN PERFORM pg_sleep(2); RETURN NEW; END; $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER test_slow BEFORE INSERT ON calls "
                    "FOR EACH ROW EXECUTE FUNCTION test_slow()"
                )
            )
        started = time.monotonic()
        with (
            CallRecorder(postgresql_url, retry=_quick(max_attempts=2)) as writer,
            pytest.raises(ContentionError, match="statement timeout"),
        ):
            writer.record_call("s1", "http", "success", {})
        assert time.monotonic() - started < 4
        assert call_rows(postgresql_url) == []

    def test_a_callers_idle_transaction_is_ended_by_the_server_and_writers_go_on(
        self, postgresql_url: str
    ) -> None:
        """``idle_in_transaction_session_timeout`` on the caller's session ends its
        stalled transaction; a writer waiting for the state's counter gets through
        within its policy, and the caller's late commit fails as unavailable."""
        patient = _quick(max_attempts=20, max_seconds=15)
        with CallRecorder(postgresql_url) as holder:
            holder.open_state("s1")
            engine = holder.engine
            with engine.connect() as conn:
                conn.execute(text("SET idle_in_transaction_session_timeout = '1s'"))
                conn.commit()
                conn.begin()
                assert holder.allocate_call_index("s1", connection=conn) == 0
                with CallRecorder(postgresql_url, retry=patient) as writer:
                    call = writer.record_call("s1", "http", "success", {})
                assert call.call_index == 0  # the caller's reservation rolled back
                with pytest.raises(Exception) as stalled:
                    conn.commit()
                assert "idle-in-transaction" in str(stalled.value) or isinstance(
                    stalled.value, DatabaseUnavailableError
                )
        assert_trail_sound(postgresql_url, {call.call_id: ("s1", 0)})

    def test_injected_serialization_failures_are_retried_to_a_gapless_trail(
        self, postgresql_url: str
    ) -> None:
        with CallRecorder(postgresql_url) as owner, owner.engine.begin() as conn:
            owner.open_state("s1")
            conn.execute(
                text(
                    "CREATE FUNCTION test_flaky() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN IF random() < 0.3 THEN RAISE EXCEPTION 'injected' "
                    "USING ERRCODE = 'serialization_failure'; END IF; RETURN NEW; END; $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER test_flaky BEFORE INSERT ON calls "
                    "FOR EACH ROW EXECUTE FUNCTION test_flaky()"
                )
            )
        patient = DatabaseRetryPolicy(max_attempts=30, initial_wait=0.001, max_wait=0.01)
        acknowledged = {}
        with CallRecorder(postgresql_url, retry=patient) as recorder:
            for n in range(60):
                if n % 2:
                    begun = recorder.begin_call("s1", "llm", {"n": n})
                    call = recorder.finish_call(begun.call_id, "success", {"n": n})
                else:
                    call = recorder.record_call("s1", "http", "success", {"n": n})
                acknowledged[call.call_id] = ("s1", call.call_index)
        assert sorted(index for _, index in acknowledged.values()) == list(range(60))
        assert_trail_sound(postgresql_url, acknowledged)


# Connection budget


def _backends_of(url: str, monitor: psycopg.Connection[Any] | None = None) -> int:
    """The server sessions of ``url``'s database, but ``monitor``'s (the
    connection that asks: pass one to sample repeatedly, since a closed
    connection's session lingers a moment and would be counted)."""
    if monitor is None:
        with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
            return _backends_of(url, conn)
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (make_url(url).database,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _no_backends_left(url: str) -> bool:
    """Whether the server's sessions for the database all ended (a closed
    connection's server process exits a moment after the client closed it)."""
    deadline = time.monotonic() + 10
    while _backends_of(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _backends_of(url) == 0


class TestConnectionBudget:
    def test_two_hundred_recorders_in_threads_stay_within_the_budget(
        self, postgresql_url: str
    ) -> None:
        recorders = [CallRecorder(postgresql_url) for _ in range(200)]
        try:
            recorders[0].open_state("s1")
            peak = 0
            errors: list[BaseException] = []

            def work(chunk: list[CallRecorder]) -> None:
                try:
                    for recorder in chunk:
                        recorder.record_call("s1", "http", "success", {})
                        recorder.calls("s1")[:1]
                except BaseException as error:
                    errors.append(error)

            threads = [threading.Thread(target=work, args=(recorders[n::20],)) for n in range(20)]
            with psycopg.connect(_psycopg_dsn(postgresql_url), autocommit=True) as monitor:
                for thread in threads:
                    thread.start()
                while any(thread.is_alive() for thread in threads):
                    peak = max(peak, _backends_of(postgresql_url, monitor))
                    time.sleep(0.01)
                for thread in threads:
                    thread.join()
                assert not errors, errors[:3]
                peak = max(peak, _backends_of(postgresql_url, monitor))
            assert 1 <= peak <= 16  # 8 for writes, 8 for reads, shared by all 200
        finally:
            for recorder in recorders:
                recorder.close()
        assert _no_backends_left(postgresql_url)
        assert sorted(r[2] for r in call_rows(postgresql_url)) == list(range(200))

    def test_dropped_recorders_give_their_connections_back(self, postgresql_url: str) -> None:
        for _ in range(200):
            recorder = CallRecorder(postgresql_url)
            recorder.open_state(f"s-{uuid.uuid4().hex[:6]}")
            del recorder
        gc.collect()
        assert _no_backends_left(postgresql_url)

    def test_an_engine_passed_in_is_left_open_for_its_owner(self, postgresql_url: str) -> None:
        engine = create_engine(postgresql_url)
        try:
            with CallRecorder(engine) as recorder:
                recorder.open_state("s1")
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()
