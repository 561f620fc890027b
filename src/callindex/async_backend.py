"""The PostgreSQL write path on psycopg's asyncio connections.

:class:`AsyncPostgreSQLBackend` runs the same prepared statements as
:class:`~callindex.backends.PostgreSQLBackend` (one round trip per write, in
autocommit, durable), on a small pool of ``psycopg.AsyncConnection`` per
event loop. It shares the synchronous backend's settings, its adaptive early
release and its error translation, so both paths behave alike, and connects
with the engine's own arguments (its URL and ``connect_args``).

A loop's connections are closed when the loop shuts down (``asyncio.run``
ends), when a later loop finds that loop closed, or when the backend closes.

A task cancelled while a statement runs has psycopg cancel it on the server
and wait for the outcome: the statement either committed whole or not at all,
and the connection goes back to the pool clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import Engine

from callindex.backends import (
    _INHERITED,
    INSERT_AT_LOCKS,
    CallIdTaken,
    Inserted,
    PostgreSQLBackend,
    inserted_any,
    inserted_at,
    named,
)
from callindex.database import POSTGRESQL_CONNECT_TIMEOUT_SECONDS, Database
from callindex.errors import ConfigurationError, ContentionError, UnknownStateError
from callindex.resources import positional_sql
from callindex.urls import display_url

T = TypeVar("T")
Connection = psycopg.AsyncConnection[Any]
_ALLOCATION: Final = {False: "allocate_call_index", True: "allocate_opening"}


def connect_arguments(engine: Engine) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments ``engine`` hands its driver: those
    of its URL with its ``connect_args`` on top, as ``create_engine`` keeps
    them in the creator it gives the pool.

    Raises :class:`ConfigurationError` for an engine that connects through a
    ``creator`` (or a pool) of its own: that makes sync connections only.
    """
    creator = engine.pool._creator
    if (
        getattr(creator, "__module__", None) != "sqlalchemy.engine.create"
        or getattr(creator, "__qualname__", None) != "create_engine.<locals>.connect"
    ):
        raise ConfigurationError(
            f"the engine for {display_url(engine.url)} connects through a creator "
            f"of its own ({creator!r}), which AsyncCallRecorder cannot use for asyncio "
            "connections: pass the URL, or an Engine made with connect_args instead"
        )
    captured = inspect.getclosurevars(creator).nonlocals
    if "cargs_tup" not in captured or "cparams" not in captured:
        raise ConfigurationError(
            "cannot read the connection arguments of an Engine of this SQLAlchemy version: "
            "pass the database URL to AsyncCallRecorder instead"
        )
    return list(captured["cargs_tup"]), dict(captured["cparams"])


def _at_loop_shutdown(callback: Callable[[], None]) -> Callable[[], None]:
    """Have the running event loop call ``callback`` when it shuts down its
    async generators (``asyncio.run`` and ``asyncio.Runner`` do, just before
    closing it). Returns a function that calls ``callback`` at once instead;
    either way it is called once."""
    ended = False

    async def watch() -> AsyncGenerator[None]:
        nonlocal ended
        try:
            yield
        finally:
            ended = True
            callback()

    watcher = watch()
    # Started on the running loop, which keeps track of it from then on.
    with contextlib.suppress(StopIteration):
        watcher.asend(None).send(None)

    def now() -> None:
        if not ended:
            with contextlib.suppress(StopIteration):
                watcher.aclose().send(None)

    return now


