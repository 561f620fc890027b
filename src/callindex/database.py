"""A database as callindex uses it: its engine, its backend, and its retries.

Every recorder of one database in a process shares one :class:`Shared`
(engine and backend, so one bounded set of connections), counted by
reference and closed with the last recorder. A forked child forgets the
connections it inherited without closing them (the parent's sessions live
on) and opens its own.

:meth:`Database.write` runs one hot-path operation of the backend under the
retry policy; :meth:`Database.run` and :meth:`Database.read` run SQLAlchemy
work (a caller's transaction, maintenance, migrations, reads).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import quote

from sqlalchemy import URL, Connection, Engine, Executable, create_engine, event, exc

from callindex.backends import DEFAULT_POOL_SIZE, Backend, PostgreSQLBackend, SQLiteBackend
from callindex.errors import ConfigurationError
from callindex.resources import queries
from callindex.retry import DatabaseRetryPolicy
from callindex.schema import calls as calls_table
from callindex.translation import translated
from callindex.urls import anchored, display_url, parse_url, sqlite_file

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_SECONDS: Final = 10.0
POSTGRESQL_CONNECT_TIMEOUT_SECONDS: Final = 10
# The engine serves reads, maintenance, migrations and callers' transactions;
# the backend's own pool serves writes.
ENGINE_POOL_SIZE: Final = 2
ENGINE_MAX_OVERFLOW: Final = 6
_READ_ONLY: Final = "callindex_read_only"


def _configure_sqlite(engine: Engine, backend: Backend) -> None:
    """Install the connection and transaction settings SQLite needs (idempotent)."""
    if event.contains(engine, "connect", _on_sqlite_connect):
        return
    event.listen(engine, "connect", _on_sqlite_connect)

    def begin(connection: Connection) -> None:
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        backend.begin(connection, read_only=read_only)

    event.listen(engine, "begin", begin)
    # Connections pooled before the listeners existed never saw them.
    engine.dispose()


def _on_sqlite_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Hand transaction control to SQLAlchemy's "begin" event (BEGIN IMMEDIATE)
    # instead of pysqlite's implicit deferred BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _on_postgresql_connect(dbapi_connection: Any, _record: object) -> None:
    # Acknowledged means on disk, whatever the server or role default says.
    dbapi_connection.execute("SET synchronous_commit = on")
    dbapi_connection.commit()


def build_engine(
    url: str | URL, busy_timeout_seconds: float = SQLITE_BUSY_TIMEOUT_SECONDS
) -> Engine:
    """An engine for ``url``, configured for callindex's concurrency needs.

    A SQLite file is opened read-write without being created: a missing file
    surfaces as :class:`SchemaMissingError`, and only :meth:`Database.prepare_file`
    (called by the migrations) creates it.
    """
    parsed = parse_url(url)
    pool = {
        "pool_size": ENGINE_POOL_SIZE,
        "max_overflow": ENGINE_MAX_OVERFLOW,
        "pool_timeout": busy_timeout_seconds,
    }
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_file(parsed)
        timeout = parsed.query.get("timeout", str(busy_timeout_seconds))
        try:
            if float(timeout) < 0:  # type: ignore[arg-type]
                raise ValueError(timeout)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"timeout must be seconds >= 0, not {timeout!r}") from error
        uri = URL.create(
            "sqlite+pysqlite",
            database=f"file:{quote(str(path))}",
            query={"mode": "rw", "uri": "true", "timeout": timeout},
        )
        return create_engine(uri, hide_parameters=True, **pool)
    connect_args: dict[str, Any] = {"application_name": "callindex"}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = POSTGRESQL_CONNECT_TIMEOUT_SECONDS
    try:
        # Parameters (payloads) stay out of error messages and logs.
        engine = create_engine(parsed, connect_args=connect_args, hide_parameters=True, **pool)
    except exc.ArgumentError as error:  # e.g. host and port lists that do not pair up
        raise ConfigurationError(
            "the database URL's hosts and ports do not pair up: give each server as "
            "host=HOST:PORT (postgresql+psycopg://USER@/DB?host=H1:5432&host=H2:5432)"
        ) from error
    event.listen(engine, "connect", _on_postgresql_connect)
    return engine


@dataclass(eq=False)
class Shared:
    """An engine and its backend, shared by the recorders of one database."""

    engine: Engine
    backend: Backend
    display_url: str
    users: int = 0
    key: tuple[Any, ...] = field(default=())


_SHARED: dict[tuple[Any, ...], Shared] = {}
_SHARED_LOCK = threading.RLock()  # a finalizer may run while it is held
_FORK_HANDLER_INSTALLED = False


def _forget_after_fork() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.RLock()  # another thread may have held it at fork
    for shared in list(_SHARED.values()):
        shared.backend.forget_inherited()


def _acquire(
    url_or_engine: str | URL | Engine, policy: DatabaseRetryPolicy, early_release: bool | None
) -> Shared:
    global _FORK_HANDLER_INSTALLED
    attempt = policy.attempt_seconds
    if isinstance(url_or_engine, Engine):
        parse_url(url_or_engine.url)  # refuses unsupported backends
        key: tuple[Any, ...] = ("engine", id(url_or_engine), attempt, early_release)
    else:
        url_or_engine = anchored(parse_url(url_or_engine))
        key = (url_or_engine.render_as_string(hide_password=False), attempt, early_release)
    with _SHARED_LOCK:
        if not _FORK_HANDLER_INSTALLED:
            os.register_at_fork(after_in_child=_forget_after_fork)
            _FORK_HANDLER_INSTALLED = True
        shared = _SHARED.get(key)
        if shared is None:
            shared = _create(url_or_engine, attempt, early_release)
            shared.key = key
            _SHARED[key] = shared
        shared.users += 1
        return shared


def _create(
    url_or_engine: str | URL | Engine, attempt: float, early_release: bool | None
) -> Shared:
    if isinstance(url_or_engine, Engine):
        engine = url_or_engine
        where = display_url(engine.url)
    else:
        engine = build_engine(url_or_engine, busy_timeout_seconds=attempt)
        where = display_url(parse_url(url_or_engine))
    backend: Backend
    if engine.dialect.name == "postgresql":
        backend = PostgreSQLBackend(
            engine, where, attempt, DEFAULT_POOL_SIZE, early_release=early_release
        )
    else:
        backend = SQLiteBackend(engine, where, attempt, DEFAULT_POOL_SIZE)
        _configure_sqlite(engine, backend)
    return Shared(engine=engine, backend=backend, display_url=where)


def _release(shared: Shared, owns_engine: bool) -> None:
    with _SHARED_LOCK:
        shared.users -= 1
        if shared.users > 0:
            return
        _SHARED.pop(shared.key, None)
    shared.backend.pool.close()
    if owns_engine:
        shared.engine.dispose()


class Statements:
    """Runs callindex's named queries on one SQLAlchemy connection."""

    def __init__(self, db: Database, connection: Connection) -> None:
        self.db = db
        self.connection = connection

    def rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
        """The rows ``name`` returns (none for a statement without RETURNING)."""
        result = self.connection.execute(self.db.statement(name), dict(params or {}))
        return [dict(row._mapping) for row in result] if result.returns_rows else []

    def count(self, name: str, params: Mapping[str, Any] | None = None) -> int:
        """How many rows statement ``name`` (an UPDATE or DELETE) touched."""
        result = self.connection.execute(self.db.statement(name), dict(params or {}))
        return int(result.rowcount)


