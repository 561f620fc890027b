"""Sealed states: tamper evidence an owner cannot undo.

A seal is the head of a SHA-256 chain over a state's finished calls in index
order. Anyone can recompute it from the table::

    link(-1) = sha256("callindex-seal-v1\\n" + state_id)
    link(k)  = sha256(link(previous) + "\\n" + RFC 8785 JSON of the call)

where the call's JSON holds ``call_id``, ``call_index``, ``call_type``,
``status``, ``latency_ms`` (as Python's ``repr`` of the float, or null),
``created_at`` and ``completed_at`` (UTC, ISO 8601 with microseconds), and for
each of ``request``, ``response`` and ``error`` the SHA-256 of the payload as
stored (so an edit of a payload without its hash column changes the link) and
the recorded hash column.

Sealing is incremental: a state sealed up to index 9 and extended later is
sealed again from 10 on, chaining to the head at 9 (one ``call_seals`` row per
seal). A seal proves that the sealed calls are as they were when sealed: any
change, deletion, renumbering or insertion among them changes the chain. It
does not prove anything about calls made after the last seal, and it proves
nothing against someone who can rewrite both the calls and ``call_seals``
unless the heads were exported to a place they cannot write (``seal --json``,
then ``verify --seals --heads FILE``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import rfc8785

from callindex.database import Database, Statements
from callindex.errors import InvalidInputError

SCHEME: Final = "callindex-seal-v1"
_BATCH: Final = 5_000
_PAYLOADS: Final = ("request", "response", "error")


@dataclass(frozen=True)
class Seal:
    """One seal: the chain's head after the call at ``last_index``; ``calls``
    counts the calls it covers from the state's first."""

    state_id: str
    last_index: int
    head: str
    calls: int
    sealed_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def genesis(state_id: str) -> str:
    """The link before a state's first call."""
    return hashlib.sha256(f"{SCHEME}\n{state_id}".encode()).hexdigest()


def link(previous: str, call: Mapping[str, Any]) -> str:
    """The link after ``call`` (a row of the ``chained_calls`` query)."""
    fields: dict[str, Any] = {
        "call_id": call["call_id"],
        "call_index": int(call["call_index"]),
        "call_type": call["call_type"],
        "status": call["status"],
        "latency_ms": None if call["latency_ms"] is None else repr(float(call["latency_ms"])),
        "created_at": _utc(call["created_at"]),
        "completed_at": _utc(call["completed_at"]),
    }
    for name in _PAYLOADS:
        fields[name] = _stored_digest(call[name])
        fields[f"{name}_hash"] = call[f"{name}_hash"]
    encoded = rfc8785.dumps(fields)
    return hashlib.sha256(f"{previous}\n".encode() + encoded).hexdigest()


def _utc(value: Any) -> str | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:  # SQLite stores UTC without an offset
        moment = moment.replace(tzinfo=UTC)
    return str(moment.astimezone(UTC).isoformat(timespec="microseconds"))


