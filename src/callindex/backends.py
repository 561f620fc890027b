"""One backend object per kind of database: the write path at the driver level.

A backend owns what differs between PostgreSQL and SQLite: how a write
transaction starts, the hot-path statements (prepared psycopg statements in
autocommit; raw ``sqlite3`` with ``BEGIN IMMEDIATE``), early lock release,
per-attempt lock and statement timeouts, and the upgrade lock. It runs each
operation as *one attempt*; :class:`~callindex.database.Database` retries.

Its connections come from a small pool of raw driver connections
(:class:`DriverPool`), shared by every recorder of the same database in the
process, so a write costs no SQLAlchemy pool checkout. Connections are made
by the engine (its creator and connect events apply) and detached from it.

Every PostgreSQL statement that acknowledges a write sets
``synchronous_commit`` for its own transaction (``set_config(..., true)``),
so it is durable whatever the server, database, role or connection default.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, TypeVar

import psycopg
from sqlalchemy import Connection, Engine, TextClause, text

from callindex.errors import ContentionError, UnknownStateError
from callindex.resources import driver_sql, positional_sql, queries
from callindex.translation import translated
from callindex.urls import sqlite_file

C = TypeVar("C")

DEFAULT_POOL_SIZE: Final = 8
# Any fixed number: serialises concurrent upgrades of one PostgreSQL database.
UPGRADE_LOCK_KEY: Final = 0x63616C6C  # "call"

# Connections inherited by a forked child: kept referenced and never closed,
# since closing them in the child would end the parent's sessions.
_INHERITED: list[object] = []


@dataclass(frozen=True, slots=True)
class Inserted:
    """What the database decided for a new call: its index and timestamps."""

    call_index: int
    created_at: datetime
    completed_at: datetime | None


class CallIdTaken(Exception):
    """The insert was refused because ``call_id`` is recorded already (the
    statement rolled back whole: no index was used)."""


class DriverPool(Generic[C]):
    """At most ``size`` raw driver connections, reused; safe across fork.

    Checking a connection out takes one semaphore and one list pop. A forked
    child starts with an empty pool (see :meth:`forget`); the pid check
    catches a fork that bypassed ``os.register_at_fork``.
    """

    def __init__(
        self,
        connect: Callable[[], C],
        reusable: Callable[[C], bool],
        close: Callable[[C], None],
        size: int,
        wait_seconds: float,
    ) -> None:
        self._connect = connect
        self._reusable = reusable
        self._close = close
        self.size = size
        self.wait_seconds = wait_seconds
        self.forget()

    def forget(self) -> None:
        """Drop every connection without closing it: after a fork, they are the parent's."""
        _INHERITED.extend(getattr(self, "_idle", ()))
        self._idle: list[C] = []
        self._slots = threading.Semaphore(self.size)
        self._pid = os.getpid()

    def acquire(self) -> C:
        """A connection of this process; give it back with :meth:`release`."""
        if self._pid != os.getpid():
            self.forget()
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise ContentionError(
                f"all {self.size} connections of this process stayed busy for "
                f"{self.wait_seconds:g} s"
            )
        try:
            return self._idle.pop()
        except IndexError:
            pass
        try:
            return self._connect()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: C) -> None:
        try:
            if self._pid == os.getpid() and self._reusable(conn):
                self._idle.append(conn)
            else:
                self._close(conn)
        finally:
            self._slots.release()

    @contextmanager
    def connection(self) -> Iterator[C]:
        conn = self.acquire()
        try:
            yield conn
        finally:
            self.release(conn)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn)


def _detached(engine: Engine) -> Any:
    """A new driver connection made by ``engine`` (its creator and connect
    events apply) and detached from its pool: ours to keep and close."""
    pooled = engine.raw_connection()
    driver_connection = pooled.driver_connection
    pooled.detach()
    return driver_connection


