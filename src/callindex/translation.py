"""The one boundary where driver errors become callindex's own.

PostgreSQL errors are looked up by SQLSTATE (exact code, then class) in one
table, callindex's own refusals included (``CX001``..``CX009``, one per
condition); a unique violation by the columns its index covers, read from the
catalog. SQLite errors by their extended result code, by the columns a
UNIQUE failure names, and by the code callindex's triggers start their
message with (``callindex: [CX002] ...``). The result is raised
``from`` the driver error by :func:`translated`. No message of a driver error
carries a password (callindex never puts one in SQL), and URLs appear only in
their display form.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import psycopg
from sqlalchemy import exc

from callindex.errors import (
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
    IndexTakenError,
    PermissionDeniedError,
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


def _standby(where: str, detail: str) -> CallIndexError:
    return ConfigurationError(
        f"{where} is a read-only standby ({detail}): with several servers, add "
        "target_session_attrs=read-write to the URL so that callindex connects to the primary"
    )


def _refusal(kind: type[CallIndexError]) -> Meaning:
    return lambda where, detail: kind(detail)


# callindex's own refusals, by the code its triggers and functions raise.
CALLINDEX_CODES: Final[dict[str, Meaning]] = {
    "CX001": _refusal(ImmutableCallError),
    "CX002": _refusal(CounterGuardError),
    "CX003": _refusal(IndexAheadError),
    "CX004": _refusal(CallOwnedByAnotherRoleError),
    "CX005": lambda where, detail: counter_behind(),  # SQLite: an index already recorded
    "CX006": _refusal(CallRefusedError),  # SQLite: PostgreSQL's CHECKs raise 23514
    "CX007": _refusal(ImmutableSealError),
    "CX008": _refusal(ImmutablePurgeError),
    "CX009": _refusal(IndexTakenError),  # an index whose call was purged
}


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
    "25006": _standby,  # read_only_sql_transaction
    "42501": _refusal(PermissionDeniedError),  # insufficient_privilege
    "23514": _refusal(CallRefusedError),  # check_violation
    **CALLINDEX_CODES,
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


UniqueColumns = Callable[[str], frozenset[str]]
"""The columns of a unique index or constraint of ``calls``, by its name."""

_SQLITE_CODE: Final = re.compile(r"^callindex: \[(CX\d{3})\] ")
_SQLITE_UNIQUE: Final = re.compile(r"^UNIQUE constraint failed: (.*)$")


def translate(
    error: BaseException,
    where: str,
    *,
    sqlite_path: Path | None = None,
    invalidated: bool = False,
    unique_columns: UniqueColumns | None = None,
) -> CallIndexError:
    """The callindex error for a driver error (``psycopg.Error`` or ``sqlite3.Error``)."""
    detail = _first_line(error)
    if isinstance(error, psycopg.Error):
        return _translate_postgresql(error, where, detail, invalidated, unique_columns)
    if isinstance(error, sqlite3.Error):
        return _translate_sqlite(error, where, detail, sqlite_path)
    return DatabaseError(f"{type(error).__name__}: {detail} (on {where})")


def _translate_postgresql(
    error: psycopg.Error,
    where: str,
    detail: str,
    invalidated: bool,
    unique_columns: UniqueColumns | None,
) -> CallIndexError:
    sqlstate = error.sqlstate or ""
    meaning = BY_SQLSTATE.get(sqlstate) or BY_SQLSTATE_CLASS.get(sqlstate[:2])
    if meaning is not None:
        return meaning(where, detail)
    if isinstance(error, psycopg.errors.UniqueViolation):
        name = error.diag.constraint_name or ""
        columns = unique_columns(name) if unique_columns and name else frozenset()
        return _unique_violation(columns, detail)
    if invalidated or (isinstance(error, psycopg.OperationalError) and not sqlstate):
        if any(failure in detail for failure in _PERMANENT_CONNECT_FAILURES):
            return ConfigurationError(f"the database {where} refused the connection: {detail}")
        return _unavailable(where, detail)
    return DatabaseError(f"{type(error).__name__}: {detail} (on {where})")


def _unique_violation(columns: frozenset[str], detail: str) -> CallIndexError:
    """A unique violation on ``calls``, by the columns its index covers."""
    if columns == {"state_id", "call_index"}:
        return counter_behind()
    if columns == {"call_id"}:
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
    if coded := _SQLITE_CODE.match(detail):
        return CALLINDEX_CODES[coded[1]](where, detail)
    if unique := _SQLITE_UNIQUE.match(detail):
        columns = frozenset(
            name.strip().partition(".")[2] for name in unique[1].split(",") if "." in name
        )
        return _unique_violation(columns, detail)
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
def translated(
    where: str, *, sqlite_path: Path | None = None, unique_columns: UniqueColumns | None = None
) -> Iterator[None]:
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
            unique_columns=unique_columns,
        ) from error
    except (psycopg.Error, sqlite3.Error) as error:
        raise translate(
            error, where, sqlite_path=sqlite_path, unique_columns=unique_columns
        ) from error
    except exc.SQLAlchemyError as error:
        raise DatabaseError(f"{type(error).__name__} on {where}") from error