class Database:
    """One database as one recorder sees it: the shared engine and backend, and
    this recorder's retry policy."""

    def __init__(
        self,
        url_or_engine: str | URL | Engine,
        retry: DatabaseRetryPolicy | None = None,
        *,
        early_release: bool | None = None,
    ) -> None:
        self.retry = retry or DatabaseRetryPolicy()
        shared = _acquire(url_or_engine, self.retry, early_release)
        self.engine: Engine = shared.engine
        self.backend: Backend = shared.backend
        self.display_url: str = shared.display_url
        self._release = weakref.finalize(
            self, _release, shared, not isinstance(url_or_engine, Engine)
        )

    @property
    def name(self) -> str:
        """``"postgresql"`` or ``"sqlite"``."""
        return self.backend.name

    def statement(self, name: str) -> Executable:
        """The named query, compiled once per process and backend."""
        return _statement(self.backend.name, name)

    def prepare_file(self) -> None:
        """Create the SQLite file if it does not exist yet (no-op on PostgreSQL)."""
        path = self.backend.sqlite_path
        if path is not None:
            try:
                path.touch(exist_ok=True)
            except OSError as error:
                raise ConfigurationError(
                    f"cannot create {str(path)!r}: {error.strerror}"
                ) from error

    def write(self, operation: Callable[[Backend], T]) -> T:
        """Run one hot-path operation of the backend, retried under the policy."""
        backend = self.backend
        return self.retry.call(lambda: operation(backend))

    def run(self, work: Callable[[Statements], T], *, connection: Connection | None = None) -> T:
        """Run ``work`` as one committed write and return its result.

        With ``connection``, ``work`` joins the caller's transaction, which the
        caller commits or rolls back, and is not retried. Otherwise callindex
        commits before returning and retries the whole of ``work`` under the
        retry policy, so it must be safe to repeat.
        """
        if connection is not None:
            with self.translated_errors():
                return work(Statements(self, connection))

        pinned = self.name == "postgresql"

        def attempt() -> T:
            with self.translated_errors(), self.engine.begin() as transaction:
                statements = Statements(self, transaction)
                if pinned:
                    statements.rows("write_isolation")
                return work(statements)

        return self.retry.call(attempt)

    def read(self, work: Callable[[Statements], T]) -> T:
        """Run ``work`` in a read-only transaction that is rolled back afterwards
        (retried). All its statements read one snapshot (on SQLite, the read
        transaction's; on PostgreSQL, REPEATABLE READ), so a check never sees a
        write half-way: a purge, a seal, a call landing."""
        # One statement in the transaction, not session settings that the pool
        # would set and reset around every read.
        snapshot = self.name == "postgresql"

        def attempt() -> T:
            with self.translated_errors(), self.engine.connect() as conn:
                statements = Statements(self, conn.execution_options(**{_READ_ONLY: True}))
                if snapshot:
                    statements.rows("read_snapshot")
                return work(statements)

        return self.retry.call(attempt)

    def dispose(self) -> None:
        """Give this recorder's share back; the last one closes the connections."""
        self._release()

    @contextmanager
    def translated_errors(self) -> Iterator[None]:
        """Re-raise driver and SQLAlchemy errors as :mod:`callindex.errors` types."""
        with translated(
            self.display_url,
            sqlite_path=self.backend.sqlite_path,
            unique_columns=self.backend.unique_columns,
        ):
            yield


# Queries that return call rows: their payloads and timestamps are typed so
# both backends hand back decoded JSON and datetimes.
_RETURNS_CALLS: Final = frozenset({"find_call", "calls_of_state", "calls_with_request_hash"})


@functools.cache
def _statement(backend: str, name: str) -> Executable:
    statement = queries(backend)[name]
    if name not in _RETURNS_CALLS:
        return statement
    columns = calls_table.c
    return statement.columns(
        request=columns.request.type,
        response=columns.response.type,
        error=columns.error.type,
        created_at=columns.created_at.type,
        completed_at=columns.completed_at.type,
    )
