"""Following one phase of the demo from the parent process.

A :class:`PhaseMonitor` reads the workers' events, keeps the live counts the
progress line shows, and, for ``--kill-one``, holds one request at the loopback
server and SIGKILLs the worker waiting on it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from typing import TYPE_CHECKING, Final

from callindex.demo.events import (
    AttemptEnded,
    AttemptStarted,
    Baseline,
    Crashed,
    Event,
    Finished,
    ItemDone,
    ItemFailed,
    Kind,
    Ready,
)
from callindex.demo.verdict import Outcome, calls_per_second
from callindex.loopback import LoopbackAPI, Reply

if TYPE_CHECKING:
    from callindex.demo.render import PhaseProgress
    from callindex.demo.runner import DemoConfig
    from callindex.demo.workers import Flags

HOLD_SECONDS: Final = 10.0  # how long the server sits on the request of the worker to kill
STALL_SECONDS: Final = 120.0  # no event for this long: the workers are stopped


@dataclass
class PhaseResult:
    """What the parent saw of one run of the workload."""

    outcomes: list[Outcome]
    latency_samples: list[tuple[str, float]]
    baselines: dict[str, list[float]]
    killed: list[AttemptStarted]
    problems: list[str]
    seconds: float
    shared_states: int
    mixed_states: int
    server_stats: dict[str, int]
    refused_writes: int


class PhaseMonitor:
    """The parent's view of one phase, built from the workers' events."""

    def __init__(
        self,
        name: str,
        config: DemoConfig,
        processes: dict[int, SpawnProcess],
        api: LoopbackAPI,
        total: int,
        flags: Flags,
    ) -> None:
        self.name = name
        self.config = config
        self.processes = processes
        self.api = api
        self.total = total
        self.flags = flags
        self.started_at = time.monotonic()
        self.ready: dict[int, Ready] = {}
        self.baselines: dict[int, Baseline] = {}
        self.outcomes: list[Outcome] = []
        self.latency_samples: list[tuple[str, float]] = []
        self.problems: list[str] = []
        self.failed_items = 0
        self.errors = 0
        self.states_done = 0
        self.refused_writes = 0
        self.attempts = 0
        self.taken = 0
        self.in_flight: dict[int, AttemptStarted] = {}
        # The calls open (first attempt started, not yet done) per state: worker -> kind.
        self.by_state: dict[str, dict[int, Kind]] = {}
        self.finished_per_state: dict[str, int] = {}
        self.shared_states: set[str] = set()
        self.mixed_states: set[str] = set()
        self.killed: list[AttemptStarted] = []
        self.baseline_over_at: float | None = None
        self.kill_armed_at: float | None = None
        # Longer than an injected slow reply, so the held request is the one found.
        self.kill_after = max(0.5, config.faults.slow_seconds + 0.3)
        self.first_start: float | None = None
        self.last_done: float | None = None
        self.last_event = time.monotonic()

    # Counts for the progress line

    @property
    def done(self) -> int:
        return len(self.outcomes) + self.failed_items

    @property
    def retries(self) -> int:
        return self.attempts - self.taken

    @property
    def seconds(self) -> float:
        """From the first request to the last call finished: the verdict's clock."""
        if self.first_start is None or self.last_done is None:
            return 0.0
        return self.last_done - self.first_start

    @property
    def calls_per_second(self) -> float | None:
        """The verdict's throughput, so far: the same calls over the same clock."""
        return calls_per_second(len(self.outcomes), self.seconds)

    # Following the workers

    def follow(self, events: Queue[Event], progress: PhaseProgress) -> None:
        """Handle events until every worker has exited, updating ``progress``."""
        while True:
            self._handle_waiting(events)
            now = time.monotonic()
            self._maybe_start(now)
            if self.baseline_over_at is None and self.done >= self.total / 3:
                self.flags.baseline_over.set()
                self.baseline_over_at = now
            if self.config.kill_one:
                self._kill_one(now, progress)
            if now - self.last_event > STALL_SECONDS:
                self.problems.append(f"{self.name}: no progress for {STALL_SECONDS:.0f} s, stopped")
                self.last_event = now
                for process in self.processes.values():
                    if process.is_alive():
                        process.kill()
            progress.update(self)
            if not any(process.is_alive() for process in self.processes.values()):
                break
        self._drain(events)
        progress.update(self)
        self._check_exits()

    def _handle_waiting(self, events: Queue[Event]) -> None:
        """Handle the events that have arrived (waiting up to 0.1 s for the first), so
        that the in-flight requests the kill decision looks at are up to date."""
        with contextlib.suppress(queue.Empty):
            self.handle(events.get(timeout=0.1))
            for _ in range(10_000):
                self.handle(events.get_nowait())

    def _maybe_start(self, now: float) -> None:
        """Let the workers go together once all are ready (or some never will be)."""
        if self.flags.start.is_set():
            return
        everyone = len(self.ready) == len(self.processes)
        lost = any(p.pid is not None and not p.is_alive() for p in self.processes.values())
        if everyone or lost or now - self.started_at > STALL_SECONDS:
            self.flags.start.set()

    def handle(self, event: Event) -> None:
        self.last_event = time.monotonic()
        if isinstance(event, AttemptStarted):
            self._started(event)
        elif isinstance(event, AttemptEnded):
            self.in_flight.pop(event.worker, None)
        elif isinstance(event, ItemDone):
            self._item_done(event)
        elif isinstance(event, ItemFailed):
            self.failed_items += 1
            self.errors += 1
            self._finish_item(event.worker, event.state_id)
            self.problems.append(
                f"{event.state_id} call {event.n}: recording failed: {event.message}"
            )
        elif isinstance(event, Ready):
            self.ready[event.worker] = event
        elif isinstance(event, Baseline):
            self.baselines[event.worker] = event
        elif isinstance(event, Crashed):
            self.problems.append(f"{self.name} worker {event.worker} crashed: {event.message}")
        elif isinstance(event, Finished):
            pass

    def _started(self, event: AttemptStarted) -> None:
        self.attempts += 1
        if event.attempt == 1:
            self.taken += 1
        if self.first_start is None:
            self.first_start = event.at
        self.in_flight[event.worker] = event
        on_state = self.by_state.setdefault(event.state_id, {})
        on_state[event.worker] = event.kind
        if len(on_state) > 1:
            self.shared_states.add(event.state_id)
            if len(set(on_state.values())) > 1:
                self.mixed_states.add(event.state_id)

    def _item_done(self, event: ItemDone) -> None:
        self.outcomes.append(Outcome(event.state_id, event.operation_id, event.attempts, event.ok))
        self.errors += not event.ok
        if event.latency_ms is not None:
            self.latency_samples.append((event.kind, event.latency_ms))
        self.refused_writes += event.write_refused
        self.last_done = time.monotonic()
        self._finish_item(event.worker, event.state_id)

    def _finish_item(self, worker: int, state_id: str) -> None:
        finished = self.finished_per_state.get(state_id, 0) + 1
        self.finished_per_state[state_id] = finished
        self.states_done += finished == self.config.calls_per_state
        self.by_state.get(state_id, {}).pop(worker, None)

    def _kill_one(self, now: float, progress: PhaseProgress) -> None:
        """After a third of the work, have the server hold the next request, and
        SIGKILL the worker that sent it once it has waited long enough to be sure:
        longer than a slow reply, for a request sent after the hold was planned."""
        if self.killed:
            return
        if self.kill_armed_at is None:
            # Every worker has sent its baseline, so it makes no more plain calls:
            # the request held is an audited one.
            if (
                self.baseline_over_at is not None
                and len(self.baselines) == len(self.processes)
                and self.taken < self.total
            ):
                self.api.plan(Reply(delay=HOLD_SECONDS, drop=True))
                self.kill_armed_at = now
            return
        for worker, attempt in list(self.in_flight.items()):
            if attempt.at >= self.kill_armed_at - 0.1 and now - attempt.at >= self.kill_after:
                self._kill(worker, attempt, progress)
                return

    def _kill(self, worker: int, attempt: AttemptStarted, progress: PhaseProgress) -> None:
        process = self.processes[worker]
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=10)
        self.killed.append(attempt)
        self.in_flight.pop(worker)
        self._finish_item(worker, attempt.state_id)
        progress.note(
            f"{self.name}: killed worker {worker} (pid {process.pid}) with SIGKILL after "
            f"{self.done}/{self.total} calls, while {attempt.state_id} call {attempt.n} "
            f"({attempt.kind}, attempt {attempt.attempt}) was in flight"
        )

    def _drain(self, events: Queue[Event]) -> None:
        while True:
            try:
                self.handle(events.get(timeout=0.2))
            except queue.Empty:
                return

    def _check_exits(self) -> None:
        killed = {attempt.worker for attempt in self.killed}
        for worker, process in self.processes.items():
            if worker not in killed and process.exitcode not in (0, None):
                self.problems.append(
                    f"{self.name} worker {worker} exited with code {process.exitcode}"
                )
        if self.config.kill_one and not self.killed:
            self.problems.append(
                f"{self.name}: --kill-one found no call in flight to interrupt "
                "(the work ran out first: give it more states or calls)"
            )

    def result(self, server_stats: dict[str, int]) -> PhaseResult:
        baselines: dict[str, list[float]] = {}
        for baseline in self.baselines.values():
            for kind, values in baseline.samples.items():
                baselines.setdefault(kind, []).extend(values)
        return PhaseResult(
            outcomes=self.outcomes,
            latency_samples=self.latency_samples,
            baselines=baselines,
            killed=self.killed,
            problems=self.problems,
            seconds=self.seconds,
            shared_states=len(self.shared_states),
            mixed_states=len(self.mixed_states),
            server_stats=server_stats,
            refused_writes=self.refused_writes,
        )
