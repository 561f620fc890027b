"""Engines, transactions and the one boundary where driver errors become ours.

Every statement callindex runs goes through :class:`Database`, which

* builds an engine for the two supported backends (PostgreSQL through
  psycopg 3, SQLite through the standard library) and configures SQLite for
  concurrent writers: WAL journal, a busy timeout, foreign keys, and
  ``BEGIN IMMEDIATE`` for every transaction so a reader never has to upgrade
  to a writer (which fails at once under WAL instead of waiting);
* runs a unit of work in the right kind of transaction;
* maps driver errors to :mod:`callindex.errors` types, chained ``from`` the
  original, without ever putting a password in a message.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote, unquote

import psycopg
from sqlalchemy import (
    URL,
    Connection,
    Dialect,
    Engine,
    Executable,
    create_engine,
    event,
    exc,
    make_url,
)
from sqlalchemy.pool import PoolProxiedConnection

from callindex.errors import (
    CallIndexError,
    ConfigurationError,
    ContentionError,
    CounterBehindError,
    DatabaseError,
    DatabaseUnavailableError,
    ImmutableCallError,
    SchemaMissingError,
)
from callindex.redaction import is_sensitive
from callindex.resources import queries
from callindex.retry import DatabaseRetryPolicy
from callindex.schema import calls as calls_table

T = TypeVar("T")

DEFAULT_URL: Final = "sqlite:///callindex.db"
URL_ENVIRONMENT_VARIABLE: Final = "CALLINDEX_DATABASE_URL"
SQLITE_BUSY_TIMEOUT_SECONDS: Final = 10.0
POSTGRESQL_CONNECT_TIMEOUT_SECONDS: Final = 10

_UNIQUE_VIOLATION: Final = "23505"
_CALL_GUARD: Final = "CX001"  # raised by the callindex_guard_calls trigger
_UNDEFINED_TABLE: Final = "42P01"
_UNDEFINED_FUNCTION: Final = "42883"
_CONTENTION_SQLSTATES: Final = frozenset({"40001", "40P01", "55P03"})
_UNAVAILABLE_SQLSTATES: Final = frozenset({"57P01", "57P02", "57P03"})
_SQLITE_BUSY_CODES: Final = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
_READ_ONLY: Final = "callindex_read_only"
# psycopg reports these connection failures without an SQLSTATE; no retry fixes them.
# ("the database system is starting up" is not among them: that one passes.)
_PERMANENT_CONNECT_FAILURES: Final = (
    "does not exist",
    "authentication failed",
    "no pg_hba.conf entry",
    "invalid connection option",
    "invalid integer value",
)


def display_url(url: URL) -> str:
    """``url`` for messages and logs: no password, no secret query values."""
    query = {k: ("***" if is_sensitive(k) else v) for k, v in url.query.items()}
    return url.set(query=query).render_as_string(hide_password=True)


def parse_url(url: str | URL) -> URL:
    """Parse and normalise a database URL, or raise :class:`ConfigurationError`.

    ``postgresql://`` and ``postgres://`` select psycopg 3; only the
    ``postgresql+psycopg`` and ``sqlite``/``sqlite+pysqlite`` forms are accepted.
    """
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018  (a non-numeric port raises here)
    except (exc.ArgumentError, ValueError) as error:
        # The text is not echoed: whatever it holds may include a password.
        raise ConfigurationError(
            "not a database URL (expected postgresql+psycopg://USER@HOST/DB or sqlite:///FILE)"
        ) from error
    backend = parsed.get_backend_name()
    driver = parsed.get_driver_name()
    if backend in ("postgresql", "postgres"):
        if "+" in parsed.drivername and driver != "psycopg":
            raise ConfigurationError(
                f"unsupported PostgreSQL driver {driver!r}: use postgresql+psycopg://"
            )
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver != "pysqlite":
            raise ConfigurationError(f"unsupported SQLite driver {driver!r}: use sqlite:///FILE")
        return parsed
    raise ConfigurationError(
        f"unsupported database {backend!r}: callindex runs on PostgreSQL "
        "(postgresql+psycopg://...) and SQLite (sqlite:///FILE)"
    )


def sqlite_file(url: URL) -> Path:
    """The file of a SQLite URL; in-memory databases are refused."""
    name = url.database or ""
    if name in ("", ":memory:") or url.query.get("mode") == "memory":
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared between connections: "
            "use a file, e.g. sqlite:///callindex.db"
        )
    if name.startswith("file:"):
        name = unquote(name.removeprefix("file:"))
    return Path(name).expanduser().resolve()


def _configure_sqlite(engine: Engine) -> None:
    """Install the connection and transaction settings SQLite needs (idempotent)."""
    if event.contains(engine, "begin", _begin_immediate):
        return
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _begin_immediate)
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


def _begin_immediate(connection: Connection) -> None:
    # Readers need no lock under WAL: a plain (deferred) BEGIN keeps them from
    # queueing behind writers.
    read_only = connection.get_execution_options().get(_READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def build_engine(url: str | URL) -> Engine:
    """An engine for ``url``, configured for callindex's concurrency needs.

    A SQLite file is opened read-write without being created: a missing file
    surfaces as :class:`SchemaMissingError`, and only :meth:`Database.prepare_file`
    (called by the migrations) creates it.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_file(parsed)
        timeout = parsed.query.get("timeout", str(SQLITE_BUSY_TIMEOUT_SECONDS))
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
        engine = create_engine(uri, hide_parameters=True)
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {"application_name": "callindex"}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = POSTGRESQL_CONNECT_TIMEOUT_SECONDS
    if "options" not in parsed.query:
        # Acknowledged means on disk, whatever the server or role default says.
        connect_args["options"] = "-c synchronous_commit=on"
    # Parameters (payloads) stay out of error messages and logs.
    return create_engine(parsed, connect_args=connect_args, hide_parameters=True)


