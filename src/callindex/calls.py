"""Recorded calls: the :class:`Call` value, its validation, and the statements
that record, begin, finish and read calls."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, cast, get_args

from callindex import payloads
from callindex.backends import CallIdTaken, Inserted
from callindex.database import Database, Statements
from callindex.errors import (
    CallAlreadyFinishedError,
    CallIdConflictError,
    CallIndexError,
    IndexNotReservedError,
    IndexSealedError,
    IndexTakenError,
    InvalidCallError,
    UnknownCallError,
    UnknownStateError,
)

if TYPE_CHECKING:
    from callindex.async_backend import AsyncDatabase

CallType = str
"""A call's kind: a short identifier such as ``http``, ``llm``, ``sql``,
``filesystem``, ``vector`` or ``http_redirect`` (see :data:`CALL_TYPE_PATTERN`)."""
CallStatus = Literal["pending", "success", "error", "abandoned"]
FinalStatus = Literal["success", "error"]

CALL_TYPE_PATTERN: Final = re.compile(r"[a-z0-9_]{1,32}")
FINAL_STATUSES: Final = frozenset(get_args(FinalStatus))
MAX_CALL_ID_LENGTH: Final = 128


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded call, as stored."""

    call_id: str
    state_id: str
    call_index: int
    call_type: str
    status: str
    request: Any
    request_hash: str | None
    response: Any
    response_hash: str | None
    error: Any
    error_hash: str | None
    latency_ms: float | None
    created_at: datetime
    completed_at: datetime | None
    hash_scheme: str = payloads.SCHEME
    """How the hashes were made: ``rfc8785`` (SHA-256 over the payload's RFC 8785
    form) or, for rows recorded before 0.2, ``sorted-json``."""

    @classmethod
    def from_row(cls, values: Mapping[str, Any]) -> Call:
        return cls(
            call_id=values["call_id"],
            state_id=values["state_id"],
            call_index=int(values["call_index"]),
            call_type=values["call_type"],
            status=values["status"],
            request=values["request"],
            request_hash=values["request_hash"],
            response=values["response"],
            response_hash=values["response_hash"],
            error=values["error"],
            error_hash=values["error_hash"],
            latency_ms=values["latency_ms"],
            created_at=_timestamp(values["created_at"]),
            completed_at=_timestamp(values["completed_at"]) if values["completed_at"] else None,
            hash_scheme=values.get("hash_scheme") or payloads.SCHEME,
        )

    def as_json(self) -> dict[str, Any]:
        """The call as JSON-ready values (timestamps in ISO 8601)."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        for name in ("created_at", "completed_at"):
            fields[name] = fields[name].isoformat() if fields[name] else None
        return fields


def _timestamp(value: datetime) -> datetime:
    # SQLite stores UTC without an offset; PostgreSQL returns aware datetimes.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def new_call_id() -> str:
    """A fresh client-side call id (a random UUID), to create before the first attempt."""
    return str(uuid.uuid4())


def validate_call_id(call_id: object) -> str:
    if not isinstance(call_id, str) or not 1 <= len(call_id) <= MAX_CALL_ID_LENGTH:
        raise InvalidCallError(f"call_id must be a string of 1 to {MAX_CALL_ID_LENGTH} characters")
    if not call_id.isprintable() or not call_id.isascii():
        raise InvalidCallError("call_id must be printable ASCII")
    return call_id


def validate_call_type(call_type: object) -> str:
    """``call_type`` if it is 1 to 32 lower-case letters, digits and ``_``."""
    if not isinstance(call_type, str) or not CALL_TYPE_PATTERN.fullmatch(call_type):
        raise InvalidCallError(
            f"call_type must be 1 to 32 lower-case letters, digits and _ "
            f"(http, llm, sql, http_redirect ...), not {call_type!r}"
        )
    return call_type


def validate_call_index(call_index: object) -> int:
    if isinstance(call_index, bool) or not isinstance(call_index, int) or call_index < 0:
        raise InvalidCallError(f"call_index must be an integer >= 0, not {call_index!r}")
    return call_index


def validate_final_status(status: object) -> str:
    if status not in FINAL_STATUSES:
        raise InvalidCallError(
            f"status must be 'success' or 'error', not {status!r} "
            "(begin_call records 'pending'; sweeping records 'abandoned')"
        )
    return cast(str, status)


def validate_latency(latency_ms: object) -> float | None:
    if latency_ms is None:
        return None
    if isinstance(latency_ms, bool) or not isinstance(latency_ms, int | float):
        raise InvalidCallError(f"latency_ms must be a number, not {type(latency_ms).__name__}")
    if not math.isfinite(latency_ms) or latency_ms < 0:
        raise InvalidCallError(f"latency_ms must be a finite number >= 0, not {latency_ms}")
    return float(latency_ms)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The validated parameters of a finished call's result."""

    status: str
    response: payloads.Payload | None
    error: payloads.Payload | None
    latency_ms: float | None

    @classmethod
    def of(cls, status: object, response: Any, error: Any, latency_ms: object) -> Outcome:
        return cls(
            status=validate_final_status(status),
            response=payloads.prepare("response", response),
            error=payloads.prepare("error", error),
            latency_ms=validate_latency(latency_ms),
        )

    def parameters(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "response": _text(self.response),
            "response_hash": _hash(self.response),
            "error": _text(self.error),
            "error_hash": _hash(self.error),
            "latency_ms": self.latency_ms,
        }

    def matches(self, call: Call) -> bool:
        return (call.status, call.response_hash, call.error_hash) == (
            self.status,
            _hash(self.response),
            _hash(self.error),
        )


