"""The allocation and recording strategies the benchmark compares.

Each strategy is a function run in a worker process: ``strategy(job)``
performs ``job.operations`` operations and returns the ``(state_id, index)``
pairs it obtained, so the runner can check every strategy for duplicates.
Connections are opened and warmed before ``job.ready()``; only the loop after
``job.go()`` is timed.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import make_url

from callindex import CallRecorder, DatabaseRetryPolicy, migrations
from callindex.database import Database

REQUEST = {"method": "POST", "url": "https://api.example/v1/items", "body": {"q": "x" * 64}}
RESPONSE = {"status_code": 200, "body": {"id": 7, "items": list(range(10))}}
REQUEST_TEXT = (
    '{"body":{"q":"' + "x" * 64 + '"},"method":"POST","url":"https://api.example/v1/items"}'
)
RESPONSE_TEXT = '{"body":{"id":7,"items":[0,1,2,3,4,5,6,7,8,9]},"status_code":200}'


@dataclass
class Job:
    """What one worker process does in one measured run."""

    url: str
    strategy: str
    state_id: str
    operations: int
    worker: int
    workers: int
    ready: Callable[[], None] = field(repr=False, default=lambda: None)
    go: Callable[[], None] = field(repr=False, default=lambda: None)
    started: float = 0.0
    finished: float = 0.0
    cpu_seconds: float = 0.0
    retries: int = 0
    closers: list[Callable[[], object]] = field(repr=False, default_factory=list)

    @property
    def backend(self) -> str:
        return make_url(self.url).get_backend_name()

    def timed(self, loop: Callable[[], list[tuple[str, int]]]) -> list[tuple[str, int]]:
        self.ready()
        self.go()
        self.started = time.monotonic()
        cpu = time.process_time()
        try:
            got = loop()
            self.finished = time.monotonic()
            self.cpu_seconds = time.process_time() - cpu
        finally:
            for close in self.closers:  # the worker process lives on: no leaked connections
                close()
        return got


def _psycopg(url: str, job: Job | None = None) -> psycopg.Connection[Any]:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = psycopg.connect(dsn, autocommit=True, options="-c synchronous_commit=on")
    if job is not None:
        job.closers.append(conn.close)
    return conn


def _sqlite(job: Job) -> sqlite3.Connection:
    conn = sqlite3.connect(make_url(job.url).database or "", isolation_level=None, timeout=30)
    job.closers.append(conn.close)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _client_index(job: Job, k: int) -> int:
    """A unique client-chosen index: workers interleave on a shared state."""
    return job.worker + k * job.workers


# The floor and the MAX + 1 strategy write to PLAIN_TABLE, a copy of calls
# without callindex's numbering trigger, as a database without callindex would.
# legacy_insert sends the same insert to calls, so the two differ by the trigger.
PLAIN_TABLE = "bench_plain_calls"
_COLUMNS = (
    "(call_id, state_id, call_index, call_type, status, request, "
    "request_hash, response, response_hash, latency_ms, completed_at)"
)
_HASH = "0" * 64


def _insert_sql(backend: str, table: str) -> str:
    if backend == "postgresql":
        return (
            f"INSERT INTO {table} {_COLUMNS} VALUES "
            "(%s, %s, %s, 'http', 'success', %s::jsonb, %s, %s::jsonb, %s, 12.5, now())"
        )
    return (
        f"INSERT INTO {table} {_COLUMNS} VALUES (?, ?, ?, 'http', 'success', ?, ?, ?, ?, 12.5, "
        "strftime('%Y-%m-%d %H:%M:%f', 'now'))"
    )


def bare_insert(job: Job) -> list[tuple[str, int]]:
    """The floor: insert the same call row with an index the client chose."""
    return _client_indexed_inserts(job, PLAIN_TABLE)


def legacy_insert(job: Job) -> list[tuple[str, int]]:
    """The floor's insert sent to calls, as a legacy writer does in a rolling
    deploy: what the numbering trigger costs per insert."""
    return _client_indexed_inserts(job, "calls")


def _client_indexed_inserts(job: Job, table: str) -> list[tuple[str, int]]:
    indices = [_client_index(job, k) for k in range(job.operations)]
    insert = _insert_sql(job.backend, table)
    if job.backend == "postgresql":
        conn = _psycopg(job.url, job)

        def loop() -> list[tuple[str, int]]:
            for index in indices:
                conn.execute(
                    insert,
                    (
                        uuid.uuid4().hex,
                        job.state_id,
                        index,
                        REQUEST_TEXT,
                        _HASH,
                        RESPONSE_TEXT,
                        _HASH,
                    ),
                    prepare=True,
                )
            return [(job.state_id, i) for i in indices]

        return job.timed(loop)
    lite = _sqlite(job)

    def loop_sqlite() -> list[tuple[str, int]]:
        for index in indices:
            lite.execute("BEGIN IMMEDIATE")
            lite.execute(
                insert,
                (uuid.uuid4().hex, job.state_id, index, REQUEST_TEXT, _HASH, RESPONSE_TEXT, _HASH),
            )
            lite.execute("COMMIT")
        return [(job.state_id, i) for i in indices]

    return job.timed(loop_sqlite)


def bare_insert_update(job: Job) -> list[tuple[str, int]]:
    """The floor of begin_call + finish_call: insert a pending row, then update it
    to finished, as two statements that each commit."""
    indices = [_client_index(job, k) for k in range(job.operations)]
    insert = _insert_sql(job.backend, PLAIN_TABLE).replace("'success'", "'pending'")
    if job.backend == "postgresql":
        update = (
            f"UPDATE {PLAIN_TABLE} SET status = 'success', response = %s::jsonb, "
            "response_hash = %s, latency_ms = 12.5, completed_at = now() WHERE call_id = %s"
        )
        conn = _psycopg(job.url, job)

        def loop() -> list[tuple[str, int]]:
            for index in indices:
                call_id = uuid.uuid4().hex
                conn.execute(
                    insert,
                    (call_id, job.state_id, index, REQUEST_TEXT, _HASH, None, None),
                    prepare=True,
                )
                conn.execute(update, (RESPONSE_TEXT, _HASH, call_id), prepare=True)
            return [(job.state_id, i) for i in indices]

        return job.timed(loop)
    update = (
        f"UPDATE {PLAIN_TABLE} SET status = 'success', response = ?, response_hash = ?, "
        "latency_ms = 12.5, completed_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE call_id = ?"
    )
    lite = _sqlite(job)

    def loop_sqlite() -> list[tuple[str, int]]:
        for index in indices:
            call_id = uuid.uuid4().hex
            lite.execute("BEGIN IMMEDIATE")
            lite.execute(insert, (call_id, job.state_id, index, REQUEST_TEXT, _HASH, None, None))
            lite.execute("COMMIT")
            lite.execute("BEGIN IMMEDIATE")
            lite.execute(update, (RESPONSE_TEXT, _HASH, call_id))
            lite.execute("COMMIT")
        return [(job.state_id, i) for i in indices]

    return job.timed(loop_sqlite)


def raw_update(job: Job) -> list[tuple[str, int]]:
    """The floor of allocation: the prepared counter UPDATE ... RETURNING, autocommit."""
    return _raw_updates(job, 1)


def raw_update_100(job: Job) -> list[tuple[str, int]]:
    """The floor of allocate_100: the same UPDATE reserving 100 at a time."""
    return _raw_updates(job, 100)


def _raw_updates(job: Job, count: int) -> list[tuple[str, int]]:
    if job.backend == "postgresql":
        conn = _psycopg(job.url, job)
        update = (
            "UPDATE call_index_counters SET next_index = next_index + %s "
            "WHERE state_id = %s RETURNING next_index - %s"
        )

        def loop() -> list[tuple[str, int]]:
            got = []
            for _ in range(job.operations):
                row = conn.execute(update, (count, job.state_id, count), prepare=True).fetchone()
                assert row is not None
                got.extend((job.state_id, int(row[0]) + k) for k in range(count))
            return got

        return job.timed(loop)
    lite = _sqlite(job)
    update_sqlite = (
        "UPDATE call_index_counters SET next_index = next_index + ? "
        "WHERE state_id = ? RETURNING next_index - ?"
    )

    def loop_sqlite() -> list[tuple[str, int]]:
        got = []
        for _ in range(job.operations):
            lite.execute("BEGIN IMMEDIATE")
            row = lite.execute(update_sqlite, (count, job.state_id, count)).fetchone()
            lite.execute("COMMIT")
            got.extend((job.state_id, int(row[0]) + k) for k in range(count))
        return got

    return job.timed(loop_sqlite)


def nextval(job: Job) -> list[tuple[str, int]]:
    """The floor for allocation: a native sequence, one round trip, no commit wait."""
    conn = _psycopg(job.url, job)
    sequence = sequence_name(job.state_id)

    def loop() -> list[tuple[str, int]]:
        got = []
        for _ in range(job.operations):
            row = conn.execute(f"SELECT nextval('{sequence}')").fetchone()
            assert row is not None
            got.append((job.state_id, int(row[0])))
        return got

    return job.timed(loop)


def sequence_name(state_id: str) -> str:
    return f"bench_seq_{state_id.replace('-', '_')}"


def prepare(url: str, strategy: str, state_ids: set[str]) -> None:
    """What a run needs before its workers start: counter rows, sequences, the plain table."""
    if strategy == "nextval":
        with _psycopg(url) as conn:
            for state_id in state_ids:
                conn.execute(f"CREATE SEQUENCE {sequence_name(state_id)}")
    elif strategy in ("bare_insert", "bare_insert_update", "max_plus_one"):
        create_plain_table(url)
    elif strategy in ("raw_update", "raw_update_100"):
        with CallRecorder(url) as recorder:
            for state_id in state_ids:
                recorder.open_state(state_id)
    # legacy_insert measures the numbering trigger of legacy-writers mode; every
    # other strategy runs without it, as a database without legacy writers does.
    database = Database(url)
    try:
        migrations.set_legacy_writers(database, strategy == "legacy_insert")
    finally:
        database.dispose()
    if strategy == "legacy_insert":
        with CallRecorder(url) as recorder:
            for state_id in state_ids:
                recorder.open_state(state_id)


def create_plain_table(url: str) -> None:
    """calls' columns, keys and unique index, without its triggers and foreign key."""
    if make_url(url).get_backend_name() == "postgresql":
        with _psycopg(url) as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {PLAIN_TABLE} (LIKE calls INCLUDING DEFAULTS "
                "INCLUDING CONSTRAINTS INCLUDING INDEXES)"
            )
        return
    with sqlite3.connect(make_url(url).database or "", isolation_level=None, timeout=30) as lite:
        lite.execute(
            f"CREATE TABLE IF NOT EXISTS {PLAIN_TABLE} (call_id TEXT PRIMARY KEY, "
            "state_id TEXT NOT NULL, call_index BIGINT NOT NULL, call_type VARCHAR(64) NOT NULL, "
            "status VARCHAR(16) NOT NULL, request JSON, request_hash VARCHAR(64), response JSON, "
            "response_hash VARCHAR(64), latency_ms FLOAT, completed_at DATETIME, "
            "created_at DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')), "
            "UNIQUE (state_id, call_index))"
        )
    lite.close()


