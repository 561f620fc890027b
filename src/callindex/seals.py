"""Sealed states: tamper evidence an owner cannot undo.

A seal is the head of a SHA-256 chain over a state's finished calls in index
order. Anyone can recompute it from the table::

    link(-1) = sha256("callindex-seal-v1\\n" + state_id)
    link(k)  = sha256(link(previous) + "\\n" + RFC 8785 JSON of the call)

where the call's JSON holds ``call_id``, ``call_index`` (the stored value:
an integer, or whatever else a tamperer stored), ``call_type``, ``status``,
``latency_ms`` (Python's ``repr`` of the float, or null), ``created_at`` and
``completed_at`` (normalised to UTC, ISO 8601 with microseconds: the same
instant written differently is the same link; a value that is not a time is
taken as its ``repr``), ``recorded_by``, ``hash_scheme``, and for each of
``request``, ``response`` and ``error`` the SHA-256 of the payload as stored
(its text; SQLite hands a top-level number back as a number, taken as its
``repr``), so an edit of a payload without its hash column changes the link,
and the recorded hash column. Other columns of an adopted table (a legacy
``request_ref``, say) are not covered.

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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    index = call["call_index"]
    fields: dict[str, Any] = {
        "call_id": call["call_id"],
        "call_index": index if isinstance(index, int) else repr(index),
        "call_type": call["call_type"],
        "status": call["status"],
        "latency_ms": _number(call["latency_ms"]),
        "created_at": _utc(call["created_at"]),
        "completed_at": _utc(call["completed_at"]),
        "recorded_by": call["recorded_by"],
        "hash_scheme": call["hash_scheme"],
    }
    for name in _PAYLOADS:
        fields[name] = _stored_digest(call[name])
        fields[f"{name}_hash"] = call[f"{name}_hash"]
    encoded = rfc8785.dumps(fields)
    return hashlib.sha256(f"{previous}\n".encode() + encoded).hexdigest()


def _number(value: Any) -> str | None:
    if value is None:
        return None
    return repr(float(value)) if isinstance(value, int | float) else repr(value)


def _utc(value: Any) -> str | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        if moment.tzinfo is None:  # SQLite stores UTC without an offset
            moment = moment.replace(tzinfo=UTC)
        return str(moment.astimezone(UTC).isoformat(timespec="microseconds"))
    except (TypeError, ValueError, AttributeError):
        return repr(value)  # not a time: a link of its own, never a crash


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


@dataclass(frozen=True)
class Link:
    """The chain after one step: a call, or a purged range of a sealed state."""

    index: int
    """The call's index, or the purged range's last index."""
    head: str
    calls: int
    purged_from: int | None = None
    """The purged range's first index (``None``: a call)."""
    call: Mapping[str, Any] | None = None


def walk(statements: Statements, state_id: str, *, after: Link | None = None) -> Iterator[Link]:
    """The state's chain, step by step in index order, from ``after`` (default:
    the genesis). A purged range that carries a head (it was sealed when
    purged) stands for its calls: the chain goes on from its head. One
    without (purged before the state was first sealed) was never chained."""
    head, count = (after.head, after.calls) if after else (genesis(state_id), 0)
    start = after.index if after else -1
    purged = deque(
        row
        for row in statements.rows("purges_of_state", {"state_id": state_id})
        if row["head"] is not None and int(row["last_index"]) > start
    )
    for call in _calls(statements, state_id, start):
        index = call["call_index"]
        while purged and isinstance(index, int) and int(purged[0]["first_index"]) < index:
            step = _purged_step(purged.popleft(), count)
            count = step.calls
            yield step
            head = step.head
        head, count = link(head, call), count + 1
        yield Link(index=index, head=head, calls=count, call=call)
    for row in purged:
        step = _purged_step(row, count)
        count = step.calls
        yield step


def _purged_step(row: Mapping[str, Any], count: int) -> Link:
    return Link(
        index=int(row["last_index"]),
        head=str(row["head"]),
        calls=count + int(row["calls"]),
        purged_from=int(row["first_index"]),
    )