def _text(payload: payloads.Payload | None) -> str | None:
    return payload.text if payload else None


def _hash(payload: payloads.Payload | None) -> str | None:
    return payload.sha256 if payload else None


def new_call_parameters(
    call_id: str, state_id: str, call_type: str, request: payloads.Payload | None
) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "state_id": state_id,
        "call_type": call_type,
        "request": _text(request),
        "request_hash": _hash(request),
    }


def insert(db: Database, parameters: Mapping[str, Any], *, opening: bool = False) -> Call:
    """Allocate the next index of the state and insert the call with it, in one
    committed write.

    When ``call_id`` is recorded already, return that call instead: nothing is
    written and no index is used.
    """
    try:
        if "call_index" in parameters:
            inserted = db.write(lambda backend: backend.insert_call_at(parameters))
            if inserted is None:
                if db.read(lambda statements: find(statements, parameters["call_id"])):
                    raise CallIdTaken  # recorded by an earlier attempt: see below
                reservation = db.read(
                    lambda statements: statements.rows("reservation_of", _reservation(parameters))
                )
                raise _refusal(reservation, parameters, opening)
        else:
            inserted = db.write(lambda backend: backend.insert_call(parameters, opening=opening))
    except CallIdTaken:
        call = db.read(lambda statements: find(statements, parameters["call_id"]))
        assert call is not None, "a call_id refused as taken is recorded"
        _ensure_same_call(call, parameters)
        db.write(lambda backend: backend.flush())
        return call
    return _inserted(parameters, inserted)


async def insert_async(
    db: AsyncDatabase, parameters: Mapping[str, Any], *, opening: bool = False
) -> Call:
    """:func:`insert` on the asyncio write path."""
    try:
        if "call_index" in parameters:
            inserted = await db.write(lambda backend: backend.insert_call_at(parameters))
            if inserted is None:
                if await find_async(db, parameters["call_id"]):
                    raise CallIdTaken
                reservation = await db.rows("reservation_of", _reservation(parameters))
                raise _refusal(reservation, parameters, opening)
        else:
            inserted = await db.write(
                lambda backend: backend.insert_call(parameters, opening=opening)
            )
    except CallIdTaken:
        call = await find_async(db, parameters["call_id"])
        assert call is not None, "a call_id refused as taken is recorded"
        _ensure_same_call(call, parameters)
        await db.write(lambda backend: backend.flush())
        return call
    return _inserted(parameters, inserted)


def _inserted(parameters: Mapping[str, Any], inserted: Inserted) -> Call:
    return _as_written(
        parameters,
        call_index=inserted.call_index,
        created_at=inserted.created_at,
        completed_at=inserted.completed_at,
    )


def _reservation(parameters: Mapping[str, Any]) -> dict[str, Any]:
    return {"state_id": parameters["state_id"], "call_index": parameters["call_index"]}


