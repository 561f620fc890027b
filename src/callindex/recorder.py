"""``CallRecorder``: the public face of callindex."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, TypeVar

from sqlalchemy import URL, Connection, Engine

from callindex import allocator, audit, calls, migrations, payloads, purges, seals
from callindex.calls import Call, CallType, FinalStatus
from callindex.database import Database
from callindex.errors import InvalidInputError, UnknownStateError
from callindex.purges import Purge
from callindex.retry import DatabaseRetryPolicy
from callindex.seals import Seal

T = TypeVar("T")


class CallRecorder:
    """Allocates call indices and records calls, in the database.

    ``url_or_engine`` is a database URL (``postgresql+psycopg://...`` or
    ``sqlite:///file.db``) or an SQLAlchemy :class:`~sqlalchemy.Engine` for one.
    ``retry`` bounds how long transient database failures are retried, and
    how long one attempt may wait for a lock.
    A recorder holds no per-state data: any number of recorders, in any number
    of processes, may work on the same states at once. Recorders of one
    database in one process share its connections (at most 8 for writes, 8
    for reads and maintenance), and a forked child opens its own.

    ``early_release`` (PostgreSQL, ``record_call`` and ``begin_call``): commit
    the call asynchronously and acknowledge it after a synchronous flush in
    the same round trip, so a state's counter row is not held through a disk
    flush. ``None`` (the default) adapts: early release while writes find
    the counter row held by another writer, the plain statement otherwise;
    ``True`` and ``False`` force one way. See "Early lock release" in the docs.

    ``auto_open``: allocating or recording for a state never opened opens it
    in the same statement (past any calls it has, as :meth:`open_state` does),
    instead of raising :class:`UnknownStateError` (the default, strict); a
    write that fails opens nothing.
    """

    def __init__(
        self,
        url_or_engine: str | URL | Engine,
        *,
        retry: DatabaseRetryPolicy | None = None,
        early_release: bool | None = None,
        auto_open: bool = False,
    ) -> None:
        self._db = Database(url_or_engine, retry=retry, early_release=early_release)
        self._auto_open = auto_open
        self._schema_checked = False

    @property
    def engine(self) -> Engine:
        """The engine in use; open a transaction on it to pass as ``connection=``."""
        return self._db.engine

    def upgrade(self) -> None:
        """Bring the database schema to the newest revision this library ships."""
        migrations.upgrade(self._db)

    # Allocation

    def open_state(self, state_id: str, *, connection: Connection | None = None) -> None:
        """Register ``state_id`` so indices can be allocated for it. Idempotent."""
        state_id = allocator.validate_state_id(state_id)
        allocator.open_state(self._written(), state_id, connection)

    def allocate_call_index(
        self, state_id: str, count: int = 1, *, connection: Connection | None = None
    ) -> int:
        """Reserve ``count`` consecutive indices of ``state_id`` and return the first.

        Without ``connection`` the reservation commits before this returns.
        With ``connection`` it joins that connection's transaction: it holds the
        state's counter row until the caller commits, and rolls back with it,
        so indices used by rows written in the same transaction have no gaps.
        """
        state_id = allocator.validate_state_id(state_id)
        count = allocator.validate_count(count)
        return allocator.allocate(
            self._written(), state_id, count, connection, opening=self._auto_open
        )

    def allocate_call_indices(
        self, counts: Mapping[str, int], *, connection: Connection | None = None
    ) -> dict[str, int]:
        """Reserve indices for several states in one transaction: ``{state_id: count}``
        in, ``{state_id: first index}`` out. States are locked in sorted order, so
        concurrent callers sharing states never deadlock."""
        return allocator.allocate_many(
            self._written(), validate_counts(counts), connection, opening=self._auto_open
        )

    # Recording

    def record_call(
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
        """Record a completed call with the next index of its state, in one transaction.

        Recorded indices of a state have no gaps. ``call_id`` (a fresh UUID when
        omitted) makes the call idempotent: recording the same ``call_id`` again
        returns the recorded call with its original index and writes nothing.

        ``call_index=k`` records the call at ``k``, an index reserved earlier
        with :meth:`allocate_call_index` (the allocate-then-record pattern); an
        index never handed out raises :class:`IndexNotReservedError`, one
        another call holds :class:`IndexTakenError`. It is never moved.
        """
        parameters = completed_call(
            state_id, call_type, status, request, response, error, latency_ms, call_id, call_index
        )
        return calls.insert(self._written(), parameters, opening=self._auto_open)

    def begin_call(
        self, state_id: str, call_type: CallType, request: Any, call_id: str | None = None
    ) -> Call:
        """Record a ``pending`` call with its index before the external call is made.

        Finish it with :meth:`finish_call`. A worker that dies in between
        leaves the pending row visible; ``callindex sweep`` marks it abandoned.
        Idempotent on ``call_id`` like :meth:`record_call`.
        """
        parameters = pending_call(state_id, call_type, request, call_id)
        return calls.insert(self._written(), parameters, opening=self._auto_open)

    def finish_call(
        self,
        call_id: str,
        status: FinalStatus,
        response: Any = None,
        error: Any = None,
        latency_ms: float | None = None,
    ) -> Call:
        """Complete a pending call, once. Repeating the same finish returns the call;
        a different one raises :class:`CallAlreadyFinishedError`."""
        call_id = calls.validate_call_id(call_id)
        outcome = calls.Outcome.of(status, response, error, latency_ms)
        return calls.finish(self._written(), call_id, outcome)

    def _written(self) -> Database:
        """The database, once its schema revision is the library's (checked
        before this recorder's first write): no write lands on a schema that is
        behind (without the guards it relies on) or ahead of the library."""
        if not self._schema_checked:
            migrations.check(self._db)
            self._schema_checked = True
        return self._db

    # Reading and mending

    def calls(self, state_id: str) -> list[Call]:
        """The calls of ``state_id``, in index order."""
        state_id = allocator.validate_state_id(state_id)
        return self._db.read(lambda statements: calls.of_state(statements, state_id))

    def is_open(self, state_id: str) -> bool:
        """Whether ``state_id`` has been opened (it has a counter)."""
        state_id = allocator.validate_state_id(state_id)
        return self._db.read(lambda statements: calls.state_is_open(statements, state_id))

    def calls_with_request_hash(
        self, request_hash: str, *, call_type: CallType | None = None
    ) -> list[Call]:
        """The calls whose ``request_hash`` is ``request_hash`` (SHA-256 of the
        request's RFC 8785 form, as the upstream framework computes it), of
        ``call_type`` if given, in ``(state_id, call_index)`` order: the lookup
        replay runs on."""
        call_type = validate_request_hash(request_hash, call_type)
        return self._db.read(
            lambda statements: calls.with_request_hash(statements, request_hash, call_type)
        )

    def get_call(self, call_id: str) -> Call | None:
        call_id = calls.validate_call_id(call_id)
        return self._db.read(lambda statements: calls.find(statements, call_id))

    def verify(
        self,
        pending_threshold_seconds: float = audit.DEFAULT_PENDING_THRESHOLD_SECONDS,
        *,
        hashes: bool = False,
        seals: bool = False,
        heads: Iterable[Seal] = (),
    ) -> audit.Report:
        """Check the trail's invariants; with ``hashes``, also recompute every
        stored payload's hash; with ``seals``, every sealed chain, also against
        exported ``heads`` (:func:`callindex.seals.read_heads`). See
        :class:`callindex.audit.Report`."""
        return audit.verify(
            self._db, pending_threshold_seconds, hashes=hashes, seals=seals, heads=heads
        )

    def seal(
        self,
        state_id: str | None = None,
        *,
        finished_before_seconds: float | None = None,
        on_sealed: Callable[[Seal], None] | None = None,
    ) -> list[Seal]:
        """Seal every state whose calls are all finished and not all sealed yet
        (only ``state_id`` when given; only states whose last call finished at
        least ``finished_before_seconds`` ago when given); ``on_sealed`` hears
        of each seal as it commits. See :mod:`callindex.seals`."""
        if state_id is not None:
            state_id = allocator.validate_state_id(state_id)
            if not self.is_open(state_id):
                raise UnknownStateError(state_id)
        before = None
        if finished_before_seconds is not None:
            seconds = audit.validate_seconds(finished_before_seconds, "finished_before_seconds")
            before = datetime.now(UTC) - timedelta(seconds=seconds)
        return seals.seal(
            self._written(), state_id=state_id, finished_before=before, on_sealed=on_sealed
        )

    def sweep(self, older_than_seconds: float, *, state_prefix: str = "") -> list[dict[str, Any]]:
        """Mark pending calls at least this old ``abandoned`` (only those of states
        whose id starts with ``state_prefix``, when given); returns them."""
        return audit.sweep(self._written(), older_than_seconds, state_prefix)

    def purge(self, older_than_seconds: float, *, state_prefix: str = "") -> list[Purge]:
        """Delete the finished calls created at least ``older_than_seconds`` ago
        (only those of states whose id starts with ``state_prefix``), keeping
        every counter; returns the purged runs, as recorded in ``call_purges``.
        A sealed state gives up only calls it has sealed. Owner role only. See
        :mod:`callindex.purges`."""
        seconds = audit.validate_seconds(older_than_seconds, "older_than_seconds")
        before = datetime.now(UTC) - timedelta(seconds=seconds)
        return purges.purge(self._written(), before, state_prefix)

    def repair(self) -> list[dict[str, Any]]:
        """Move counters that are behind their calls forward; returns the states moved."""
        return audit.repair(self._written())

    def close(self) -> None:
        """Close the pooled connections."""
        self._db.dispose()

    def __enter__(self) -> CallRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CallRecorder({self._db.display_url!r})"


def _new_call(state_id: str, call_type: str, request: Any, call_id: str | None) -> dict[str, Any]:
    return calls.new_call_parameters(
        call_id=calls.validate_call_id(call_id if call_id is not None else calls.new_call_id()),
        state_id=allocator.validate_state_id(state_id),
        call_type=calls.validate_call_type(call_type),
        request=payloads.prepare_request(request),
    )


def completed_call(
    state_id: str,
    call_type: CallType,
    status: FinalStatus,
    request: Any,
    response: Any,
    error: Any,
    latency_ms: float | None,
    call_id: str | None,
    call_index: int | None,
) -> dict[str, Any]:
    """The validated parameters of :meth:`CallRecorder.record_call`."""
    outcome = calls.Outcome.of(status, response, error, latency_ms)
    parameters = {**_new_call(state_id, call_type, request, call_id), **outcome.parameters()}
    if call_index is not None:
        parameters["call_index"] = calls.validate_call_index(call_index)
    return parameters


def pending_call(
    state_id: str, call_type: CallType, request: Any, call_id: str | None
) -> dict[str, Any]:
    """The validated parameters of :meth:`CallRecorder.begin_call`."""
    return {**_new_call(state_id, call_type, request, call_id), **_PENDING}


def validate_request_hash(request_hash: object, call_type: CallType | None) -> CallType | None:
    """Check :meth:`CallRecorder.calls_with_request_hash`'s arguments; the call type."""
    if not isinstance(request_hash, str) or not _SHA256.fullmatch(request_hash):
        raise InvalidInputError("request_hash must be 64 lower-case hexadecimal digits")
    return None if call_type is None else calls.validate_call_type(call_type)


def validate_counts(counts: object) -> dict[str, int]:
    """Check :meth:`CallRecorder.allocate_call_indices`'s ``counts``."""
    if not isinstance(counts, Mapping):
        raise InvalidInputError("counts must be a mapping of state_id to count")
    return {
        allocator.validate_state_id(state_id): allocator.validate_count(count)
        for state_id, count in counts.items()
    }


_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_PENDING: dict[str, Any] = {
    "status": "pending",
    "response": None,
    "response_hash": None,
    "error": None,
    "error_hash": None,
    "latency_ms": None,
}
