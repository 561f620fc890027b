"""Retention: purging finished calls, never their indices.

``purge`` deletes the finished calls created before a bound, one state at a
time, each in its own short transaction that holds the state's counter row:

* counters are not touched, so a purged index is never handed out again, and
  ``record_call(call_index=k)`` refuses an index whose call was purged;
* every purged run of indices is recorded in ``call_purges`` (state, first
  and last index, how many calls, the bound, when, by whom); a run ends at
  a call that stays (a pending one, a newer one);
* a sealed state gives up only calls at or below its last seal (seal the
  rest first), and each of its runs records the seal chain's head after it,
  so the chain over what remains is still verified against every seal;
* pending calls are never purged (sweep them first).

On PostgreSQL only the owner of ``calls`` may purge (the application and
auditor roles of sql/postgresql-roles.sql cannot delete calls).
"""

from __future__ import annotations

import functools
import getpass
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import inspect

from callindex import partitions, seals
from callindex.database import Database, Statements
from callindex.errors import InvalidInputError, PermissionDeniedError
from callindex.schema import call_purges


@dataclass(frozen=True)
class Purge:
    """One purged run of a state's indices."""

    state_id: str
    first_index: int
    last_index: int
    calls: int
    head: str | None
    """The seal chain's head after ``last_index`` (the state was sealed), else ``None``."""
    purged_before: str
    purged_at: str | None
    purged_by: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Purge:
        return cls(
            state_id=str(row["state_id"]),
            first_index=int(row["first_index"]),
            last_index=int(row["last_index"]),
            calls=int(row["calls"]),
            head=None if row["head"] is None else str(row["head"]),
            purged_before=_text(row["purged_before"]),
            purged_at=_text(row["purged_at"]),
            purged_by=str(row["purged_by"]),
        )


def _text(value: Any) -> str:
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat(timespec="microseconds")
    return str(value)


def purge(db: Database, before: datetime, state_prefix: str = "") -> list[Purge]:
    """Delete the finished calls created before ``before`` (of states whose id
    starts with ``state_prefix``), recording each purged run; returns the runs."""
    if not isinstance(state_prefix, str):
        raise InvalidInputError(f"state_prefix must be a string, not {type(state_prefix).__name__}")
    bound = _bound(db, before)
    purged_by = db.read(lambda statements: _purger(statements))
    done = _drop_months(db, bound, state_prefix, purged_by)
    candidates = db.read(
        lambda statements: statements.rows(
            "purge_candidates", {"before": bound, "state_prefix": state_prefix}
        )
    )
    for candidate in candidates:
        work = functools.partial(
            _purge_state, state_id=str(candidate["state_id"]), before=bound, purged_by=purged_by
        )
        done.extend(db.run(work))
    return done


def _drop_months(db: Database, before: Any, state_prefix: str, purged_by: str) -> list[Purge]:
    """PostgreSQL with ``calls`` partitioned by month: drop each month wholly
    before the bound whose calls may all be purged, recording its runs."""
    if db.name != "postgresql" or state_prefix:
        return []
    partitions.ensure_months_ahead(db)
    done: list[Purge] = []
    for month in db.read(lambda statements: partitions.droppable_months(statements, before)):

        def drop(statements: Statements, month: str = month) -> list[Purge]:
            # Dropping a partition locks calls whole: never queue writers for long.
            db.backend.bound_lock_waits(statements.connection, db.retry.attempt_seconds)
            runs = partitions.month_runs(statements, month)
            if runs is None:
                return []  # purged row by row instead
            recorded = _record(statements, runs, before, purged_by)
            partitions.drop_month(statements, month)
            return recorded

        done.extend(db.run(drop))
    return done


def _record(
    statements: Statements, runs: Sequence[Mapping[str, Any]], before: Any, purged_by: str
) -> list[Purge]:
    """Record purged ``runs`` (of one state or more; the calls still there),
    with the seal chain's head after each run of a sealed state."""
    by_state: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_state.setdefault(str(run["state_id"]), []).append(run)
    recorded = []
    for state_id, state_runs in by_state.items():
        sealed = bool(state_runs[0]["sealed"])
        heads = _heads(statements, state_id, state_runs) if sealed else [None] * len(state_runs)
        for run, head in zip(state_runs, heads, strict=True):
            row = {
                "state_id": state_id,
                "first_index": int(run["first_index"]),
                "last_index": int(run["last_index"]),
                "calls": int(run["calls"]),
                "head": head,
                "before": before,
                "purged_by": purged_by,
            }
            (stored,) = statements.rows("insert_purge", row)
            recorded.append(Purge.from_row(stored))
    return recorded


