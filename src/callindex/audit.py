"""Checking and mending the audit trail: verify, sweep, repair."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from callindex.database import Database, Statements
from callindex.errors import InvalidInputError

DEFAULT_PENDING_THRESHOLD_SECONDS: Final = 15 * 60
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

GAP_CAUSE: Final = (
    "reserved by allocate_call_index (or a count block) and never used for a call row, "
    "or skipped by a writer that inserted a call_index ahead of the counter; "
    "record_call and begin_call never leave gaps"
)


def validate_seconds(seconds: object, what: str) -> float:
    """``seconds`` as a float if it is a finite number >= 0, else :class:`InvalidInputError`."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidInputError(f"{what} must be a number of seconds, not {type(seconds).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInputError(f"{what} must be a finite number of seconds >= 0, not {seconds}")
    return float(seconds)


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``90s``, ``15m``, ``2h``, ``1d`` or ``1h30m``."""
    cleaned = text.strip().lower()
    parts = _DURATION.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise InvalidInputError(
            f"not a duration: {text!r} (use a number and a unit: 90s, 15m, 2h, 1d)"
        )
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


@dataclass(frozen=True)
class Report:
    """What ``verify`` found. ``ok`` is false when an invariant is violated."""

    states: int
    calls_by_status: dict[str, int]
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    counters_behind: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    unused_reservations: list[dict[str, Any]] = field(default_factory=list)
    stale_pending: list[dict[str, Any]] = field(default_factory=list)
    pending_threshold_seconds: float = DEFAULT_PENDING_THRESHOLD_SECONDS

    @property
    def ok(self) -> bool:
        return not self.duplicates and not self.counters_behind

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "gap_cause": GAP_CAUSE, **asdict(self)}


def verify(db: Database, pending_threshold_seconds: float) -> Report:
    """Check every invariant of the trail, in one read transaction."""
    pending_threshold_seconds = validate_seconds(
        pending_threshold_seconds, "pending_threshold_seconds"
    )

    def check(statements: Statements) -> Report:
        def rows(name: str, **params: Any) -> list[dict[str, Any]]:
            found = statements.rows(name, params)
            return [{key: _plain(value) for key, value in row.items()} for row in found]

        return Report(
            states=int(rows("state_count")[0]["states"]),
            calls_by_status={row["status"]: int(row["calls"]) for row in rows("status_counts")},
            duplicates=rows("duplicate_indices"),
            counters_behind=rows("counters_behind"),
            gaps=rows("index_gaps"),
            unused_reservations=rows("unused_reservations"),
            stale_pending=rows("stale_pending", seconds=pending_threshold_seconds),
            pending_threshold_seconds=pending_threshold_seconds,
        )

    return db.read(check)


def _plain(value: Any) -> Any:
    if isinstance(value, int | float | str) or value is None:
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def sweep(db: Database, older_than_seconds: float, state_prefix: str = "") -> list[dict[str, Any]]:
    """Mark ``pending`` calls created at least ``older_than_seconds`` ago
    ``abandoned``; with ``state_prefix``, only those of states whose id starts with it."""
    older_than_seconds = validate_seconds(older_than_seconds, "older_than_seconds")
    if not isinstance(state_prefix, str):
        raise InvalidInputError(f"state_prefix must be a string, not {type(state_prefix).__name__}")
    parameters = {"seconds": older_than_seconds, "state_prefix": state_prefix}
    return db.run(
        lambda statements: [dict(row) for row in statements.rows("sweep_pending", parameters)],
    )


def repair(db: Database) -> list[dict[str, Any]]:
    """Move every counter that is behind its calls to ``max(call_index) + 1``."""
    return db.run(
        lambda statements: [dict(row) for row in statements.rows("repair_counters")],
    )
