"""Checking and mending the audit trail: verify, sweep, repair."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from callindex import payloads, purges
from callindex import seals as sealing
from callindex.database import Database, Statements
from callindex.errors import InvalidInputError, InvalidPayloadError
from callindex.seals import Seal

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
    purged: list[dict[str, Any]] = field(default_factory=list)
    """Runs of indices whose calls were purged (``callindex purge``): not gaps."""
    pending_threshold_seconds: float = DEFAULT_PENDING_THRESHOLD_SECONDS
    hashes_checked: dict[str, int] | None = None
    """With ``hashes=True``: the payload hashes recomputed, per hash scheme."""
    hash_mismatches: list[dict[str, Any]] = field(default_factory=list)
    seals_checked: int | None = None
    """With ``seals=True``: how many seals were recomputed."""
    seal_mismatches: list[dict[str, Any]] = field(default_factory=list)
    """Sealed calls changed, deleted, renumbered or inserted after sealing, or
    a stored head that differs from an exported one (callindex.seals)."""
    legacy_hash_mismatches: list[dict[str, Any]] = field(default_factory=list)
    """Rows hashed before 0.2 (``sorted-json``) whose hash differs: on
    PostgreSQL ``jsonb`` rewrote numbers when they were stored, so a mismatch
    there is not proof of an edit. Reported, not a violation."""

    @property
    def ok(self) -> bool:
        return not (
            self.duplicates or self.counters_behind or self.hash_mismatches or self.seal_mismatches
        )

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "gap_cause": GAP_CAUSE, **asdict(self)}


def verify(
    db: Database,
    pending_threshold_seconds: float,
    *,
    hashes: bool = False,
    seals: bool = False,
    heads: Iterable[Seal] = (),
) -> Report:
    """Check every invariant of the trail, in one read transaction; with
    ``hashes``, also recompute every stored payload's hash (:func:`check_hashes`);
    with ``seals``, every sealed chain (:func:`callindex.seals.verify_seals`)."""
    pending_threshold_seconds = validate_seconds(
        pending_threshold_seconds, "pending_threshold_seconds"
    )

    def check(statements: Statements) -> Report:
        def rows(name: str, **params: Any) -> list[dict[str, Any]]:
            found = statements.rows(name, params)
            return [{key: _plain(value) for key, value in row.items()} for row in found]

        purged = purges.of_database(statements)
        return Report(
            states=int(rows("state_count")[0]["states"]),
            calls_by_status={row["status"]: int(row["calls"]) for row in rows("status_counts")},
            duplicates=rows("duplicate_indices"),
            counters_behind=rows("counters_behind"),
            gaps=purges.unexplained(rows("index_gaps"), purged, "first_missing", "last_missing"),
            unused_reservations=purges.unexplained(
                rows("unused_reservations"), purged, "first_unused", "last_unused"
            ),
            purged=[run.as_json() for run in purged],
            stale_pending=rows("stale_pending", seconds=pending_threshold_seconds),
            pending_threshold_seconds=pending_threshold_seconds,
            **(check_hashes(statements) if hashes else {}),
            **(sealing.verify_seals(statements, heads) if seals else {}),
        )

    return db.read(check)


_HASH_BATCH: Final = 500


def check_hashes(statements: Statements) -> dict[str, Any]:
    """Recompute the hash of every stored payload from the text stored, by the
    scheme its row was recorded with, in batches (memory stays bounded).

    A mismatch is a payload whose hash differs from the recorded one, a hash
    without a payload (or the reverse), or stored text that is not JSON. Rows
    hashed before 0.2 are reported apart (see ``Report.legacy_hash_mismatches``).
    """
    checked: dict[str, int] = {}
    mismatches: list[dict[str, Any]] = []
    legacy: list[dict[str, Any]] = []
    after = ""
    while batch := statements.rows(
        "stored_payloads", {"after_call_id": after, "batch": _HASH_BATCH}
    ):
        for row in batch:
            scheme = row["hash_scheme"]
            for name in ("request", "response", "error"):
                problem = _hash_problem(scheme, row[name], row[f"{name}_hash"])
                if row[name] is not None or row[f"{name}_hash"] is not None:
                    checked[scheme] = checked.get(scheme, 0) + 1
                if problem:
                    found = mismatches if scheme == payloads.SCHEME else legacy
                    found.append(
                        {
                            "call_id": row["call_id"],
                            "state_id": row["state_id"],
                            "call_index": row["call_index"],
                            "payload": name,
                            "hash_scheme": scheme,
                            "problem": problem,
                        }
                    )
        after = batch[-1]["call_id"]
    return {
        "hashes_checked": checked,
        "hash_mismatches": mismatches,
        "legacy_hash_mismatches": legacy,
    }


def _hash_problem(scheme: str, stored: Any, recorded: str | None) -> str | None:
    if stored is None or recorded is None:
        return None if stored is recorded else "a hash without a payload, or a payload without one"
    try:
        recomputed = payloads.recompute(scheme, stored)
    except (InvalidPayloadError, ValueError) as error:
        return f"stored text cannot be hashed: {error}"
    if recomputed != recorded:
        return f"recorded {recorded}, recomputed {recomputed}"
    return None


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
