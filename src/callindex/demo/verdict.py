"""The demo's verdict: pure functions of what the trail holds and what the workers saw.

Nothing here touches a database, a process or a terminal, so every rule can be
tested with plain values: :meth:`Verdict.from_trail` takes the rows read back
from an audit table and the outcomes the workers reported, and says whether the
trail is complete and collision-free.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TrailRow:
    """One row of an audit table, reduced to what the checks need.

    ``operation_id`` and ``attempt`` say which logical call (and which attempt
    of it) the row records; a legacy row records only the last attempt.
    """

    state_id: str
    call_index: int
    call_type: str
    status: str
    operation_id: str | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class Outcome:
    """What a worker saw of one logical call it finished: how many attempts it
    took and whether the last one succeeded (``ok``: acknowledged to the caller)."""

    state_id: str
    operation_id: str
    attempts: int
    ok: bool


@dataclass(frozen=True)
class Gap:
    """Indices ``first..last`` of a state that no row holds, below its highest row.
    ``explanation`` is what ``verify`` says caused it; ``None`` when nothing does."""

    state_id: str
    first: int
    last: int
    explanation: str | None = None

    @property
    def size(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Verdict:
    """The numbers of one run and the invariants it broke (``failures``)."""

    logical_calls: int
    finished: int
    calls_recorded: int
    rows: int
    retries: int
    errors: int
    lost: int
    lost_acknowledged: int
    duplicates: int
    gaps: tuple[Gap, ...]
    abandoned: int
    pending: int
    killed_in_flight: int
    seconds: float
    added_latency_p50_ms: float | None
    added_latency_p99_ms: float | None
    verify_ok: bool | None
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def unexplained_gaps(self) -> tuple[Gap, ...]:
        return tuple(gap for gap in self.gaps if gap.explanation is None)

    @property
    def calls_per_second(self) -> float | None:
        return calls_per_second(self.finished, self.seconds)

    @classmethod
    def from_trail(
        cls,
        rows: Sequence[TrailRow],
        outcomes: Sequence[Outcome],
        *,
        logical_calls: int,
        seconds: float,
        explained_gaps: Sequence[tuple[str, int, int]] = (),
        gap_cause: str = "",
        verify_ok: bool | None = None,
        added_latency_ms: Sequence[float] = (),
        killed_in_flight: int = 0,
        problems: Sequence[str] = (),
    ) -> Verdict:
        """Check a trail.

        Fails on: a duplicate ``(state_id, call_index)``; a logical call a worker
        finished whose last attempt is not in the trail with the status the
        worker saw (a lost call; *acknowledged* when the worker saw it succeed);
        a gap in a state's indices that ``verify`` does not explain
        (``explained_gaps``: its ``(state_id, first, last)`` ranges, with
        ``gap_cause``); ``verify_ok`` false; and each of ``problems`` (what the
        orchestration noticed, such as a crashed worker). Abandoned and pending
        calls, retries and errors are reported, never failures.
        """
        duplicates = find_duplicates(rows)
        gaps = find_gaps(rows, explained_gaps, gap_cause)
        lost = lost_outcomes(rows, outcomes)
        lost_acknowledged = sum(1 for outcome in lost if outcome.ok)
        p50, p99 = percentile(added_latency_ms, 50), percentile(added_latency_ms, 99)
        failures = [*problems]
        if duplicates:
            failures.append(f"{duplicates} duplicate (state_id, call_index) rows")
        if lost:
            failures.append(
                f"{len(lost)} finished calls missing from the trail "
                f"({lost_acknowledged} of them acknowledged as successful)"
            )
        unexplained = [gap for gap in gaps if gap.explanation is None]
        if unexplained:
            missing = sum(gap.size for gap in unexplained)
            failures.append(f"{missing} missing indices that verify does not explain")
        if verify_ok is False:
            failures.append("verify FAILED")
        return cls(
            logical_calls=logical_calls,
            finished=len(outcomes),
            calls_recorded=count_logical_calls(rows),
            rows=len(rows),
            retries=sum(max(outcome.attempts - 1, 0) for outcome in outcomes),
            errors=sum(1 for outcome in outcomes if not outcome.ok),
            lost=len(lost),
            lost_acknowledged=lost_acknowledged,
            duplicates=duplicates,
            gaps=tuple(gaps),
            abandoned=sum(1 for row in rows if row.status == "abandoned"),
            pending=sum(1 for row in rows if row.status == "pending"),
            killed_in_flight=killed_in_flight,
            seconds=seconds,
            added_latency_p50_ms=p50,
            added_latency_p99_ms=p99,
            verify_ok=verify_ok,
            failures=tuple(failures),
        )


def calls_per_second(finished: int, seconds: float) -> float | None:
    """The throughput of ``finished`` calls in ``seconds``, from the first request
    to the last call finished; the live display and the verdict both use it."""
    return finished / seconds if seconds > 0 else None


def find_duplicates(rows: Iterable[TrailRow]) -> int:
    """How many rows repeat a ``(state_id, call_index)`` another row already holds."""
    copies = Counter((row.state_id, row.call_index) for row in rows)
    return sum(count - 1 for count in copies.values() if count > 1)


def find_gaps(
    rows: Iterable[TrailRow],
    explained: Sequence[tuple[str, int, int]] = (),
    cause: str = "",
) -> list[Gap]:
    """The runs of indices below each state's highest row that no row holds,
    explained when one of the ``explained`` ranges covers the whole run."""
    by_state: defaultdict[str, set[int]] = defaultdict(set)
    for row in rows:
        by_state[row.state_id].add(row.call_index)
    gaps: list[Gap] = []
    for state_id in sorted(by_state):
        expected = 0
        for index in sorted(by_state[state_id]):
            if index > expected:
                covered = any(
                    s == state_id and first <= expected and index - 1 <= last
                    for s, first, last in explained
                )
                gaps.append(Gap(state_id, expected, index - 1, cause if covered else None))
            expected = index + 1
    return gaps


def lost_outcomes(rows: Iterable[TrailRow], outcomes: Iterable[Outcome]) -> list[Outcome]:
    """The finished calls whose last attempt is not in the trail, in their state,
    with the status the worker saw (``success`` when ok, else ``error``)."""
    recorded = {
        (row.operation_id, row.attempt): row for row in rows if row.operation_id is not None
    }
    lost = []
    for outcome in outcomes:
        row = recorded.get((outcome.operation_id, outcome.attempts))
        status = "success" if outcome.ok else "error"
        if row is None or row.state_id != outcome.state_id or row.status != status:
            lost.append(outcome)
    return lost


def count_logical_calls(rows: Iterable[TrailRow]) -> int:
    """Distinct logical calls in the trail: one per operation, one per row without one."""
    operations: set[str] = set()
    anonymous = 0
    for row in rows:
        if row.operation_id is None:
            anonymous += 1
        else:
            operations.add(row.operation_id)
    return len(operations) + anonymous


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100); ``None`` without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(p / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def added_latency(
    samples: Iterable[tuple[str, float]], baselines: Mapping[str, Sequence[float]]
) -> list[float]:
    """Each audited call's latency minus the median latency of plain calls of
    the same kind (``http`` or ``llm``); kinds without a baseline are skipped."""
    medians = {kind: statistics.median(values) for kind, values in baselines.items() if values}
    return [latency - medians[kind] for kind, latency in samples if kind in medians]
