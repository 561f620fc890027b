"""Every error callindex raises, rooted in one base class.

Driver errors never escape: :mod:`callindex.database` maps them to these types
at one boundary and chains the original with ``raise ... from exc``.

Hierarchy::

    CallIndexError
    ├── InvalidInputError          (also a ValueError)
    │   ├── InvalidStateIdError
    │   └── InvalidCountError
    ├── UnknownStateError          (also a LookupError)
    ├── ConfigurationError         bad database URL, unsupported backend
    ├── SchemaError
    │   ├── SchemaMissingError     the tables are not there: run `callindex db upgrade`
    │   └── SchemaVersionError     the database is behind or ahead of this library
    └── DatabaseError
        ├── DatabaseUnavailableError   server unreachable, connection lost, shutting down
        └── ContentionError            lock or busy timeout, serialization failure, deadlock
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


class ConfigurationError(CallIndexError):
    """The database URL or another setting is unusable."""


class SchemaError(CallIndexError):
    """The database schema does not match what this library expects."""


class SchemaMissingError(SchemaError):
    """The callindex tables do not exist in the database."""


class SchemaVersionError(SchemaError):
    """The database schema revision differs from the installed library's."""


class DatabaseError(CallIndexError):
    """The database failed in a way callindex could not recover from."""


class DatabaseUnavailableError(DatabaseError):
    """The database could not be reached, or the connection was lost."""


class ContentionError(DatabaseError):
    """The database stayed locked or kept aborting the transaction for contention."""
