"""Fault tests: crashes, killed connections, a crashed server, an unreachable
server, a locked SQLite file, racing retries and opposite lock orders.

Each ends with the same checks (``assert_trail_sound``): no duplicate
(state_id, call_index); every call acknowledged to a caller is in the table
with the index it was given; recorded indices gapless per state unless the
test explains a gap; ``verify`` passes.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgserver import postgres_binaries_available, throwaway_postgres
from sqlalchemy import make_url, text

from callindex import (
    CallRecorder,
    ContentionError,
    DatabaseRetryPolicy,
    DatabaseUnavailableError,
)

from conftest import IN_CI, assert_trail_sound, call_rows, counter_value
from workers import (
    SPAWN,
    allocate_pairs,
    hang_between_begin_and_finish,
    hold_allocation,
    hold_sqlite_write_lock,
    lock_in_given_order,
    record_many,
    record_same_ids,
    run_workers,
    spawn_until_held,
)

pytestmark = pytest.mark.slow


def _merge_acknowledged(results: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    merged: dict[str, tuple[str, int]] = {}
    for result in results:
        merged.update({cid: (s, i) for cid, (s, i) in result["acknowledged"].items()})
    return merged


def _kill(process: Any) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=30)
    assert process.exitcode == -signal.SIGKILL


class TestWorkerKilled:
    def test_mid_transaction_the_allocation_rolls_back(self, db_url: str) -> None:
        with CallRecorder(db_url) as recorder:
            recorder.open_state("s1")
            first = recorder.record_call("s1", "http", "success", {"n": 0})
            process, report = spawn_until_held(hold_allocation, db_url, "s1")
            assert report.get(timeout=10) == 1
            _kill(process)
            # The killed transaction never committed: its index goes to the next call.
            after = recorder.record_call("s1", "http", "success", {"n": 1})
        assert after.call_index == 1
        assert_trail_sound(db_url, {first.call_id: ("s1", 0), after.call_id: ("s1", 1)})

    def test_between_begin_and_finish_a_pending_row_remains_until_swept(self, db_url: str) -> None:
        with CallRecorder(db_url) as recorder:
            recorder.open_state("s1")
            process, report = spawn_until_held(hang_between_begin_and_finish, db_url, "s1")
            call_id, index = report.get(timeout=10)
            _kill(process)
            assert [(c.call_id, c.call_index, c.status) for c in recorder.calls("s1")] == [
                (call_id, index, "pending")
            ]
            assert [p["call_id"] for p in recorder.verify(0).stale_pending] == [call_id]
            assert [s["call_id"] for s in recorder.sweep(0)] == [call_id]
            later = recorder.record_call("s1", "http", "success", {})
            assert later.call_index == index + 1
            assert [c.status for c in recorder.calls("s1")] == ["abandoned", "success"]
            assert recorder.verify(0).stale_pending == []
        assert_trail_sound(db_url, {call_id: ("s1", index), later.call_id: ("s1", index + 1)})


def test_connections_terminated_at_random_while_four_processes_record(
    postgresql_url: str,
) -> None:
    with CallRecorder(postgresql_url) as recorder:
        for state_id in ("hot", "a", "b"):
            recorder.open_state(state_id)
    database = make_url(postgresql_url).database
    stop = threading.Event()
    terminated = []

    def terminate_at_random() -> None:
        dsn = make_url(postgresql_url).set(drivername="postgresql").render_as_string(False)
        rng = random.Random(42)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                time.sleep(rng.uniform(0.01, 0.06))
                pids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE datname = %s AND application_name = 'callindex'",
                        (database,),
                    )
                ]
                if pids:
                    victim = rng.choice(pids)
                    conn.execute("SELECT pg_terminate_backend(%s)", (victim,))
                    terminated.append(victim)

    terminator = threading.Thread(target=terminate_at_random)
    terminator.start()
    try:
        plans = [(postgresql_url, f"w{n}", ["hot", "a" if n % 2 else "b"], 250) for n in range(4)]
        results = run_workers(record_many, plans, timeout=240)
    finally:
        stop.set()
        terminator.join()
    acknowledged = _merge_acknowledged(results)
    assert len(acknowledged) == 4 * 250  # every call of every worker went through
    retries = sum(r["retries"] for r in results)
    print(f"terminated {len(terminated)} connections; workers retried {retries} times")
    assert len(terminated) >= 5, "the test terminated too few connections to mean much"
    assert retries >= 1
    assert len(call_rows(postgresql_url)) == 1000
    assert_trail_sound(postgresql_url, acknowledged)


@pytest.fixture
def crashable_postgres() -> Iterator[Any]:
    if not postgres_binaries_available():
        message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    with throwaway_postgres() as server:
        yield server


def test_postgresql_crashes_and_restarts_while_workers_record(crashable_postgres: Any) -> None:
    """`pg_ctl stop -m immediate` twice under load, on a server of the test's own."""
    url = crashable_postgres.url
    with CallRecorder(url) as recorder:
        recorder.upgrade()
        for state_id in ("hot", "a", "b"):
            recorder.open_state(state_id)
    patient = DatabaseRetryPolicy(max_attempts=100, max_seconds=90, max_wait=0.5)
    plans = [(url, f"w{n}", ["hot", "a" if n % 2 else "b"], 200, patient, 0.004) for n in range(4)]
    crashes: list[int] = []
    # Crash at a quarter and at half of the work.
    crasher = crashable_postgres.crash_at((200, 400), crashes)
    try:
        results = run_workers(record_many, plans, timeout=240)
    finally:
        crasher.join()
    assert len(crashes) == 2
    acknowledged = _merge_acknowledged(results)
    retries = sum(r["retries"] for r in results)
    print(f"2 crashes; workers retried {retries} times")
    assert len(acknowledged) == 800  # the workers recovered without operator action
    assert retries >= 4
    # Durability: every acknowledged call survived both crashes, at its index.
    assert_trail_sound(url, acknowledged)