def seal(
    db: Database,
    *,
    state_id: str | None = None,
    finished_before: datetime | None = None,
    on_sealed: Callable[[Seal], None] | None = None,
) -> list[Seal]:
    """Seal every state whose calls are all finished and not all sealed yet
    (only ``state_id`` when given; only states whose last call finished before
    ``finished_before`` when given). Each state's chain is computed in a read
    transaction and its seal written in a short one; ``on_sealed`` hears of
    each seal as it commits."""
    parameters = {
        "state_id": state_id,
        "finished_before": None
        if finished_before is None
        else finished_before.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00:00"),
    }
    candidates = db.read(lambda statements: statements.rows("seal_candidates", parameters))
    sealed = []
    for candidate in candidates:
        chained = db.read(functools.partial(_chain, state_id=str(candidate["state_id"])))
        if chained is None:
            continue
        made = db.run(functools.partial(_store, chained=chained))
        if made is not None:
            sealed.append(made)
            if on_sealed is not None:
                on_sealed(made)
    return sealed


@dataclass(frozen=True)
class _Chained:
    state_id: str
    after_index: int  # the last seal's index (-1: none), which the chain extends
    seal: Seal


def _chain(statements: Statements, state_id: str) -> _Chained | None:
    """The state's chain extended over its finished calls after its last seal
    (up to the first pending one), or None when there is nothing to seal."""
    earlier = statements.rows("seals_of_state", {"state_id": state_id})
    after = None
    if earlier:
        last = _seal(earlier[-1])
        after = Link(index=last.last_index, head=last.head, calls=last.calls)
    end: Link | None = None
    for step in walk(statements, state_id, after=after):
        if step.call is not None and step.call["status"] == "pending":
            break  # a call begun since the state was chosen: seal up to it
        end = step
    if end is None:
        return None
    after_index = after.index if after else -1
    return _Chained(state_id, after_index, Seal(state_id, end.index, end.head, end.calls))


def _store(statements: Statements, chained: _Chained) -> Seal | None:
    """Write the seal unless the state changed under the chain: another seal
    since, or a call recorded into a reserved index below the sealed one."""
    state_id, new = chained.state_id, chained.seal
    statements.rows("lock_calls")
    statements.rows("lock_counter", {"state_id": state_id})
    latest = statements.rows("seals_of_state", {"state_id": state_id})
    if (int(latest[-1]["last_index"]) if latest else -1) != chained.after_index:
        return None  # sealed concurrently: the next run extends that seal
    counted = statements.rows("calls_through", {"state_id": state_id, "last_index": new.last_index})
    if int(counted[0]["calls"]) != new.calls:
        return None  # a call landed below the sealed index meanwhile: the next run
    rows = statements.rows(
        "insert_seal",
        {"state_id": state_id, "last_index": new.last_index, "head": new.head, "calls": new.calls},
    )
    return _seal(rows[0]) if rows else None


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
    purged: list[range] = []
    last = max(boundaries)
    for step in walk(statements, state_id):
        if (step.index if step.purged_from is None else step.purged_from) > last:
            break
        if step.purged_from is not None:
            purged.append(range(step.purged_from, step.index + 1))
        if step.index in boundaries:
            heads_at[step.index] = (step.head, step.calls)
    problems = []
    for sealed in state_seals:
        recomputed = heads_at.get(sealed.last_index)
        if recomputed is None and any(sealed.last_index in span for span in purged):
            continue  # its calls are purged: the purge's head carries the chain on
        exported = expected.get((state_id, sealed.last_index))
        problem = None
        if recomputed is None:
            problem = f"no call at the sealed index {sealed.last_index}"
        elif recomputed != (sealed.head, sealed.calls):
            problem = "calls changed, deleted, reordered or inserted after sealing"
        elif exported is not None and exported != sealed.head:
            problem = "the stored head differs from the exported one"
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