class Statements:
    """Runs callindex's named queries on one connection.

    With ``early_release`` (PostgreSQL, one write that commits by itself) the
    statement is sent in one round trip as::

        BEGIN; SET LOCAL synchronous_commit = off; <statement>; COMMIT;
        SELECT pg_logical_emit_message(true, 'callindex', '')

    Its COMMIT releases the row locks as soon as the commit record is in the
    write-ahead log, without waiting for the disk: the next writer of a hot
    counter proceeds at once. The trailing transaction writes one small WAL
    record, so its commit is synchronous and waits until the log is flushed
    past it (a transaction that only takes an xid, such as
    ``pg_current_xact_id()``, writes no WAL of its own and would commit
    asynchronously: the crash test caught exactly that). The log is
    sequential, so by then the statement's commit is on disk too, and only
    then does this return: nothing is acknowledged before it is durable. A
    crash in between loses only the unacknowledged statement, and with it
    every transaction that saw its effects (they come later in the log).
    """

    def __init__(
        self,
        db: Database,
        connection: Connection | None = None,
        *,
        pooled: PoolProxiedConnection | None = None,
    ) -> None:
        """Over an SQLAlchemy ``connection``, or, for early release, over a
        ``pooled`` psycopg connection (no Connection object: the hot path)."""
        self.db = db
        self._connection = connection
        self._pooled = pooled

    @property
    def connection(self) -> Connection:
        assert self._connection is not None, "no SQLAlchemy connection on the early-release path"
        return self._connection

    def rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
        """The rows ``name`` returns (none for a statement without RETURNING)."""
        if self._pooled is not None:
            return self._rows_released_early(self._pooled, name, params or {})
        result = self.connection.execute(self.db.statement(name), dict(params or {}))
        return [dict(row._mapping) for row in result] if result.returns_rows else []

    def _rows_released_early(
        self, pooled: PoolProxiedConnection, name: str, params: Mapping[str, Any]
    ) -> list[Mapping[str, Any]]:
        raw = pooled.driver_connection
        assert isinstance(raw, psycopg.Connection)
        script = _EARLY_RELEASE.format(statement=self.db.driver_sql(name))
        try:
            # The script manages its own transactions; the pool gets the
            # connection back as it lent it.
            raw.autocommit = True
            with psycopg.ClientCursor(raw) as cursor:
                cursor.execute(script, params)
                cursor.nextset()  # past BEGIN
                cursor.nextset()  # past SET LOCAL: now at the statement
                if cursor.description is None:
                    return []
                names = [column.name for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        except psycopg.Error as error:
            broken = raw.closed or raw.broken
            if broken:
                pooled.invalidate()
            raise exc.DBAPIError.instance(
                name, None, error, psycopg.Error, connection_invalidated=broken
            ) from error
        finally:
            _give_back(pooled, raw)


def _give_back(pooled: PoolProxiedConnection, raw: psycopg.Connection[Any]) -> None:
    """Leave the connection as the pool lent it: idle, not in autocommit."""
    if raw.closed or raw.broken:
        return
    try:
        if raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raw.execute("ROLLBACK")  # a statement of the script failed mid-transaction
        raw.autocommit = False
    except psycopg.Error:
        pooled.invalidate()


_EARLY_RELEASE: Final = (
    "BEGIN; SET LOCAL synchronous_commit = off; {statement}; COMMIT; "
    "SELECT pg_logical_emit_message(true, 'callindex', '')"
)


class Database:
    """One database, its engine, and the transactions callindex runs in it."""

    def __init__(
        self, url_or_engine: str | URL | Engine, retry: DatabaseRetryPolicy | None = None
    ) -> None:
        self.retry = retry or DatabaseRetryPolicy()
        if isinstance(url_or_engine, Engine):
            self.engine = url_or_engine
            self.display_url = display_url(self.engine.url)
            parse_url(self.engine.url)  # refuses unsupported backends
            if self.engine.dialect.name == "sqlite":
                _configure_sqlite(self.engine)
        else:
            self.engine = build_engine(url_or_engine)
            self.display_url = display_url(parse_url(url_or_engine))
        self.backend: str = self.engine.dialect.name

    def statement(self, name: str) -> Executable:
        """The named query, compiled once per process and backend."""
        return _statement(self.backend, name)

    def driver_sql(self, name: str) -> str:
        """The named query as psycopg's own SQL text (``%(name)s`` parameters)."""
        return _driver_sql(self.engine.dialect, name)

    def prepare_file(self) -> None:
        """Create the SQLite file if it does not exist yet (no-op on PostgreSQL)."""
        if self.backend == "sqlite":
            path = sqlite_file(self.engine.url)
            try:
                path.touch(exist_ok=True)
            except OSError as error:
                raise ConfigurationError(
                    f"cannot create {str(path)!r}: {error.strerror}"
                ) from error

    def run(
        self,
        work: Callable[[Statements], T],
        *,
        connection: Connection | None = None,
        single_statement: bool = False,
    ) -> T:
        """Run ``work`` as one committed write and return its result.

        With ``connection``, ``work`` joins the caller's transaction, which the
        caller commits or rolls back, and is not retried. Otherwise callindex
        commits before returning and retries the whole of ``work`` under the
        retry policy, so it must be safe to repeat. ``single_statement``
        declares that ``work`` writes with one statement (reads may follow): on
        PostgreSQL it then commits by itself with early lock release (see
        :class:`Statements`), one round trip.
        """
        if connection is not None:
            with self.translated_errors():
                return work(Statements(self, connection))

        def attempt() -> T:
            with self.translated_errors():
                if single_statement and self.backend == "postgresql":
                    pooled = self.engine.raw_connection()
                    try:
                        return work(Statements(self, pooled=pooled))
                    finally:
                        pooled.close()
                with self.engine.begin() as transaction:
                    return work(Statements(self, transaction))

        return self.retry.call(attempt)

    def read(self, work: Callable[[Statements], T]) -> T:
        """Run ``work`` in a transaction that is rolled back afterwards (retried)."""

        def attempt() -> T:
            with self.translated_errors(), self.engine.connect() as conn:
                reader = conn.execution_options(**{_READ_ONLY: True})
                return work(Statements(self, reader))

        return self.retry.call(attempt)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def translated_errors(self) -> Iterator[None]:
        """Re-raise driver and SQLAlchemy errors as :mod:`callindex.errors` types."""
        try:
            yield
        except CallIndexError:
            raise
        except exc.DBAPIError as error:
            raise self._translate(error) from error
        except psycopg.Error as error:  # raised outside SQLAlchemy, e.g. a pool checkout
            wrapped = exc.DBAPIError.instance(None, None, error, psycopg.Error)
            assert isinstance(wrapped, exc.DBAPIError)
            raise self._translate(wrapped) from error
        except exc.SQLAlchemyError as error:
            raise DatabaseError(f"{type(error).__name__} on {self.display_url}") from error

    def _translate(self, error: exc.DBAPIError) -> CallIndexError:
        original = error.orig
        detail = str(original).strip().splitlines()[0] if str(original).strip() else ""
        sqlstate = getattr(original, "sqlstate", None)
        sqlite_code = getattr(original, "sqlite_errorname", None)
        where = self.display_url
        if sqlstate in (_UNDEFINED_TABLE, _UNDEFINED_FUNCTION) or "no such table" in detail:
            return SchemaMissingError(
                f"the callindex schema is missing from {where}: run `callindex db upgrade`"
            )
        if "the counter is behind its calls" in detail:
            return _counter_behind()
        if sqlstate == _CALL_GUARD or detail.startswith("callindex: "):
            return ImmutableCallError(detail)
        if isinstance(error, exc.IntegrityError):
            return self._translate_integrity(error, detail)
        if sqlstate in _CONTENTION_SQLSTATES or sqlite_code in _SQLITE_BUSY_CODES:
            return ContentionError(f"the database stayed busy ({detail}) on {where}")
        if (
            error.connection_invalidated
            or sqlstate in _UNAVAILABLE_SQLSTATES
            or (sqlstate or "").startswith("08")
            or (isinstance(error, exc.OperationalError) and sqlstate is None and not sqlite_code)
        ):
            if sqlstate is None and any(p in detail for p in _PERMANENT_CONNECT_FAILURES):
                return ConfigurationError(f"the database {where} refused the connection: {detail}")
            return DatabaseUnavailableError(f"cannot reach the database {where}: {detail}")
        if sqlite_code == "SQLITE_CANTOPEN":
            path = sqlite_file(self.engine.url)
            if not path.exists():
                return SchemaMissingError(
                    f"the database file {str(path)!r} does not exist: run `callindex db upgrade`"
                )
            return ConfigurationError(f"cannot open the database {where}: {detail}")
        return DatabaseError(f"{type(original).__name__}: {detail} (on {where})")

    def _translate_integrity(self, error: exc.IntegrityError, detail: str) -> CallIndexError:
        diagnostics = getattr(error.orig, "diag", None)
        constraint = getattr(diagnostics, "constraint_name", None) or ""
        key = getattr(diagnostics, "message_detail", None) or ""
        if (
            constraint == "uq_calls_state_id_call_index"
            or key.startswith("Key (state_id, call_index)=")  # an adopted table's own index
            or "calls.call_index" in detail
        ):
            return _counter_behind()
        if constraint == "pk_calls" or "calls.call_id" in detail:
            # The same call_id, recorded by a concurrent attempt that committed
            # first. This statement rolled back whole; retrying finds that call.
            return ContentionError("the same call_id was being recorded concurrently")
        return DatabaseError(f"integrity error: {detail}")


def _counter_behind() -> CounterBehindError:
    return CounterBehindError(
        "a call index collided with a recorded call: the state's counter is behind "
        "its calls (calls were written without the allocator); run `callindex repair`"
    )


# Queries that return call rows: their payloads and timestamps are typed so
# both backends hand back decoded JSON and datetimes.
_RETURNS_CALLS: Final = frozenset(
    {"record_call", "insert_call", "finish_call", "find_call", "calls_of_state"}
)


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


@functools.cache
def _driver_sql(dialect: Dialect, name: str) -> str:
    return str(queries(dialect.name)[name].compile(dialect=dialect))