class Backend:
    """What differs between databases; one instance per shared database."""

    name: ClassVar[str]

    def __init__(self, engine: Engine, where: str, attempt_seconds: float, pool_size: int) -> None:
        self.engine = engine
        self.where = where
        self.attempt_seconds = attempt_seconds
        self.sqlite_path: Path | None = None
        self.pool: DriverPool[Any] = DriverPool(
            self._connect, self._reusable, self._close, pool_size, attempt_seconds
        )

    @contextmanager
    def translated(self) -> Iterator[None]:
        with translated(
            self.where, sqlite_path=self.sqlite_path, unique_columns=self.unique_columns
        ):
            yield

    def unique_columns(self, name: str) -> frozenset[str]:
        """The columns the unique index or constraint ``name`` of ``calls``
        covers (PostgreSQL reports a violation by name; SQLite by columns)."""
        return frozenset()

    def forget_inherited(self) -> None:
        self.engine.dispose(close=False)
        self.pool.forget()

    # Connections of the pool
    def _connect(self) -> Any:
        raise NotImplementedError

    def _reusable(self, conn: Any) -> bool:
        raise NotImplementedError

    def _close(self, conn: Any) -> None:
        conn.close()

    # SQLAlchemy transactions (reads, migrations, a caller's connection)
    def begin(self, connection: Connection, *, read_only: bool) -> None:
        """Start a transaction on an SQLAlchemy connection (the engine's "begin" event)."""

    def lock_for_upgrade(self, connection: Connection) -> None:
        """Serialise schema changes of one database (inside the migration's transaction)."""

    def bound_lock_waits(self, connection: Connection, seconds: float) -> None:
        """Bound this transaction's waits for a lock (SQLite: the busy timeout does)."""

    def database_exists(self) -> bool:
        """Whether the database is there to open (a SQLite file may not be yet)."""
        return self.sqlite_path is None or self.sqlite_path.exists()

    # The write path: one attempt each
    def open_state(self, state_id: str) -> None:
        raise NotImplementedError

    # opening=True (CallRecorder(auto_open=True)): an unknown state is opened
    # in the same statement that allocates or records, instead of raising
    # UnknownStateError.

    def allocate(self, state_id: str, count: int, *, opening: bool = False) -> int:
        raise NotImplementedError

    def allocate_many(self, counts: Mapping[str, int], *, opening: bool = False) -> dict[str, int]:
        raise NotImplementedError

    def insert_call(self, parameters: Mapping[str, Any], *, opening: bool = False) -> Inserted:
        """Insert a call with its state's next index (raises :class:`CallIdTaken`)."""
        raise NotImplementedError

    def insert_call_at(self, parameters: Mapping[str, Any]) -> Inserted | None:
        """Insert a call at ``parameters["call_index"]``, an index its state's
        counter handed out and no call holds; ``None`` (nothing written) when
        that is not so. Raises :class:`CallIdTaken`."""
        raise NotImplementedError

    def finish_call(self, parameters: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """Finish a pending call; its recorded columns, or ``None`` when not pending."""
        raise NotImplementedError

    def flush(self) -> None:
        """Return once everything committed so far is on disk (before a call found
        recorded by an earlier attempt is acknowledged: that attempt may have
        committed without waiting for the disk)."""

    # The same statements inside a caller's transaction (SQLAlchemy connection)
    def open_state_in(self, connection: Connection, state_id: str) -> None:
        connection.execute(self._text("open_state"), self._with_durability({"state_id": state_id}))

    def allocate_in(
        self, connection: Connection, state_id: str, count: int, *, opening: bool = False
    ) -> int:
        row = connection.execute(
            self._text(_allocation(opening)),
            self._with_durability({"state_id": state_id, "count": count}),
        ).first()
        if row is None:
            raise UnknownStateError(state_id)
        return int(row[0])

    def _text(self, name: str) -> TextClause:
        return queries(self.name)[name]

    def _with_durability(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return parameters


# The unique indexes of calls (constraints included: each has one), with
# their columns (on call_keys once calls is partitioned); read once per
# process, the first time a write violates one.
_UNIQUE_INDEXES_OF_CALLS: Final = """
SELECT index.relname, array_agg(attribute.attname ORDER BY key.position)
FROM pg_index
JOIN pg_class AS index ON index.oid = pg_index.indexrelid
JOIN pg_class AS tab ON tab.oid = pg_index.indrelid
CROSS JOIN LATERAL unnest(pg_index.indkey) WITH ORDINALITY AS key(attnum, position)
JOIN pg_attribute AS attribute
  ON attribute.attrelid = tab.oid AND attribute.attnum = key.attnum
WHERE pg_index.indisunique
  AND tab.relname IN ('calls', 'call_keys')  -- call_keys: calls partitioned (partitions.py)
  AND tab.relnamespace = current_schema()::regnamespace
GROUP BY index.relname
"""


def _allocation(opening: bool) -> str:
    return "allocate_opening" if opening else "allocate_call_index"


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


class PostgreSQLBackend(Backend):
    """psycopg 3, autocommit, prepared statements; one round trip per write.

    Early lock release (``record_call`` and ``begin_call``): the call commits
    asynchronously inside ``callindex_record_released``, releasing the
    state's counter row at once, and the procedure then commits one WAL
    record synchronously, so the call is acknowledged only once the log is
    flushed past it. ``early_release=None`` (adaptive) uses it for a while
    after a write waited more than ``CONTENDED_AFTER_MS`` before its commit
    (another writer held the counter row through its disk flush), and the
    plain statement otherwise.
    """

    name = "postgresql"
    CONTENDED_AFTER_MS: ClassVar[float] = 1.0
    CONTENDED_FOR_SECONDS: ClassVar[float] = 2.0

    def __init__(
        self,
        engine: Engine,
        where: str,
        attempt_seconds: float,
        pool_size: int,
        *,
        early_release: bool | None = None,
    ) -> None:
        super().__init__(engine, where, attempt_seconds, pool_size)
        self.early_release = early_release
        self._contended_until = 0.0
        self._unique_columns: dict[str, frozenset[str]] | None = None
        self._sql = {
            name: positional_sql(name)
            for name in (
                "open_state",
                "allocate_call_index",
                "allocate_opening",
                "insert_call",
                "insert_call_opening",
                "insert_call_at",
                *INSERT_AT_LOCKS,
                "record_released",
                "finish_call",
                "find_call_index",
                "flush_commits",
            )
        }
        milliseconds = max(1, round(attempt_seconds * 1000))
        # Session defaults for the pool's connections; every write sets
        # synchronous_commit again for its own transaction. A statement that
        # waits for a lock times out as a lock wait (twice the time for the
        # statement as a whole).
        self.session_settings = (
            "SET synchronous_commit = on; "
            "SET default_transaction_isolation = 'read committed'; "
            f"SET lock_timeout = {milliseconds}; "
            f"SET statement_timeout = {2 * milliseconds}"
        )

    def _connect(self) -> psycopg.Connection[Any]:
        with self.translated():
            conn: psycopg.Connection[Any] = _detached(self.engine)
            try:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.rollback()
                conn.autocommit = True
                conn.execute(self.session_settings)
            except BaseException:
                conn.close()
                raise
        return conn

    def _reusable(self, conn: psycopg.Connection[Any]) -> bool:
        if conn.closed or conn.broken:
            return False
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return True
        try:
            conn.rollback()
        except psycopg.Error:
            return False
        return True

    def lock_for_upgrade(self, connection: Connection) -> None:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY})

    def bound_lock_waits(self, connection: Connection, seconds: float) -> None:
        milliseconds = max(1, round(seconds * 1000))
        connection.execute(text(f"SET LOCAL lock_timeout = {milliseconds}"))

    def _with_durability(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return {**parameters, "synchronous_commit": "on"}

    def _write(self, name: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        """One write that commits by itself, durably, in one round trip (raw driver errors)."""
        parameters["synchronous_commit"] = "on"
        sql, order = self._sql[name]
        conn = self.pool.acquire()
        try:
            rows: list[tuple[Any, ...]] = conn.execute(
                sql, [parameters[key] for key in order], prepare=True
            ).fetchall()
            return rows
        finally:
            self.pool.release(conn)

    def _write_at(self, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        """``insert_call_at`` in a transaction that first holds the state's
        counter (raw driver errors)."""
        parameters["synchronous_commit"] = "on"
        conn = self.pool.acquire()
        try:
            with conn.transaction():
                for name in INSERT_AT_LOCKS:
                    self._execute(conn, name, parameters)
                return self._execute(conn, "insert_call_at", parameters).fetchall()
        finally:
            self.pool.release(conn)

    def _execute(
        self, conn: psycopg.Connection[Any], name: str, parameters: Mapping[str, Any]
    ) -> psycopg.Cursor[Any]:
        sql, order = self._sql[name]
        return conn.execute(sql, [parameters[key] for key in order], prepare=True)

    def unique_columns(self, name: str) -> frozenset[str]:
        if self._unique_columns is None:
            with self.pool.connection() as conn:
                rows = conn.execute(_UNIQUE_INDEXES_OF_CALLS).fetchall()
            self._unique_columns = {index: frozenset(columns) for index, columns in rows}
        return self._unique_columns.get(name, frozenset())

    def flush(self) -> None:
        with self.translated():
            self._write("flush_commits", {})

    def _releases_early(self) -> bool:
        if self.early_release is None:
            return time.monotonic() < self._contended_until
        return self.early_release

    def open_state(self, state_id: str) -> None:
        with self.translated():
            self._write("open_state", {"state_id": state_id})

    def allocate(self, state_id: str, count: int, *, opening: bool = False) -> int:
        with self.translated():
            rows = self._write(_allocation(opening), {"state_id": state_id, "count": count})
        if not rows:
            raise UnknownStateError(state_id)
        return int(rows[0][0])

    def allocate_many(self, counts: Mapping[str, int], *, opening: bool = False) -> dict[str, int]:
        with self.translated(), self.pool.connection() as conn, conn.transaction():
            first = {}
            for state_id in sorted(counts):  # one lock order for every caller: no deadlock
                parameters = {
                    "state_id": state_id,
                    "count": counts[state_id],
                    "synchronous_commit": "on",
                }
                row = self._execute(conn, _allocation(opening), parameters).fetchone()
                if row is None:
                    raise UnknownStateError(state_id)
                first[state_id] = int(row[0])
            return first

    def insert_call(self, parameters: Mapping[str, Any], *, opening: bool = False) -> Inserted:
        rows = self._insert(self.insert_statement(opening=opening), parameters)
        if opening and not inserted_any(rows):
            # Early release found the state unknown: open it as the call is recorded.
            rows = self._insert("insert_call_opening", parameters)
        return self.inserted(rows, parameters)

    def insert_statement(self, *, opening: bool) -> str:
        """The statement that records a call now (early release or not)."""
        if self._releases_early():
            return "record_released"
        return "insert_call_opening" if opening else "insert_call"

    def inserted(self, rows: list[tuple[Any, ...]], parameters: Mapping[str, Any]) -> Inserted:
        """What an insert statement returned, noting whether it waited for the
        counter row (adaptive early release)."""
        if not inserted_any(rows):
            raise UnknownStateError(parameters["state_id"])
        call_index, created_at, completed_at, waited_ms = rows[0]
        if self.early_release is None and waited_ms > self.CONTENDED_AFTER_MS:
            self._contended_until = time.monotonic() + self.CONTENDED_FOR_SECONDS
        return Inserted(int(call_index), created_at, completed_at)

    def _insert(self, statement: str, parameters: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        with self.translated():
            try:
                return self._write(statement, dict(parameters))
            except psycopg.errors.UniqueViolation:
                # By meaning, not by constraint name: is the call_id recorded?
                if self._recorded(parameters["call_id"]):
                    raise CallIdTaken from None
                raise

    def insert_call_at(self, parameters: Mapping[str, Any]) -> Inserted | None:
        with self.translated():
            try:
                rows = self._write_at(dict(parameters))
            except psycopg.errors.UniqueViolation:
                if self._recorded(parameters["call_id"]):
                    raise CallIdTaken from None
                return None  # a concurrent insert took the index first
        return inserted_at(rows)

    def _recorded(self, call_id: str) -> bool:
        with self.pool.connection() as conn:
            found = self._execute(conn, "find_call_index", {"call_id": call_id}).fetchone()
        return found is not None

    def finish_call(self, parameters: Mapping[str, Any]) -> Mapping[str, Any] | None:
        with self.translated(), self.pool.connection() as conn:
            cursor = self._execute(conn, "finish_call", {**parameters, "synchronous_commit": "on"})
            return named(cursor.description, cursor.fetchone())


# Taken in this order before insert_call_at, as sealing and purging take them.
INSERT_AT_LOCKS: Final = ("lock_calls", "lock_counter_shared")


def inserted_any(rows: list[tuple[Any, ...]]) -> bool:
    return bool(rows) and rows[0][0] is not None


def inserted_at(rows: list[tuple[Any, ...]]) -> Inserted | None:
    """What ``insert_call_at`` returned: ``None`` when it wrote nothing."""
    if not rows:
        return None
    call_index, created_at, completed_at, _ = rows[0]
    return Inserted(int(call_index), created_at, completed_at)


def named(
    description: list[psycopg.Column] | None, row: tuple[Any, ...] | None
) -> dict[str, Any] | None:
    """A psycopg row as ``{column: value}``."""
    if row is None:
        return None
    assert description is not None
    return dict(zip([column.name for column in description], row, strict=True))


class SQLiteBackend(Backend):
    """Raw ``sqlite3`` in WAL mode; every write transaction is ``BEGIN IMMEDIATE``
    (a reader never upgrades to a writer, which fails at once under WAL)."""

    name = "sqlite"

    def __init__(self, engine: Engine, where: str, attempt_seconds: float, pool_size: int) -> None:
        super().__init__(engine, where, attempt_seconds, pool_size)
        self.sqlite_path = sqlite_file(engine.url)
        self._sql = {
            name: driver_sql("sqlite", name)
            for name in (
                "open_state",
                "allocate_call_index",
                "allocate_opening",
                "insert_call",
                "finish_call",
                "find_call_index",
                "reservation_of",
            )
        }

    def _connect(self) -> sqlite3.Connection:
        with self.translated():
            conn: sqlite3.Connection = _detached(self.engine)
            conn.isolation_level = None
            conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _reusable(self, conn: sqlite3.Connection) -> bool:
        if not conn.in_transaction:
            return True
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            return False
        return True

    def begin(self, connection: Connection, *, read_only: bool) -> None:
        # Readers need no lock under WAL: a plain (deferred) BEGIN keeps them
        # from queueing behind writers.
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self.translated(), self.pool.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def open_state(self, state_id: str) -> None:
        with self._transaction() as conn:
            conn.execute(self._sql["open_state"], {"state_id": state_id})

    def _allocate(
        self, conn: sqlite3.Connection, state_id: str, count: int, opening: bool = False
    ) -> int:
        row = conn.execute(
            self._sql[_allocation(opening)], {"state_id": state_id, "count": count}
        ).fetchone()
        if row is None:
            raise UnknownStateError(state_id)
        return int(row[0])

    def allocate(self, state_id: str, count: int, *, opening: bool = False) -> int:
        with self._transaction() as conn:
            return self._allocate(conn, state_id, count, opening)

    def allocate_many(self, counts: Mapping[str, int], *, opening: bool = False) -> dict[str, int]:
        with self._transaction() as conn:
            return {
                state_id: self._allocate(conn, state_id, counts[state_id], opening)
                for state_id in sorted(counts)
            }

    def insert_call(self, parameters: Mapping[str, Any], *, opening: bool = False) -> Inserted:
        with self._transaction() as conn:
            call_index = self._allocate(conn, parameters["state_id"], 1, opening)
            try:
                row = conn.execute(
                    self._sql["insert_call"], {**parameters, "call_index": call_index}
                ).fetchone()
            except sqlite3.IntegrityError:
                if conn.execute(
                    self._sql["find_call_index"], {"call_id": parameters["call_id"]}
                ).fetchone():
                    raise CallIdTaken from None
                raise
            if row is None:
                # The index was taken (the counter was behind): the numbering
                # trigger of legacy-writers mode recorded the call at the next
                # free one instead.
                row = conn.execute(
                    self._sql["find_call_index"], {"call_id": parameters["call_id"]}
                ).fetchone()
                assert row is not None, "the numbering trigger recorded the call"
        created_at = _sqlite_time(row[1])
        assert created_at is not None
        return Inserted(int(row[0]), created_at, _sqlite_time(row[2]))

    def insert_call_at(self, parameters: Mapping[str, Any]) -> Inserted | None:
        with self._transaction() as conn:
            reservation = conn.execute(
                self._sql["reservation_of"],
                {"state_id": parameters["state_id"], "call_index": parameters["call_index"]},
            ).fetchone()
            if (
                reservation is None
                or parameters["call_index"] >= reservation[0]
                or reservation[1]  # taken
                or reservation[2]  # sealed
            ):
                return None
            try:
                row = conn.execute(self._sql["insert_call"], parameters).fetchone()
            except sqlite3.IntegrityError:
                if conn.execute(
                    self._sql["find_call_index"], {"call_id": parameters["call_id"]}
                ).fetchone():
                    raise CallIdTaken from None
                raise
        assert row is not None, "a free index below the counter is never renumbered"
        created_at = _sqlite_time(row[1])
        assert created_at is not None
        return Inserted(int(row[0]), created_at, _sqlite_time(row[2]))

    def finish_call(self, parameters: Mapping[str, Any]) -> Mapping[str, Any] | None:
        with self._transaction() as conn:
            cursor = conn.execute(self._sql["finish_call"], parameters)
            row = cursor.fetchone()
            if row is None:
                return None
            names = [column[0] for column in cursor.description]
        values = dict(zip(names, row, strict=True))
        values["request"] = _loads(values["request"])
        values["created_at"] = _sqlite_time(values["created_at"])
        values["completed_at"] = _sqlite_time(values["completed_at"])
        return values


def _sqlite_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)
