"""The one boundary where driver errors become callindex's own.

PostgreSQL errors are looked up by SQLSTATE (exact code, then class) in one
table; SQLite errors by their extended result code. The result is raised
``from`` the driver error by :func:`translated`. No message of a driver error
carries a password (callindex never puts one in SQL), and URLs appear only in
their display form.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import psycopg
from sqlalchemy import exc

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

# What a failure means, by SQLSTATE: the message is built from the display URL
# and the driver's first line of text.
Meaning = Callable[[str, str], CallIndexError]


def _schema_missing(where: str, detail: str) -> CallIndexError:
    return SchemaMissingError(
        f"the callindex schema is missing from {where}: run `callindex db upgrade`"
    )


def _contention(where: str, detail: str) -> CallIndexError:
    return ContentionError(f"the database stayed busy ({detail}) on {where}")


def _unavailable(where: str, detail: str) -> CallIndexError:
    return DatabaseUnavailableError(f"cannot reach the database {where}: {detail}")


def _refused(where: str, detail: str) -> CallIndexError:
    return ImmutableCallError(detail)


def counter_behind() -> CounterBehindError:
    return CounterBehindError(
        "a call index collided with a recorded call: the state's counter is behind "
        "its calls (calls were written without the allocator); run `callindex repair`"
    )


BY_SQLSTATE: Final[dict[str, Meaning]] = {
    "42P01": _schema_missing,  # undefined_table
    "42883": _schema_missing,  # undefined_function
    "40001": _contention,  # serialization_failure
    "40P01": _contention,  # deadlock_detected
    "55P03": _contention,  # lock_not_available: lock_timeout
    "57014": _contention,  # query_canceled: statement_timeout
    "57P01": _unavailable,  # admin_shutdown
    "57P02": _unavailable,  # crash_shutdown
    "57P03": _unavailable,  # cannot_connect_now
    "CX001": _refused,  # callindex's guard triggers
}
BY_SQLSTATE_CLASS: Final[dict[str, Meaning]] = {
    "08": _unavailable,  # connection exceptions
}
SQLITE_BUSY_CODES: Final = ("SQLITE_BUSY", "SQLITE_LOCKED")  # and their extended codes
# psycopg reports these connection failures without an SQLSTATE; no retry fixes them.
# ("the database system is starting up" is not among them: that one passes.)
_PERMANENT_CONNECT_FAILURES: Final = (
    "does not exist",
    "authentication failed",
    "no pg_hba.conf entry",
    "invalid connection option",
    "invalid integer value",
)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def translate(
    error: BaseException,
    where: str,
    *,
    sqlite_path: Path | None = None,
    invalidated: bool = False,
) -> CallIndexError:
    """The callindex error for a driver error (``psycopg.Error`` or ``sqlite3.Error``)."""
    detail = _first_line(error)
    if isinstance(error, psycopg.Error):
        return _translate_postgresql(error, where, detail, invalidated)
    if isinstance(error, sqlite3.Error):
        return _translate_sqlite(error, where, detail, sqlite_path)
    return DatabaseError(f"{type(error).__name__}: {detail} (on {where})")


def _translate_postgresql(
    error: psycopg.Error, where: str, detail: str, invalidated: bool
) -> CallIndexError:
    sqlstate = error.sqlstate or ""
    meaning = BY_SQLSTATE.get(sqlstate) or BY_SQLSTATE_CLASS.get(sqlstate[:2])
    if meaning is not None:
        return meaning(where, detail)
    if detail.startswith("callindex: "):
        return ImmutableCallError(detail)
    if isinstance(error, psycopg.errors.UniqueViolation):
        return _unique_violation(error, detail)
    if invalidated or (isinstance(error, psycopg.OperationalError) and not sqlstate):
        if any(failure in detail for failure in _PERMANENT_CONNECT_FAILURES):
            return ConfigurationError(f"the database {where} refused the connection: {detail}")
        return _unavailable(where, detail)
    return DatabaseError(f"{type(error).__name__}: {detail} (on {where})")


def _unique_violation(error: psycopg.Error, detail: str) -> CallIndexError:
    diagnostics = error.diag
    constraint = diagnostics.constraint_name or ""
    key = diagnostics.message_detail or ""
    if constraint == "uq_calls_state_id_call_index" or key.startswith(
        "Key (state_id, call_index)="  # an adopted table's own index
    ):
        return counter_behind()
    if constraint == "pk_calls" or key.startswith("Key (call_id)="):
        # The same call_id, recorded by a concurrent attempt that committed
        # first. This statement rolled back whole; retrying finds that call.
        return ContentionError("the same call_id was being recorded concurrently")
    return DatabaseError(f"integrity error: {detail}")


def _translate_sqlite(
    error: sqlite3.Error, where: str, detail: str, sqlite_path: Path | None
) -> CallIndexError:
    code = getattr(error, "sqlite_errorname", "") or ""
    if code.startswith(SQLITE_BUSY_CODES):
        return _contention(where, detail)
    if "no such table" in detail:
        return _schema_missing(where, detail)
    if "the counter is behind its calls" in detail or "calls.call_index" in detail:
        return counter_behind()
    if detail.startswith("callindex: "):
        return ImmutableCallError(detail)
    if "calls.call_id" in detail:
        return ContentionError("the same call_id was being recorded concurrently")
    if code == "SQLITE_CANTOPEN":
        if sqlite_path is not None and not sqlite_path.exists():
            return SchemaMissingError(
                f"the database file {str(sqlite_path)!r} does not exist: run `callindex db upgrade`"
            )
        return ConfigurationError(f"cannot open the database {where}: {detail}")
    if isinstance(error, sqlite3.IntegrityError):
        return DatabaseError(f"integrity error: {detail}")
    return DatabaseError(f"{type(error).__name__}: {detail} (on {where})")


@contextmanager
def translated(where: str, *, sqlite_path: Path | None = None) -> Iterator[None]:
    """Re-raise driver and SQLAlchemy errors as :mod:`callindex.errors` types."""
    try:
        yield
    except CallIndexError:
        raise
    except exc.DBAPIError as error:
        original = error.orig if error.orig is not None else error
        raise translate(
            original,
            where,
            sqlite_path=sqlite_path,
            invalidated=error.connection_invalidated,
        ) from error
    except (psycopg.Error, sqlite3.Error) as error:
        raise translate(error, where, sqlite_path=sqlite_path) from error
    except exc.SQLAlchemyError as error:
        raise DatabaseError(f"{type(error).__name__} on {where}") from error