def _stored_digest(value: Any) -> str | None:
    """SHA-256 of a payload as stored (SQLite hands a top-level number back as
    a number: its ``repr``)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return hashlib.sha256(text.encode()).hexdigest()


def _calls(statements: Statements, state_id: str, after_index: int) -> Iterator[Mapping[str, Any]]:
    while batch := statements.rows(
        "chained_calls", {"state_id": state_id, "after_index": after_index, "batch": _BATCH}
    ):
        yield from batch
        after_index = int(batch[-1]["call_index"])


def seal(
    db: Database, *, state_id: str | None = None, finished_before: datetime | None = None
) -> list[Seal]:
    """Seal every state whose calls are all finished and not all sealed yet
    (only ``state_id`` when given; only states whose last call finished before
    ``finished_before`` when given); one transaction per state."""
    parameters = {
        "state_id": state_id,
        "finished_before": None
        if finished_before is None
        else finished_before.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00:00"),
    }
    candidates = db.read(lambda statements: statements.rows("seal_candidates", parameters))
    sealed = []
    for candidate in candidates:
        made = db.run(functools.partial(_seal_state, state_id=str(candidate["state_id"])))
        if made is not None:
            sealed.append(made)
    return sealed


def _seal_state(statements: Statements, state_id: str) -> Seal | None:
    earlier = statements.rows("seals_of_state", {"state_id": state_id})
    head, last_index, count = genesis(state_id), -1, 0
    if earlier:
        head = str(earlier[-1]["head"])
        last_index, count = int(earlier[-1]["last_index"]), int(earlier[-1]["calls"])
    extended = False
    for call in _calls(statements, state_id, last_index):
        if call["status"] == "pending":
            break  # a call begun since the state was chosen: seal up to it
        head, last_index, count = link(head, call), int(call["call_index"]), count + 1
        extended = True
    if not extended:
        return None
    row = statements.rows(
        "insert_seal",
        {"state_id": state_id, "last_index": last_index, "head": head, "calls": count},
    )[0]
    return _seal(row)


def _seal(row: Mapping[str, Any]) -> Seal:
    return Seal(
        state_id=str(row["state_id"]),
        last_index=int(row["last_index"]),
        head=str(row["head"]),
        calls=int(row["calls"]),
        sealed_at=_utc(row["sealed_at"]),
    )


def verify_seals(statements: Statements, exported: Iterable[Seal] = ()) -> dict[str, Any]:
    """Recompute every sealed chain and compare it with the stored heads, and
    with ``exported`` heads (a file written by ``callindex seal --json``) when
    given: ``{"seals_checked": n, "seal_mismatches": [...]}``."""
    expected = {(s.state_id, s.last_index): s.head for s in exported}
    checked, problems = 0, []
    stored_keys: set[tuple[str, int]] = set()
    after = ""
    while batch := statements.rows("sealed_states", {"after_state_id": after, "batch": 500}):
        for row in batch:
            state_id = str(row["state_id"])
            state_seals = [
                _seal(r) for r in statements.rows("seals_of_state", {"state_id": state_id})
            ]
            stored_keys.update((s.state_id, s.last_index) for s in state_seals)
            checked += len(state_seals)
            problems.extend(_check_state(statements, state_seals, expected))
        after = str(batch[-1]["state_id"])
    for state_id, last_index in sorted(expected.keys() - stored_keys):
        problems.append(
            {
                "state_id": state_id,
                "last_index": last_index,
                "problem": "an exported seal is missing from call_seals",
            }
        )
    return {"seals_checked": checked, "seal_mismatches": problems}


def _check_state(
    statements: Statements, state_seals: list[Seal], expected: Mapping[tuple[str, int], str]
) -> list[dict[str, Any]]:
    state_id = state_seals[0].state_id
    boundaries = {s.last_index: s for s in state_seals}
    heads_at: dict[int, tuple[str, int]] = {}
    head, count = genesis(state_id), 0
    last = max(boundaries)
    for call in _calls(statements, state_id, -1):
        index = int(call["call_index"])
        if index > last:
            break
        head, count = link(head, call), count + 1
        heads_at[index] = (head, count)
    problems = []
    for sealed in state_seals:
        recomputed = heads_at.get(sealed.last_index)
        exported = expected.get((state_id, sealed.last_index))
        problem = None
        if recomputed is None:
            problem = f"no call at the sealed index {sealed.last_index}"
        elif recomputed != (sealed.head, sealed.calls):
            problem = "calls changed, deleted, reordered or inserted after sealing"
        elif exported is not None and exported != sealed.head:
            problem = "the stored head differs from the exported one"
        if problem is None and recomputed is not None and exported not in (None, recomputed[0]):
            problem = "calls differ from the exported head"
        if problem is not None:
            problems.append(
                {
                    "state_id": state_id,
                    "last_index": sealed.last_index,
                    "problem": problem,
                    "stored_head": sealed.head,
                    "recomputed_head": None if recomputed is None else recomputed[0],
                    **({"exported_head": exported} if exported is not None else {}),
                }
            )
    return problems


def read_heads(path: Path) -> list[Seal]:
    """Seals exported by ``callindex seal --json``: a JSON list, or one JSON
    list or object per line (several runs appended to one file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InvalidInputError(f"cannot read {str(path)!r}: {error.strerror}") from error
    items: list[Any] = []
    try:
        parsed = json.loads(text)
        items = parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidInputError(f"{str(path)!r} line {number} is not JSON") from error
            items.extend(parsed if isinstance(parsed, list) else [parsed])
    try:
        return [
            Seal(str(i["state_id"]), int(i["last_index"]), str(i["head"]), int(i["calls"]))
            for i in items
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInputError(
            f"{str(path)!r} does not hold seals (state_id, last_index, head, calls)"
        ) from error