def _recorder(job: Job, *, early_release: bool | None = None) -> CallRecorder:
    recorder = CallRecorder(
        job.url,
        retry=DatabaseRetryPolicy(max_attempts=50, max_seconds=120),
        early_release=early_release,
    )
    recorder.open_state(job.state_id)  # also connects, outside the timing
    job.closers.append(recorder.close)
    return recorder


def allocate(job: Job) -> list[tuple[str, int]]:
    recorder = _recorder(job)
    return job.timed(
        lambda: [
            (job.state_id, recorder.allocate_call_index(job.state_id))
            for _ in range(job.operations)
        ]
    )


def allocate_100(job: Job) -> list[tuple[str, int]]:
    """count=100: every operation reserves a block of 100 indices."""
    recorder = _recorder(job)

    def loop() -> list[tuple[str, int]]:
        got = []
        for _ in range(job.operations):
            first = recorder.allocate_call_index(job.state_id, 100)
            got.extend((job.state_id, first + k) for k in range(100))
        return got

    return job.timed(loop)


def record_call(job: Job) -> list[tuple[str, int]]:
    return _record_calls(job, _recorder(job))


def record_call_early(job: Job) -> list[tuple[str, int]]:
    """record_call always with early lock release (PostgreSQL)."""
    return _record_calls(job, _recorder(job, early_release=True))


