"""callindex: database-allocated call indices for audit trails of external calls."""

from callindex.errors import (
    CallIndexError,
    ConfigurationError,
    ContentionError,
    DatabaseError,
    DatabaseUnavailableError,
    InvalidCountError,
    InvalidInputError,
    InvalidStateIdError,
    SchemaError,
    SchemaMissingError,
    SchemaVersionError,
    UnknownStateError,
)
from callindex.recorder import CallRecorder

__all__ = [
    "CallIndexError",
    "CallRecorder",
    "ConfigurationError",
    "ContentionError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "InvalidCountError",
    "InvalidInputError",
    "InvalidStateIdError",
    "SchemaError",
    "SchemaMissingError",
    "SchemaVersionError",
    "UnknownStateError",
]
