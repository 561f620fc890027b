"""What travels between the demo's processes: work items and worker events.

Workers pull :data:`WorkItem` tuples from one shared queue (``None`` tells a
worker to stop) and report the events below to the parent on another. All of
them are plain picklable values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

Kind: TypeAlias = Literal["http", "llm"]
WorkItem: TypeAlias = tuple[str, int]  # (state_id, n): the n-th call of a state


def kind_of(n: int) -> Kind:
    """Even calls of a state go through the HTTP client, odd ones through the LLM client."""
    return "http" if n % 2 == 0 else "llm"


def work_items(state_ids: Sequence[str], calls_per_state: int, workers: int) -> Iterator[WorkItem]:
    """Every ``(state_id, n)``, in waves of ``workers`` states; within a wave, in
    blocks of ``2 * workers`` consecutive calls of one state, the wave's states
    taking turns.

    All workers take calls of the same block at about the same time, so several
    processes, and both client types (n even and odd), work on one state at
    once, with a few states under way together; and a wave is finished before
    the next begins, so states are done all through the run, not all at its end.
    """
    block = 2 * workers
    for first in range(0, len(state_ids), workers):
        wave = state_ids[first : first + workers]
        for start in range(0, calls_per_state, block):
            for state_id in wave:
                for n in range(start, min(start + block, calls_per_state)):
                    yield state_id, n


@dataclass(frozen=True)
class Ready:
    """A worker is set up and waits for the others."""

    worker: int
    pid: int


@dataclass(frozen=True)
class Baseline:
    """Latencies (ms) of a worker's plain, unaudited calls, by kind, made when all
    workers had started: the yardstick of the added latency."""

    worker: int
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class AttemptStarted:
    """An HTTP request is about to go out (for callindex: its pending row is committed)."""

    worker: int
    state_id: str
    n: int
    kind: Kind
    attempt: int
    at: float  # time.monotonic(), comparable between processes on one machine


@dataclass(frozen=True)
class AttemptEnded:
    worker: int
    state_id: str
    ok: bool


@dataclass(frozen=True)
class ItemDone:
    """A logical call is finished: ``ok`` when its last attempt succeeded.

    ``latency_ms`` is set for a call that succeeded at its first attempt and was
    not slowed on purpose by the server, the calls the added latency is measured on.
    ``write_refused`` is the legacy replay's unique violation: the row was lost.
    """

    worker: int
    state_id: str
    n: int
    kind: Kind
    operation_id: str
    attempts: int
    ok: bool
    latency_ms: float | None
    write_refused: bool = False


@dataclass(frozen=True)
class ItemFailed:
    """Recording a call failed (a database error after callindex's own retries)."""

    worker: int
    state_id: str
    n: int
    message: str


@dataclass(frozen=True)
class Crashed:
    """The worker hit an unexpected error and stopped."""

    worker: int
    message: str


@dataclass(frozen=True)
class Finished:
    """The worker took the stop marker and is about to exit."""

    worker: int


Event: TypeAlias = (
    Ready | Baseline | AttemptStarted | AttemptEnded | ItemDone | ItemFailed | Crashed | Finished
)
