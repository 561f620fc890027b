"""``AsyncCallRecorder``: :class:`~callindex.recorder.CallRecorder` for asyncio."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import URL, Engine

from callindex import allocator, audit, calls, migrations
from callindex.async_backend import AsyncDatabase
from callindex.calls import Call, CallType, FinalStatus
from callindex.database import Database
from callindex.purges import Purge
from callindex.recorder import (
    CallRecorder,
    completed_call,
    pending_call,
    validate_counts,
    validate_request_hash,
)
from callindex.retry import DatabaseRetryPolicy
from callindex.seals import Seal

P = ParamSpec("P")
T = TypeVar("T")


class AsyncCallRecorder:
    """The methods of :class:`~callindex.recorder.CallRecorder`, awaited, with
    the same arguments, results, errors and guarantees.

    On PostgreSQL, allocation, recording and reads run on psycopg's asyncio
    connections (at most 8 per event loop, closed when the loop shuts down;
    made with the URL and ``connect_args`` of the engine), never blocking the
    loop and needing no thread. On SQLite, whose driver has no asyncio interface, every
    operation runs on one worker thread per database file (shared by the
    recorders of that file in the process; SQLite takes one writer at a
    time anyway). Maintenance (``upgrade``, ``verify``, ``seal``, ``sweep``,
    ``purge``, ``repair``) runs in a worker thread on both.

    Cancelling a task that awaits a write never leaves half a call: the write
    commits whole or not at all (PostgreSQL cancels the statement on the
    server and waits for its outcome; on SQLite the worker thread finishes
    the transaction it began). Which of the two happened, a retry with the
    same ``call_id`` finds out: it returns the recorded call or records it.

    There is no ``connection=`` argument: joining a caller's transaction is
    the synchronous recorder's. Close the recorder with ``await
    recorder.close()`` or ``async with``.
    """

    def __init__(
        self,
        url_or_engine: str | URL | Engine,
        *,
        retry: DatabaseRetryPolicy | None = None,
        early_release: bool | None = None,
        auto_open: bool = False,
    ) -> None:
        self._sync = CallRecorder(
            url_or_engine, retry=retry, early_release=early_release, auto_open=auto_open
        )
        db = Database(url_or_engine, retry=retry, early_release=early_release)
        self._db = db
        self._auto_open = auto_open
        try:
            self._native = AsyncDatabase(db) if db.name == "postgresql" else None
        except BaseException:
            self._sync.close()
            db.dispose()
            raise
        self._worker = None if db.backend.sqlite_path is None else _worker(db.backend.sqlite_path)
        self._worker_pid = os.getpid()
        self._schema_checked = False

    @property
    def engine(self) -> Engine:
        return self._db.engine

    async def upgrade(self) -> None:
        """Bring the database schema to the newest revision this library ships."""
        await self._blocking(self._sync.upgrade)

    # Allocation

    async def open_state(self, state_id: str) -> None:
        """Register ``state_id`` so indices can be allocated for it. Idempotent."""
        if self._native is None:
            return await self._blocking(self._sync.open_state, state_id)
        state_id = allocator.validate_state_id(state_id)
        native = await self._written()
        await native.write(lambda backend: backend.open_state(state_id))

    async def allocate_call_index(self, state_id: str, count: int = 1) -> int:
        """Reserve ``count`` consecutive indices of ``state_id`` and return the first."""
        if self._native is None:
            return await self._blocking(self._sync.allocate_call_index, state_id, count)
        state_id = allocator.validate_state_id(state_id)
        count = allocator.validate_count(count)
        native = await self._written()
        return await native.write(
            lambda backend: backend.allocate(state_id, count, opening=self._auto_open)
        )

    async def allocate_call_indices(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Reserve indices for several states in one transaction (see the sync recorder)."""
        if self._native is None:
            return await self._blocking(self._sync.allocate_call_indices, counts)
        checked = validate_counts(counts)
        native = await self._written()
        return await native.write(
            lambda backend: backend.allocate_many(checked, opening=self._auto_open)
        )

    # Recording

    async def record_call(
        self,
        state_id: str,
        call_type: CallType,
        status: FinalStatus,
        request: Any,
        response: Any = None,
        error: Any = None,
        latency_ms: float | None = None,
        call_id: str | None = None,
        call_index: int | None = None,
    ) -> Call:
        """Record a completed call with the next index of its state (or at
        ``call_index``); idempotent on ``call_id``."""
        if self._native is None:
            return await self._blocking(
                self._sync.record_call,
                state_id,
                call_type,
                status,
                request,
                response,
                error,
                latency_ms,
                call_id,
                call_index,
            )
        parameters = completed_call(
            state_id, call_type, status, request, response, error, latency_ms, call_id, call_index
        )
        return await calls.insert_async(await self._written(), parameters, opening=self._auto_open)

    async def begin_call(
        self, state_id: str, call_type: CallType, request: Any, call_id: str | None = None
    ) -> Call:
        """Record a ``pending`` call with its index before the external call is made."""
        if self._native is None:
            return await self._blocking(
                self._sync.begin_call, state_id, call_type, request, call_id
            )
        parameters = pending_call(state_id, call_type, request, call_id)
        return await calls.insert_async(await self._written(), parameters, opening=self._auto_open)

    async def finish_call(
        self,
        call_id: str,
        status: FinalStatus,
        response: Any = None,
        error: Any = None,
        latency_ms: float | None = None,
    ) -> Call:
        """Complete a pending call, once (see the sync recorder)."""
        if self._native is None:
            return await self._blocking(
                self._sync.finish_call, call_id, status, response, error, latency_ms
            )
        call_id = calls.validate_call_id(call_id)
        outcome = calls.Outcome.of(status, response, error, latency_ms)
        return await calls.finish_async(await self._written(), call_id, outcome)

    async def _written(self) -> AsyncDatabase:
        """The async database, once its schema revision is the library's."""
        assert self._native is not None
        if not self._schema_checked:
            await asyncio.to_thread(migrations.check, self._db)
            self._schema_checked = True
        return self._native

    # Reading and mending

    async def calls(self, state_id: str) -> list[Call]:
        """The calls of ``state_id``, in index order."""
        if self._native is None:
            return await self._blocking(self._sync.calls, state_id)
        state_id = allocator.validate_state_id(state_id)
        rows = await self._native.rows("calls_of_state", {"state_id": state_id})
        return [Call.from_row(row) for row in rows]

    async def is_open(self, state_id: str) -> bool:
        """Whether ``state_id`` has been opened (it has a counter)."""
        if self._native is None:
            return await self._blocking(self._sync.is_open, state_id)
        state_id = allocator.validate_state_id(state_id)
        return bool(await self._native.rows("state_is_open", {"state_id": state_id}))

    async def calls_with_request_hash(
        self, request_hash: str, *, call_type: CallType | None = None
    ) -> list[Call]:
        """The calls whose ``request_hash`` is ``request_hash`` (see the sync recorder)."""
        if self._native is None:
            return await self._blocking(
                functools.partial(self._sync.calls_with_request_hash, call_type=call_type),
                request_hash,
            )
        call_type = validate_request_hash(request_hash, call_type)
        rows = await self._native.rows(
            "calls_with_request_hash", {"request_hash": request_hash, "call_type": call_type}
        )
        return [Call.from_row(row) for row in rows]

    async def get_call(self, call_id: str) -> Call | None:
        if self._native is None:
            return await self._blocking(self._sync.get_call, call_id)
        return await calls.find_async(self._native, calls.validate_call_id(call_id))

    async def verify(
        self,
        pending_threshold_seconds: float = audit.DEFAULT_PENDING_THRESHOLD_SECONDS,
        *,
        hashes: bool = False,
        seals: bool = False,
        heads: Iterable[Seal] = (),
    ) -> audit.Report:
        """:meth:`CallRecorder.verify <callindex.recorder.CallRecorder.verify>`, in a thread."""
        work = functools.partial(self._sync.verify, hashes=hashes, seals=seals, heads=heads)
        return await self._blocking(work, pending_threshold_seconds)

    async def seal(
        self,
        state_id: str | None = None,
        *,
        finished_before_seconds: float | None = None,
        on_sealed: Callable[[Seal], None] | None = None,
    ) -> list[Seal]:
        """:meth:`CallRecorder.seal <callindex.recorder.CallRecorder.seal>`, in a thread
        (``on_sealed`` is called there)."""
        work = functools.partial(
            self._sync.seal, finished_before_seconds=finished_before_seconds, on_sealed=on_sealed
        )
        return await self._blocking(work, state_id)

    async def sweep(
        self, older_than_seconds: float, *, state_prefix: str = ""
    ) -> list[dict[str, Any]]:
        """Mark pending calls at least this old ``abandoned``; returns them."""
        work = functools.partial(self._sync.sweep, state_prefix=state_prefix)
        return await self._blocking(work, older_than_seconds)

    async def purge(self, older_than_seconds: float, *, state_prefix: str = "") -> list[Purge]:
        """:meth:`CallRecorder.purge <callindex.recorder.CallRecorder.purge>`, in a thread."""
        work = functools.partial(self._sync.purge, state_prefix=state_prefix)
        return await self._blocking(work, older_than_seconds)

    async def repair(self) -> list[dict[str, Any]]:
        """Move counters that are behind their calls forward; returns the states moved."""
        return await self._blocking(self._sync.repair)

    async def _blocking(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Synchronous ``work`` off the event loop: on the SQLite file's worker
        thread, or (PostgreSQL maintenance) in a worker thread."""
        worker = self._sqlite_worker()
        if worker is None:
            return await asyncio.to_thread(work, *args, **kwargs)
        return await asyncio.wrap_future(worker.submit(work, *args, **kwargs))

    def _sqlite_worker(self) -> ThreadPoolExecutor | None:
        """The SQLite file's worker thread in this process (``None`` on PostgreSQL)."""
        path = self._db.backend.sqlite_path
        if self._worker is not None and path is not None and self._worker_pid != os.getpid():
            # Forked: the parent's worker thread did not come along.
            self._worker, self._worker_pid = _worker(path), os.getpid()
        return self._worker

    async def close(self) -> None:
        """Close this recorder's connections (and its share of the pooled ones)."""
        if self._native is not None:
            await self._native.backend.close()
        if self._worker is not None:
            if self._worker_pid == os.getpid():
                _release_worker(self._db.backend.sqlite_path)
            self._worker = None
        self._sync.close()
        self._db.dispose()

    async def __aenter__(self) -> AsyncCallRecorder:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncCallRecorder({self._db.display_url!r})"


# One worker thread per SQLite file, shared by the async recorders of the
# file in this process and counted by reference.
_WORKERS: dict[Path, tuple[ThreadPoolExecutor, int]] = {}
_WORKERS_LOCK = threading.Lock()
_FORK_HANDLER_INSTALLED = False


def _forget_workers_after_fork() -> None:
    global _WORKERS_LOCK
    _WORKERS_LOCK = threading.Lock()
    _WORKERS.clear()  # their threads did not survive the fork


def _worker(path: Path) -> ThreadPoolExecutor:
    global _FORK_HANDLER_INSTALLED
    with _WORKERS_LOCK:
        if not _FORK_HANDLER_INSTALLED:
            os.register_at_fork(after_in_child=_forget_workers_after_fork)
            _FORK_HANDLER_INSTALLED = True
        executor, users = _WORKERS.get(path) or (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"callindex-sqlite-{path.name}"),
            0,
        )
        _WORKERS[path] = (executor, users + 1)
        return executor


def _release_worker(path: Path | None) -> None:
    with _WORKERS_LOCK:
        if path is None or path not in _WORKERS:
            return
        executor, users = _WORKERS[path]
        if users > 1:
            _WORKERS[path] = (executor, users - 1)
            return
        del _WORKERS[path]
    executor.shutdown(wait=False)