def _bound(db: Database, before: datetime) -> Any:
    if not isinstance(before, datetime) or before.tzinfo is None:
        raise InvalidInputError("before must be a timezone-aware datetime")
    moment = before.astimezone(UTC)
    # SQLite stores UTC as text: compare text with text.
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if db.name == "sqlite" else moment


def _purger(statements: Statements) -> str:
    if statements.db.name == "sqlite":
        try:
            return getpass.getuser()
        except (KeyError, OSError):  # a uid without a name (containers)
            return f"uid {os.getuid()}"
    (row,) = statements.rows("purger")
    if not row["owner"]:
        raise PermissionDeniedError(
            f"only the owner of calls may purge; {row['purged_by']!r} is not "
            "(run `callindex purge` as the role that ran `callindex db upgrade`)"
        )
    return str(row["purged_by"])


def _purge_state(
    statements: Statements, *, state_id: str, before: Any, purged_by: str
) -> list[Purge]:
    statements.rows("lock_calls")
    statements.rows("lock_counter", {"state_id": state_id})
    # Read under the counter's lock, which sealing and record_call(call_index=k)
    # take too: each statement sees what they committed before it.
    seals_of_state = statements.rows("seals_of_state", {"state_id": state_id})
    sealed = bool(seals_of_state)
    through = int(seals_of_state[-1]["last_index"]) if sealed else _UNSEALED
    where = {"state_id": state_id, "before": before, "through": through}
    runs = [
        {**run, "state_id": state_id, "sealed": sealed}
        for run in statements.rows("purge_ranges", where)
    ]
    if not runs:
        return []
    recorded = _record(statements, runs, before, purged_by)
    statements.rows("begin_purge")
    for run in recorded:
        bounds = {"first_index": run.first_index, "last_index": run.last_index}
        deleted = statements.count("delete_run", {"state_id": state_id, "before": before, **bounds})
        if deleted != run.calls:
            raise AssertionError(
                f"purge of {state_id!r} {bounds} deleted {deleted} calls, not {run.calls}"
            )
    statements.rows("end_purge")
    return recorded


_UNSEALED: Final = 2**63 - 1  # no seal: every index may go


def _heads(
    statements: Statements, state_id: str, runs: Sequence[Mapping[str, Any]]
) -> list[str | None]:
    """The seal chain's head after each run (all below the state's last seal)."""
    ends = {int(run["last_index"]) for run in runs}
    after = _sealed_before(statements, state_id, min(int(run["first_index"]) for run in runs))
    found: dict[int, str] = {}
    for step in seals.walk(statements, state_id, after=after):
        if step.index in ends:
            found[step.index] = step.head
            if len(found) == len(ends):
                break
    return [found[int(run["last_index"])] for run in runs]


def _sealed_before(statements: Statements, state_id: str, index: int) -> seals.Link | None:
    """The chain at the state's last seal below ``index`` (the walk to the runs
    starts there, not at the genesis); ``None`` when there is none. A seal
    inside a purged range is passed over: the chain resumes at its end."""
    purged = statements.rows("purges_of_state", {"state_id": state_id})
    for row in reversed(statements.rows("seals_of_state", {"state_id": state_id})):
        last = int(row["last_index"])
        inside = any(int(p["first_index"]) <= last < int(p["last_index"]) for p in purged)
        if last < index and not inside:
            return seals.Link(index=last, head=str(row["head"]), calls=int(row["calls"]))
    return None


def of_database(statements: Statements) -> list[Purge]:
    """Every purged run, in (state, index) order (none before revision 0012,
    which added ``call_purges``: verify reads older schemas too)."""
    if not inspect(statements.connection).has_table(call_purges.name):
        return []
    return [Purge.from_row(row) for row in statements.rows("all_purges")]


def unexplained(
    missing: Sequence[Mapping[str, Any]], purged: Sequence[Purge], first: str, last: str
) -> list[dict[str, Any]]:
    """The parts of the ``missing`` index ranges (keys ``state_id``, ``first``,
    ``last``) that no purged run covers."""
    by_state: dict[str, list[Purge]] = {}
    for run in purged:
        by_state.setdefault(run.state_id, []).append(run)
    remaining = []
    for gap in missing:
        low, high = int(gap[first]), int(gap[last])
        for run in by_state.get(str(gap["state_id"]), ()):
            if run.last_index < low or run.first_index > high:
                continue
            if run.first_index > low:
                remaining.append({**gap, first: low, last: run.first_index - 1})
            low = max(low, run.last_index + 1)
        if low <= high:
            remaining.append({**gap, first: low, last: high})
    return remaining