class AsyncDriverPool:
    """At most ``size`` async driver connections of the running event loop,
    reused; closed with the loop. Make it on that loop."""

    def __init__(
        self, connect: Callable[[], Awaitable[Connection]], size: int, wait_seconds: float
    ) -> None:
        self._connect = connect
        self.size = size
        self.wait_seconds = wait_seconds
        self.closed = False
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(size)
        self._pid = os.getpid()
        self._stop_watching = _at_loop_shutdown(self.discard)

    def _forget_if_forked(self) -> None:
        if self._pid != os.getpid():  # forked: the connections are the parent's
            _INHERITED.extend(self._idle)
            self._idle, self._pid = [], os.getpid()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        self._forget_if_forked()
        try:
            # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation.
            async with asyncio.timeout(self.wait_seconds):
                await self._slots.acquire()
        except TimeoutError:
            raise ContentionError(
                f"all {self.size} connections of this event loop stayed busy for "
                f"{self.wait_seconds:g} s"
            ) from None
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            finally:
                self._give_back(conn)
        finally:
            self._slots.release()

    def _give_back(self, conn: Connection) -> None:
        idle = psycopg.pq.TransactionStatus.IDLE
        if not (self.closed or conn.closed or conn.broken) and conn.info.transaction_status == idle:
            self._idle.append(conn)
        else:
            conn.pgconn.finish()  # unknown state: never reused, closed without a round trip

    def discard(self) -> None:
        """Close the pool without a round trip, from any thread (its loop may be
        gone); connections in use are closed when they are given back."""
        if self.closed:
            return
        self.closed = True
        self._forget_if_forked()
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.pgconn.finish()
        self._stop_watching()

    async def close(self) -> None:
        """Close the pool (on its own loop); connections in use are closed when
        they are given back."""
        if self.closed:
            return
        self.closed = True
        self._forget_if_forked()
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
        self._stop_watching()


