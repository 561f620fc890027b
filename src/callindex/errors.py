"""Every error callindex raises, rooted in one base class.

Driver errors never escape: :mod:`callindex.database` maps them to these types
at one boundary and chains the original with ``raise ... from exc``.

Hierarchy::

    CallIndexError
    ├── InvalidInputError          (also a ValueError)
    │   ├── InvalidStateIdError
    │   ├── InvalidCountError
    │   ├── InvalidCallError       call_id, call_type, status or latency_ms refused
    │   ├── InvalidPayloadError    not JSON, NUL character, lone surrogate
    │   │   └── PayloadTooLargeError
    │   └── InvalidHeaderError     a header value with a control character
    ├── UnknownStateError          (also a LookupError)
    ├── UnknownCallError           (also a LookupError)
    ├── CallAlreadyFinishedError   finish_call on a finished or abandoned call
    ├── CallIdConflictError        a call_id reused for a different call
    ├── IndexNotReservedError      record_call(call_index=k) for an index never handed out
    ├── IndexTakenError            record_call(call_index=k) for an index another call holds
    │                              (or held, and was purged)
    ├── IndexSealedError           record_call(call_index=k) below a seal of the state
    ├── ConfigurationError         bad database URL, unsupported backend
    ├── SchemaError
    │   ├── SchemaMissingError     the tables are not there: run `callindex db upgrade`
    │   ├── SchemaVersionError     the database is behind or ahead of this library
    │   └── AdoptionError          a calls table callindex cannot adopt as it is
    ├── DatabaseError
    │   ├── DatabaseUnavailableError   server unreachable, connection lost, shutting down
    │   ├── ContentionError            lock or busy timeout, serialization failure, deadlock
    │   ├── CounterBehindError         a counter is behind its calls: run `callindex repair`
    │   ├── ImmutableCallError         the database refused to change or delete a call
    │   ├── CounterGuardError          a counter moved back, or too far at once
    │   ├── IndexAheadError            an index the counter did not hand out, or too far ahead
    │   ├── CallOwnedByAnotherRoleError  a pending call finished by another role
    │   ├── CallRefusedError           a call's values refused by the database's checks
    │   ├── ImmutableSealError         the database refused to change or delete a seal
    │   ├── ImmutablePurgeError        the database refused to change or delete a purge record
    │   └── PermissionDeniedError      the database role lacks a privilege
    ├── ReplayMismatchError        a request a ReplayTransport has no recorded call for
    └── LLMError                   a completion the LLM clients cannot return (call recorded)
        ├── LLMRateLimitedError            still 429 when the retries ran out
        ├── LLMContentFilteredError        finish_reason content_filter, or no content
        │                                  and no tool calls
        └── LLMMalformedCompletionError    a 200 whose body is not a chat completion
"""

from __future__ import annotations


class CallIndexError(Exception):
    """Base class of every error raised by callindex."""


class InvalidInputError(CallIndexError, ValueError):
    """An argument was rejected before anything was sent to the database."""


class InvalidStateIdError(InvalidInputError):
    """A ``state_id`` that is not a non-empty string of bounded length."""


class InvalidCountError(InvalidInputError):
    """A ``count`` that is not an integer in the allowed range."""


class UnknownStateError(CallIndexError, LookupError):
    """The state has no counter row: it was never opened with ``open_state``."""

    def __init__(self, state_id: str) -> None:
        super().__init__(
            f"unknown state {state_id!r}: open it first "
            f"(CallRecorder.open_state or `callindex state open`)"
        )
        self.state_id = state_id


class InvalidCallError(InvalidInputError):
    """A ``call_id``, ``call_type``, ``status`` or ``latency_ms`` that is not allowed."""


class InvalidPayloadError(InvalidInputError):
    """A request, response or error payload that cannot be recorded as JSON."""


class PayloadTooLargeError(InvalidPayloadError):
    """A payload whose canonical JSON exceeds the documented size limit."""


class InvalidHeaderError(InvalidInputError):
    """A header value HTTP cannot carry (a control character, such as the
    trailing newline of a key read from a file). The value is never quoted."""


class UnknownCallError(CallIndexError, LookupError):
    """No call with this ``call_id`` was recorded."""

    def __init__(self, call_id: str) -> None:
        super().__init__(f"unknown call {call_id!r}")
        self.call_id = call_id


class CallAlreadyFinishedError(CallIndexError):
    """The call is no longer pending: it was finished differently, or abandoned."""


class CallIdConflictError(CallIndexError):
    """A ``call_id`` already names a different call (other state, type or request)."""


class IndexNotReservedError(CallIndexError):
    """``record_call(call_index=k)``: ``k`` was never handed out by the state's
    counter (reserve it with ``allocate_call_index`` first)."""


