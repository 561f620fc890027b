"""Index allocation: the counter row of a state, bumped by one atomic statement.

Nothing here keeps state between calls: no lock, no cache, no map of states.
Every function takes the :class:`~sqlalchemy.Connection` to run on, so the
caller decides which transaction it belongs to.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Connection

from callindex.errors import InvalidCountError, InvalidStateIdError, UnknownStateError
from callindex.resources import queries
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


def open_state(connection: Connection, state_id: str) -> None:
    """Create the counter row of ``state_id`` unless it exists."""
    connection.execute(queries()["open_state"], {"state_id": state_id})


def allocate(connection: Connection, state_id: str, count: int) -> int:
    """Reserve ``count`` consecutive indices of ``state_id`` and return the first."""
    first = connection.execute(
        queries()["allocate_call_index"], {"state_id": state_id, "count": count}
    ).scalar_one_or_none()
    if first is None:
        raise UnknownStateError(state_id)
    return int(first)
