"""callindex: database-allocated call indices for audit trails of external calls."""

from callindex.audit import Report
from callindex.calls import Call, CallStatus, CallType
from callindex.errors import (
    CallAlreadyFinishedError,
    CallIdConflictError,
    CallIndexError,
    ConfigurationError,
    ContentionError,
    CounterBehindError,
    DatabaseError,
    DatabaseUnavailableError,
    ImmutableCallError,
    InvalidCallError,
    InvalidCountError,
    InvalidInputError,
    InvalidPayloadError,
    InvalidStateIdError,
    PayloadTooLargeError,
    SchemaError,
    SchemaMissingError,
    SchemaVersionError,
    UnknownCallError,
    UnknownStateError,
)
from callindex.payloads import MAX_PAYLOAD_BYTES
from callindex.recorder import CallRecorder
from callindex.retry import DatabaseRetryPolicy

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "Call",
    "CallAlreadyFinishedError",
    "CallIdConflictError",
    "CallIndexError",
    "CallRecorder",
    "CallStatus",
    "CallType",
    "ConfigurationError",
    "ContentionError",
    "CounterBehindError",
    "DatabaseError",
    "DatabaseRetryPolicy",
    "DatabaseUnavailableError",
    "ImmutableCallError",
    "InvalidCallError",
    "InvalidCountError",
    "InvalidInputError",
    "InvalidPayloadError",
    "InvalidStateIdError",
    "PayloadTooLargeError",
    "Report",
    "SchemaError",
    "SchemaMissingError",
    "SchemaVersionError",
    "UnknownCallError",
    "UnknownStateError",
]