class IndexTakenError(CallIndexError):
    """``record_call(call_index=k)``: another call is recorded at ``k``."""


class IndexSealedError(CallIndexError):
    """``record_call(call_index=k)``: the state is sealed at or past ``k``
    (``callindex seal`` ends the reservations below the index it seals)."""


class ConfigurationError(CallIndexError):
    """The database URL or another setting is unusable."""


class SchemaError(CallIndexError):
    """The database schema does not match what this library expects."""


class SchemaMissingError(SchemaError):
    """The callindex tables do not exist in the database."""


class SchemaVersionError(SchemaError):
    """The database schema revision differs from the installed library's."""


class AdoptionError(SchemaError):
    """An existing ``calls`` table that ``callindex db adopt`` cannot take over
    as it is; the message says what to change first."""


class DatabaseError(CallIndexError):
    """The database failed in a way callindex could not recover from."""


class DatabaseUnavailableError(DatabaseError):
    """The database could not be reached, or the connection was lost."""


class ContentionError(DatabaseError):
    """The database stayed locked or kept aborting the transaction for contention."""


class CounterBehindError(DatabaseError):
    """An index collided with a recorded call: the state's counter is behind its calls.

    Something wrote calls without the allocator. Never retried;
    ``callindex repair`` moves the counter past the recorded calls.
    """


class ImmutableCallError(DatabaseError):
    """The database refused to change or delete a call (finished calls are immutable)."""


class CounterGuardError(DatabaseError):
    """The database refused to move a counter back, or forward by more than
    1,000,000 at once (counters never go back: a rewound counter hands out
    indices again)."""


class IndexAheadError(DatabaseError):
    """The database refused a call at an index its state's counter did not
    hand out, or more than 1,000,000 ahead of it."""


class CallOwnedByAnotherRoleError(DatabaseError):
    """A pending call may be finished only by the role that recorded it."""


class CallRefusedError(DatabaseError):
    """The database refused a call's values: a ``call_type`` that is not 1 to 32
    of ``a-z0-9_``, a ``latency_ms`` that is negative or not finite, or a CHECK
    of an adopted table (SQLSTATE 23514; SQLite ``CX006``)."""


class ImmutableSealError(DatabaseError):
    """The database refused to change or delete a seal (``CX007``)."""


class ImmutablePurgeError(DatabaseError):
    """The database refused to change or delete a purge record (``CX008``)."""


class PermissionDeniedError(DatabaseError):
    """The database role lacks a privilege for what was asked (see
    sql/postgresql-roles.sql)."""


class ReplayMismatchError(CallIndexError):
    """A request that :class:`~callindex.replay.ReplayTransport` cannot serve: it
    differs from the next recorded call (strict mode; ``differing`` names which
    of ``method``, ``url`` and ``body``), none left matches it (lenient mode),
    or every recorded call has been served. The message holds redacted URLs
    only, never a body."""

    def __init__(
        self,
        message: str,
        *,
        state_id: str,
        call_index: int | None = None,
        differing: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.state_id = state_id
        self.call_index = call_index
        self.differing = differing


class LLMError(CallIndexError):
    """A chat completion the LLM clients cannot hand back as a result. Raised
    only once the call is recorded and finished.

    ``status_code`` and ``response_body`` (the parsed JSON, or ``None``) are
    those of the final response; ``operation_id`` is the
    ``request["operation_id"]`` its recorded attempts share, ``attempts`` how
    many there were. Messages never quote the server or the request.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        response_body: object = None,
        operation_id: str | None = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.response_body = response_body
        self.operation_id = operation_id
        self.attempts = attempts


class LLMRateLimitedError(LLMError):
    """The endpoint still answered 429 when the retries ran out. ``retry_after``
    is the delay in seconds its last response asked for (``None``: none asked)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status_code: int | None = None,
        response_body: object = None,
        operation_id: str | None = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            response_body=response_body,
            operation_id=operation_id,
            attempts=attempts,
        )
        self.retry_after = retry_after


class LLMContentFilteredError(LLMError):
    """A 200 whose completion the provider withheld: ``finish_reason`` is
    ``content_filter``, or the message has neither content nor tool calls."""

    def __init__(
        self,
        message: str,
        *,
        finish_reason: str | None = None,
        status_code: int | None = None,
        response_body: object = None,
        operation_id: str | None = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            response_body=response_body,
            operation_id=operation_id,
            attempts=attempts,
        )
        self.finish_reason = finish_reason


class LLMMalformedCompletionError(LLMError):
    """A 200 whose body is not a chat completion: not a JSON object, no
    ``choices``, a choice without a ``message`` object, or a ``content`` that is
    neither a string nor null."""