def record_call_plain(job: Job) -> list[tuple[str, int]]:
    """record_call never with early lock release (PostgreSQL)."""
    return _record_calls(job, _recorder(job, early_release=False))


def _record_calls(job: Job, recorder: CallRecorder) -> list[tuple[str, int]]:
    return job.timed(
        lambda: [
            (
                job.state_id,
                recorder.record_call(
                    job.state_id, "http", "success", REQUEST, RESPONSE, latency_ms=12.5
                ).call_index,
            )
            for _ in range(job.operations)
        ]
    )


def begin_finish(job: Job) -> list[tuple[str, int]]:
    recorder = _recorder(job)

    def loop() -> list[tuple[str, int]]:
        got = []
        for _ in range(job.operations):
            call = recorder.begin_call(job.state_id, "http", REQUEST)
            recorder.finish_call(call.call_id, "success", RESPONSE, latency_ms=12.5)
            got.append((job.state_id, call.call_index))
        return got

    return job.timed(loop)


def max_plus_one(job: Job) -> list[tuple[str, int]]:
    """Today's common way: read max(call_index) + 1, insert, retry on a unique violation."""
    conn = _psycopg(job.url, job)
    insert = _insert_sql("postgresql", PLAIN_TABLE)

    def loop() -> list[tuple[str, int]]:
        got = []
        for _ in range(job.operations):
            while True:
                row = conn.execute(
                    f"SELECT coalesce(max(call_index) + 1, 0) FROM {PLAIN_TABLE} "
                    "WHERE state_id = %s",
                    (job.state_id,),
                ).fetchone()
                assert row is not None
                try:
                    conn.execute(
                        insert,
                        (
                            uuid.uuid4().hex,
                            job.state_id,
                            row[0],
                            REQUEST_TEXT,
                            _HASH,
                            RESPONSE_TEXT,
                            _HASH,
                        ),
                    )
                except psycopg.errors.UniqueViolation:
                    job.retries += 1
                    continue
                got.append((job.state_id, int(row[0])))
                break
        return got

    return job.timed(loop)


