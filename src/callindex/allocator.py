"""Index allocation: the counter row of a state, bumped by one atomic statement.

Nothing here keeps state between calls: no lock, no cache, no map of states.
Without ``connection`` each allocation commits by itself, durably, before it
returns (retried under the database's policy); with ``connection`` it joins
that SQLAlchemy connection's transaction and commits or rolls back with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from sqlalchemy import Connection

from callindex.database import Database
from callindex.errors import InvalidCountError, InvalidStateIdError
from callindex.schema import MAX_STATE_ID_LENGTH

MAX_COUNT: Final = 1_000_000


def validate_state_id(state_id: object) -> str:
    """``state_id`` if it is a usable state identifier, else :class:`InvalidStateIdError`."""
    if not isinstance(state_id, str):
        raise InvalidStateIdError(f"state_id must be a string, not {type(state_id).__name__}")
    if not state_id:
        raise InvalidStateIdError("state_id must not be empty")
    if len(state_id) > MAX_STATE_ID_LENGTH:
        raise InvalidStateIdError(
            f"state_id is {len(state_id)} characters long; the limit is {MAX_STATE_ID_LENGTH}"
        )
    if "\x00" in state_id:
        raise InvalidStateIdError("state_id must not contain NUL characters")
    try:
        state_id.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidStateIdError("state_id must be valid Unicode (no lone surrogates)") from error
    return state_id


def validate_count(count: object) -> int:
    """``count`` if it is an integer in ``1..MAX_COUNT``, else :class:`InvalidCountError`."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidCountError(f"count must be an integer, not {type(count).__name__}")
    if not 1 <= count <= MAX_COUNT:
        raise InvalidCountError(f"count must be between 1 and {MAX_COUNT:,}, not {count}")
    return count


def open_state(db: Database, state_id: str, connection: Connection | None = None) -> None:
    """Create the counter row of ``state_id`` unless it exists."""
    if connection is None:
        db.write(lambda backend: backend.open_state(state_id))
    else:
        db.run(
            lambda statements: db.backend.open_state_in(statements.connection, state_id),
            connection=connection,
        )


def allocate(
    db: Database,
    state_id: str,
    count: int,
    connection: Connection | None = None,
    *,
    opening: bool = False,
) -> int:
    """Reserve ``count`` consecutive indices of ``state_id`` and return the first;
    with ``opening``, an unknown state is opened by the same statement."""
    if connection is None:
        return db.write(lambda backend: backend.allocate(state_id, count, opening=opening))
    return db.run(
        lambda statements: db.backend.allocate_in(
            statements.connection, state_id, count, opening=opening
        ),
        connection=connection,
    )


def allocate_many(
    db: Database,
    counts: Mapping[str, int],
    connection: Connection | None = None,
    *,
    opening: bool = False,
) -> dict[str, int]:
    """Reserve ``counts[state_id]`` indices for each state, in one transaction.

    Counter rows are locked in sorted ``state_id`` order, the same order for
    every caller, so two transactions that share states can never deadlock.
    """
    if connection is None:
        return db.write(lambda backend: backend.allocate_many(counts, opening=opening))
    return db.run(
        lambda statements: {
            state_id: db.backend.allocate_in(
                statements.connection, state_id, counts[state_id], opening=opening
            )
            for state_id in sorted(counts)
        },
        connection=connection,
    )