class AsyncPostgreSQLBackend:
    """The write path of :class:`~callindex.backends.PostgreSQLBackend`, awaited.

    Each method is one attempt; :class:`AsyncDatabase` retries.
    """

    def __init__(self, backend: PostgreSQLBackend) -> None:
        self.backend = backend
        self._cargs, self._cparams = connect_arguments(backend.engine)
        self._pools: dict[asyncio.AbstractEventLoop, AsyncDriverPool] = {}

    @property
    def pool(self) -> AsyncDriverPool:
        """The running event loop's pool (connections never cross loops)."""
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None or pool.closed:
            for other, stale in list(self._pools.items()):
                if stale.closed or other.is_closed():
                    stale.discard()
                    self._pools.pop(other, None)
            pool = AsyncDriverPool(
                self._connect, self.backend.pool.size, self.backend.attempt_seconds
            )
            self._pools[loop] = pool
        return pool

    async def close(self) -> None:
        """Close the connections of every event loop (the running one's cleanly)."""
        pools, self._pools = self._pools, {}
        running = asyncio.get_running_loop()
        for loop, pool in pools.items():
            if loop is running:
                await pool.close()
            else:
                pool.discard()

    def _arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """The engine's connection arguments, as its ``do_connect`` listeners
        leave them (they may set a password or token per connection)."""
        cargs, cparams = list(self._cargs), dict(self._cparams)
        dialect = self.backend.engine.dialect
        for listener in dialect.dispatch.do_connect:
            made = listener(dialect, None, cargs, cparams)
            if made is not None:
                made.close()
                raise ConfigurationError(
                    "a do_connect listener of the engine makes the connections itself, "
                    "which AsyncCallRecorder cannot use for asyncio connections"
                )
        cparams.setdefault("application_name", "callindex")
        cparams.setdefault("connect_timeout", POSTGRESQL_CONNECT_TIMEOUT_SECONDS)
        cparams["autocommit"] = True
        return cargs, cparams

    async def _connect(self) -> Connection:
        cargs, cparams = self._arguments()
        with self.backend.translated():
            conn = await psycopg.AsyncConnection.connect(*cargs, **cparams)
            try:
                await conn.execute(self.backend.session_settings)
            except BaseException:
                conn.pgconn.finish()
                raise
        return conn

    @staticmethod
    async def _execute(
        conn: Connection, name: str, parameters: Mapping[str, Any]
    ) -> psycopg.AsyncCursor[Any]:
        sql, order = positional_sql(name)
        return await conn.execute(sql, [parameters[key] for key in order], prepare=True)

    async def _write(self, name: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        parameters["synchronous_commit"] = "on"
        async with self.pool.connection() as conn:
            cursor = await self._execute(conn, name, parameters)
            return await cursor.fetchall()

    async def _write_at(self, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        parameters["synchronous_commit"] = "on"
        async with self.pool.connection() as conn, conn.transaction():
            for name in INSERT_AT_LOCKS:
                await self._execute(conn, name, parameters)
            cursor = await self._execute(conn, "insert_call_at", parameters)
            return await cursor.fetchall()

    async def rows(self, name: str, parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The rows of read query ``name``, as ``{column: value}``."""
        sql, order = positional_sql(name)
        with self.backend.translated():
            async with self.pool.connection() as conn:
                cursor = conn.cursor(row_factory=dict_row)
                await cursor.execute(sql, [parameters[key] for key in order], prepare=True)
                return await cursor.fetchall()

    async def flush(self) -> None:
        with self.backend.translated():
            await self._write("flush_commits", {})

    async def open_state(self, state_id: str) -> None:
        with self.backend.translated():
            await self._write("open_state", {"state_id": state_id})

    async def allocate(self, state_id: str, count: int, *, opening: bool = False) -> int:
        with self.backend.translated():
            rows = await self._write(_ALLOCATION[opening], {"state_id": state_id, "count": count})
        if not rows:
            raise UnknownStateError(state_id)
        return int(rows[0][0])

    async def allocate_many(
        self, counts: Mapping[str, int], *, opening: bool = False
    ) -> dict[str, int]:
        with self.backend.translated():
            async with self.pool.connection() as conn, conn.transaction():
                first = {}
                for state_id in sorted(counts):  # one lock order for every caller
                    parameters = {
                        "state_id": state_id,
                        "count": counts[state_id],
                        "synchronous_commit": "on",
                    }
                    cursor = await self._execute(conn, _ALLOCATION[opening], parameters)
                    row = await cursor.fetchone()
                    if row is None:
                        raise UnknownStateError(state_id)
                    first[state_id] = int(row[0])
                return first

    async def insert_call(
        self, parameters: Mapping[str, Any], *, opening: bool = False
    ) -> Inserted:
        rows = await self._insert(self.backend.insert_statement(opening=opening), parameters)
        if opening and not inserted_any(rows):
            rows = await self._insert("insert_call_opening", parameters)
        return self.backend.inserted(rows, parameters)

    async def _insert(self, statement: str, parameters: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        with self.backend.translated():
            try:
                return await self._write(statement, dict(parameters))
            except psycopg.errors.UniqueViolation:
                if await self._recorded(parameters["call_id"]):
                    raise CallIdTaken from None
                raise

    async def insert_call_at(self, parameters: Mapping[str, Any]) -> Inserted | None:
        with self.backend.translated():
            try:
                rows = await self._write_at(dict(parameters))
            except psycopg.errors.UniqueViolation:
                if await self._recorded(parameters["call_id"]):
                    raise CallIdTaken from None
                return None
        return inserted_at(rows)

    async def _recorded(self, call_id: str) -> bool:
        async with self.pool.connection() as conn:
            cursor = await self._execute(conn, "find_call_index", {"call_id": call_id})
            return await cursor.fetchone() is not None

    async def finish_call(self, parameters: Mapping[str, Any]) -> Mapping[str, Any] | None:
        with self.backend.translated():
            async with self.pool.connection() as conn:
                cursor = await self._execute(
                    conn, "finish_call", {**parameters, "synchronous_commit": "on"}
                )
                return named(cursor.description, await cursor.fetchone())


class AsyncDatabase:
    """A PostgreSQL :class:`~callindex.database.Database` on the asyncio write
    path: its async backend, under the database's retry policy."""

    def __init__(self, db: Database) -> None:
        assert isinstance(db.backend, PostgreSQLBackend)
        self.db = db
        self.backend = AsyncPostgreSQLBackend(db.backend)

    async def write(self, operation: Callable[[AsyncPostgreSQLBackend], Awaitable[T]]) -> T:
        """One operation of the async backend, retried under the policy."""
        backend = self.backend
        return await self.db.retry.call_async(lambda: operation(backend))

    async def rows(self, name: str, parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The rows of read query ``name`` (retried)."""
        backend = self.backend
        return await self.db.retry.call_async(lambda: backend.rows(name, parameters))
