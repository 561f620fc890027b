"""callindex: database-allocated call indices for audit trails of external calls.

The public names below are imported on first use, so that ``import callindex``
(and the ``callindex`` command's ``--help``) does not load SQLAlchemy, psycopg
and httpx until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from callindex.async_recorder import AsyncCallRecorder
    from callindex.audit import Report
    from callindex.calls import Call, CallStatus, CallType
    from callindex.clients import (
        AsyncAuditedHTTPClient,
        AsyncAuditedLLMClient,
        AuditedHTTPClient,
        AuditedLLMClient,
        AuditedTransport,
        ChatResult,
        Redactor,
        Usage,
    )
    from callindex.errors import (
        AdoptionError,
        CallAlreadyFinishedError,
        CallIdConflictError,
        CallIndexError,
        CallOwnedByAnotherRoleError,
        CallRefusedError,
        ConfigurationError,
        ContentionError,
        CounterBehindError,
        CounterGuardError,
        DatabaseError,
        DatabaseUnavailableError,
        ImmutableCallError,
        ImmutablePurgeError,
        ImmutableSealError,
        IndexAheadError,
        IndexNotReservedError,
        IndexSealedError,
        IndexTakenError,
        InvalidCallError,
        InvalidCountError,
        InvalidHeaderError,
        InvalidInputError,
        InvalidPayloadError,
        InvalidStateIdError,
        LLMContentFilteredError,
        LLMError,
        LLMMalformedCompletionError,
        LLMRateLimitedError,
        PayloadTooLargeError,
        PermissionDeniedError,
        ReplayMismatchError,
        SchemaError,
        SchemaMissingError,
        SchemaVersionError,
        UnknownCallError,
        UnknownStateError,
    )
    from callindex.payloads import MAX_PAYLOAD_BYTES
    from callindex.recorder import CallRecorder
    from callindex.replay import ReplayTransport
    from callindex.retry import DatabaseRetryPolicy, RetryPolicy

_ERRORS = [
    "AdoptionError",
    "AsyncCallRecorder",
    "CallAlreadyFinishedError",
    "CallIdConflictError",
    "CallIndexError",
    "CallOwnedByAnotherRoleError",
    "CallRefusedError",
    "ConfigurationError",
    "ContentionError",
    "CounterBehindError",
    "CounterGuardError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "ImmutableCallError",
    "ImmutablePurgeError",
    "ImmutableSealError",
    "IndexAheadError",
    "IndexNotReservedError",
    "IndexSealedError",
    "IndexTakenError",
    "InvalidCallError",
    "InvalidCountError",
    "InvalidHeaderError",
    "InvalidInputError",
    "InvalidPayloadError",
    "InvalidStateIdError",
    "LLMContentFilteredError",
    "LLMError",
    "LLMMalformedCompletionError",
    "LLMRateLimitedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ReplayMismatchError",
    "SchemaError",
    "SchemaMissingError",
    "SchemaVersionError",
    "UnknownCallError",
    "UnknownStateError",
]
_CLIENTS = [
    "AsyncAuditedHTTPClient",
    "AsyncAuditedLLMClient",
    "AuditedHTTPClient",
    "AuditedLLMClient",
    "AuditedTransport",
    "ChatResult",
    "Redactor",
    "Usage",
]
# Where each public name lives.
_MODULES: dict[str, str] = {
    **dict.fromkeys(_ERRORS, "callindex.errors"),
    **dict.fromkeys(_CLIENTS, "callindex.clients"),
    "Report": "callindex.audit",
    "Call": "callindex.calls",
    "CallStatus": "callindex.calls",
    "CallType": "callindex.calls",
    "MAX_PAYLOAD_BYTES": "callindex.payloads",
    "AsyncCallRecorder": "callindex.async_recorder",
    "CallRecorder": "callindex.recorder",
    "ReplayTransport": "callindex.replay",
    "DatabaseRetryPolicy": "callindex.retry",
    "RetryPolicy": "callindex.retry",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'callindex' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])


__all__ = [
    "MAX_PAYLOAD_BYTES",
    "AdoptionError",
    "AsyncAuditedHTTPClient",
    "AsyncAuditedLLMClient",
    "AsyncCallRecorder",
    "AuditedHTTPClient",
    "AuditedLLMClient",
    "AuditedTransport",
    "Call",
    "CallAlreadyFinishedError",
    "CallIdConflictError",
    "CallIndexError",
    "CallOwnedByAnotherRoleError",
    "CallRecorder",
    "CallRefusedError",
    "CallStatus",
    "CallType",
    "ChatResult",
    "ConfigurationError",
    "ContentionError",
    "CounterBehindError",
    "CounterGuardError",
    "DatabaseError",
    "DatabaseRetryPolicy",
    "DatabaseUnavailableError",
    "ImmutableCallError",
    "ImmutablePurgeError",
    "ImmutableSealError",
    "IndexAheadError",
    "IndexNotReservedError",
    "IndexSealedError",
    "IndexTakenError",
    "InvalidCallError",
    "InvalidCountError",
    "InvalidHeaderError",
    "InvalidInputError",
    "InvalidPayloadError",
    "InvalidStateIdError",
    "LLMContentFilteredError",
    "LLMError",
    "LLMMalformedCompletionError",
    "LLMRateLimitedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Redactor",
    "ReplayMismatchError",
    "ReplayTransport",
    "Report",
    "RetryPolicy",
    "SchemaError",
    "SchemaMissingError",
    "SchemaVersionError",
    "UnknownCallError",
    "UnknownStateError",
    "Usage",
]