def _refusal(
    reservation: Sequence[Mapping[str, Any]], parameters: Mapping[str, Any], opening: bool
) -> CallIndexError:
    """Why ``record_call(call_index=k)`` wrote nothing, as a typed error, from
    the index's reservation (with ``opening``, a state never opened has handed
    nothing out)."""
    state_id, index = parameters["state_id"], parameters["call_index"]
    if not reservation and not opening:
        return UnknownStateError(state_id)
    if reservation and reservation[0]["taken"]:
        return IndexTakenError(f"call_index {index} of state {state_id!r} is taken by another call")
    if reservation and reservation[0]["sealed"]:
        return IndexSealedError(
            f"call_index {index} of state {state_id!r} is below a seal of the state: "
            "sealing ends the reservations below the index it seals"
        )
    return IndexNotReservedError(
        f"call_index {index} of state {state_id!r} was never handed out (the counter is at "
        f"{reservation[0]['next_index'] if reservation else 0}): "
        "reserve it with allocate_call_index first"
    )


def _as_written(parameters: Mapping[str, Any], **decided: Any) -> Call:
    """The call as written: what callindex sent (its payloads as JSON text) and
    what the database decided (``decided``: index, timestamps, ...)."""
    return Call.from_row(
        {
            **parameters,
            **{name: _decoded(parameters[name]) for name in _PAYLOADS if name in parameters},
            **decided,
        }
    )


_PAYLOADS: Final = ("request", "response", "error")


def _decoded(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _ensure_same_call(call: Call, parameters: Mapping[str, Any]) -> None:
    """A recorded ``call_id`` may only be repeated for the same call: same state,
    type and request and, for ``record_call``, the same outcome."""
    recorded = (call.state_id, call.call_type, call.request_hash, call.call_index)
    requested = (
        parameters["state_id"],
        parameters["call_type"],
        parameters["request_hash"],
        parameters.get("call_index", call.call_index),
    )
    if recorded != requested:
        raise CallIdConflictError(
            f"call_id {call.call_id!r} already names another call "
            f"(state {call.state_id!r}, type {call.call_type!r}, index {call.call_index})"
        )
    if parameters["status"] == "pending":
        return  # begin_call repeated: the call is begun, whatever became of it since
    outcome = (parameters["status"], parameters["response_hash"], parameters["error_hash"])
    if (call.status, call.response_hash, call.error_hash) != outcome:
        hint = "; finish it with finish_call" if call.status == "pending" else ""
        raise CallIdConflictError(
            f"call_id {call.call_id!r} is recorded already as {call.status} "
            f"with another outcome{hint}"
        )


def finish(db: Database, call_id: str, outcome: Outcome) -> Call:
    """Complete pending call ``call_id``; a retry of the same finish returns the call."""
    parameters = {"call_id": call_id, **outcome.parameters()}
    row = db.write(lambda backend: backend.finish_call(parameters))
    if row is not None:
        return _as_written(parameters, **row)
    return _finished_already(
        db.read(lambda statements: find(statements, call_id)), call_id, outcome
    )


async def finish_async(db: AsyncDatabase, call_id: str, outcome: Outcome) -> Call:
    """:func:`finish` on the asyncio write path."""
    parameters = {"call_id": call_id, **outcome.parameters()}
    row = await db.write(lambda backend: backend.finish_call(parameters))
    if row is not None:
        return _as_written(parameters, **row)
    return _finished_already(await find_async(db, call_id), call_id, outcome)


def _finished_already(call: Call | None, call_id: str, outcome: Outcome) -> Call:
    """The call a finish found not pending: itself when finished the same way."""
    if call is None:
        raise UnknownCallError(call_id)
    if outcome.matches(call):
        return call
    raise CallAlreadyFinishedError(
        f"call {call_id!r} is already {call.status}"
        + (
            " (swept as abandoned: its worker was presumed dead)"
            if call.status == "abandoned"
            else ""
        )
    )


def find(statements: Statements, call_id: str) -> Call | None:
    rows = statements.rows("find_call", {"call_id": call_id})
    return Call.from_row(rows[0]) if rows else None


async def find_async(db: AsyncDatabase, call_id: str) -> Call | None:
    rows = await db.rows("find_call", {"call_id": call_id})
    return Call.from_row(rows[0]) if rows else None


def state_is_open(statements: Statements, state_id: str) -> bool:
    return bool(statements.rows("state_is_open", {"state_id": state_id}))


def of_state(statements: Statements, state_id: str) -> list[Call]:
    return [Call.from_row(row) for row in statements.rows("calls_of_state", {"state_id": state_id})]


def with_request_hash(
    statements: Statements, request_hash: str, call_type: str | None
) -> list[Call]:
    parameters = {"request_hash": request_hash, "call_type": call_type}
    return [Call.from_row(row) for row in statements.rows("calls_with_request_hash", parameters)]