def test_an_unreachable_database_is_retried_boundedly_then_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = DatabaseRetryPolicy(max_attempts=4, max_seconds=10, initial_wait=0.05, max_wait=0.2)
    url = "postgresql+psycopg://someone:hunter2-secret@127.0.0.1:1/nowhere?connect_timeout=2"
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="callindex.retry"),
        CallRecorder(url, retry=policy) as recorder,
        pytest.raises(DatabaseUnavailableError, match="cannot reach the database"),
    ):
        recorder.record_call("s1", "http", "success", {})
    assert time.monotonic() - started < 10
    retries = [r for r in caplog.records if r.name == "callindex.retry"]
    assert len(retries) == 3  # four attempts, a logged sleep before each retry
    assert all("hunter2-secret" not in r.getMessage() for r in retries)
    # One concise line each: "retrying in 0.1 s (2/4): cannot reach the database ..."
    lines = [
        re.fullmatch(r"retrying in \d+\.\d s \((\d)/4\): (.*)", r.getMessage()) for r in retries
    ]
    assert all(lines), [r.getMessage() for r in retries]
    assert [int(m[1]) for m in lines if m] == [2, 3, 4]
    assert all(m[2].startswith("cannot reach the database") for m in lines if m)


class TestSQLiteFileLockedByAnotherProcess:
    def test_longer_than_the_busy_timeout_raises_contention(self, sqlite_url: str) -> None:
        path = make_url(sqlite_url).database
        with CallRecorder(sqlite_url) as recorder:
            recorder.open_state("s1")
        holder = SPAWN.Process(target=hold_sqlite_write_lock, args=(path, held := SPAWN.Event(), 8))
        holder.start()
        try:
            assert held.wait(timeout=30)
            policy = DatabaseRetryPolicy(max_attempts=50, max_seconds=1.5, max_wait=0.3)
            started = time.monotonic()
            with (
                CallRecorder(f"{sqlite_url}?timeout=0.2", retry=policy) as recorder,
                pytest.raises(ContentionError, match="database is locked"),
            ):
                recorder.record_call("s1", "http", "success", {})
            assert 1.0 < time.monotonic() - started < 6
        finally:
            holder.kill()
            holder.join()
        assert call_rows(sqlite_url) == []
        assert counter_value(sqlite_url, "s1") == 0

    def test_released_within_the_retry_window_the_call_is_recorded(self, sqlite_url: str) -> None:
        path = make_url(sqlite_url).database
        with CallRecorder(sqlite_url) as recorder:
            recorder.open_state("s1")
        holder = SPAWN.Process(
            target=hold_sqlite_write_lock, args=(path, held := SPAWN.Event(), 1.5)
        )
        holder.start()
        try:
            assert held.wait(timeout=30)
            policy = DatabaseRetryPolicy(max_attempts=100, max_seconds=30, max_wait=0.3)
            with CallRecorder(f"{sqlite_url}?timeout=0.2", retry=policy) as recorder:
                call = recorder.record_call("s1", "http", "success", {})
        finally:
            holder.join(timeout=30)
        assert call.call_index == 0
        assert_trail_sound(sqlite_url, {call.call_id: ("s1", 0)})


def test_the_same_call_id_recorded_concurrently_by_two_processes(db_url: str) -> None:
    with CallRecorder(db_url) as recorder:
        recorder.open_state("s1")
    first, second = run_workers(record_same_ids, [(db_url, "s1", 200)] * 2)
    assert first == second  # both processes were told the same index for each call
    assert sorted(first.values()) == list(range(200))
    assert len(call_rows(db_url)) == 200
    assert counter_value(db_url, "s1") == 200  # no index burned by the losing attempts
    assert_trail_sound(db_url, {cid: ("s1", index) for cid, index in first.items()})


class TestOppositeLockOrders:
    def _deadlocks(self, url: str) -> int:
        with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
                    )
                ).scalar_one()
            )

    def test_callindex_locks_states_in_a_fixed_order(self, db_url: str) -> None:
        with CallRecorder(db_url) as recorder:
            recorder.open_state("alpha")
            recorder.open_state("beta")
        postgres = db_url.startswith("postgresql")
        before = self._deadlocks(db_url) if postgres else 0
        plans = [(db_url, ["alpha", "beta"], 300), (db_url, ["beta", "alpha"], 300)]
        results = run_workers(allocate_pairs, plans)
        for state_id in ("alpha", "beta"):
            got = sorted(r[state_id] for result in results for r in result["allocated"])
            assert got == list(range(600))
            assert counter_value(db_url, state_id) == 600
        if postgres:
            time.sleep(1.1)  # statistics reach pg_stat_database within a second
            assert self._deadlocks(db_url) == before

    def test_control_unordered_locking_does_deadlock(self, postgresql_url: str) -> None:
        """Shows the check above can fail: the same work without a fixed order."""
        with CallRecorder(postgresql_url) as recorder:
            recorder.open_state("alpha")
            recorder.open_state("beta")
        plans = [(postgresql_url, ["alpha", "beta"], 4), (postgresql_url, ["beta", "alpha"], 4)]
        assert sum(run_workers(lock_in_given_order, plans)) > 0
