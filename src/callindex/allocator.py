"""Index allocation: the counter row of a state, bumped by one atomic statement.

Nothing here keeps state between calls: no lock, no cache, no map of states.
Every function takes the :class:`~callindex.database.Statements` to run on,
so the caller decides which transaction it belongs to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from callindex.database import Statements
from callindex.errors import InvalidCountError, InvalidStateIdError, UnknownStateError
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


def open_state(statements: Statements, state_id: str) -> None:
    """Create the counter row of ``state_id`` unless it exists."""
    statements.rows("open_state", {"state_id": state_id})


def allocate(statements: Statements, state_id: str, count: int) -> int:
    """Reserve ``count`` consecutive indices of ``state_id`` and return the first."""
    rows = statements.rows("allocate_call_index", {"state_id": state_id, "count": count})
    if not rows:
        raise UnknownStateError(state_id)
    return int(rows[0]["first_index"])


def allocate_many(statements: Statements, counts: Mapping[str, int]) -> dict[str, int]:
    """Reserve ``counts[state_id]`` indices for each state, in one transaction.

    Counter rows are locked in sorted ``state_id`` order, the same order for
    every caller, so two transactions that share states can never deadlock.
    """
    return {
        state_id: allocate(statements, state_id, counts[state_id]) for state_id in sorted(counts)
    }