def select_for_update(job: Job) -> list[tuple[str, int]]:
    """Today's other way: lock the counter row, read it, update it, commit."""
    conn = _psycopg(job.url, job)
    conn.execute(
        "INSERT INTO call_index_counters (state_id) VALUES (%s) ON CONFLICT DO NOTHING",
        (job.state_id,),
    )

    def loop() -> list[tuple[str, int]]:
        got = []
        for _ in range(job.operations):
            with conn.transaction():
                row = conn.execute(
                    "SELECT next_index FROM call_index_counters WHERE state_id = %s FOR UPDATE",
                    (job.state_id,),
                ).fetchone()
                assert row is not None
                conn.execute(
                    "UPDATE call_index_counters SET next_index = next_index + 1 "
                    "WHERE state_id = %s",
                    (job.state_id,),
                )
            got.append((job.state_id, int(row[0])))
        return got

    return job.timed(loop)


def django_sequences(job: Job) -> list[tuple[str, int]]:
    """django-sequences' get_next_value on the same database (when installed)."""
    setup_django(job.url)
    from django.db import connections
    from sequences import get_next_value  # type: ignore[import-not-found]

    job.closers.append(connections.close_all)
    name = f"bench-{job.state_id}"
    get_next_value(f"{name}-warm")
    return job.timed(
        lambda: [(job.state_id, int(get_next_value(name))) for _ in range(job.operations)]
    )


def setup_django(url: str) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        parsed = make_url(url)
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": parsed.database,
                    "USER": parsed.username or os.environ.get("USER", "postgres"),
                    "PASSWORD": parsed.password or "",
                    "HOST": parsed.host or "",
                    "PORT": parsed.port or "",
                    "OPTIONS": {"options": "-c synchronous_commit=on"},
                }
            },
            INSTALLED_APPS=["sequences"],
            USE_TZ=True,
        )
        django.setup()


# Summaries and backends are declared with the options, in callindex/cli/bench.py (its
# STRATEGIES lists these names in this order; tests/test_bench.py checks it).
STRATEGIES: dict[str, Callable[[Job], list[tuple[str, int]]]] = {
    "bare_insert": bare_insert,
    "bare_insert_update": bare_insert_update,
    "raw_update": raw_update,
    "raw_update_100": raw_update_100,
    "legacy_insert": legacy_insert,
    "nextval": nextval,
    "allocate": allocate,
    "allocate_100": allocate_100,
    "record_call": record_call,
    "record_call_early": record_call_early,
    "record_call_plain": record_call_plain,
    "begin_finish": begin_finish,
    "max_plus_one": max_plus_one,
    "select_for_update": select_for_update,
    "django_sequences": django_sequences,
}
