"""Running the demo: the database, the loopback API, the worker processes, the checks.

:func:`run_demo` is the whole demo; :func:`run_phase` runs the workload once
(callindex's run, or the legacy replay), followed by a
:class:`~callindex.demo.monitor.PhaseMonitor`.
"""

from __future__ import annotations

import multiprocessing
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Final

from rich.console import Console

from callindex.audit import GAP_CAUSE, Report
from callindex.demo import render
from callindex.demo.events import Event, WorkItem, work_items
from callindex.demo.interrupts import deferred_interrupt, sigint_blocked
from callindex.demo.legacy import LEGACY_TABLE, LegacyStore
from callindex.demo.monitor import PhaseMonitor, PhaseResult
from callindex.demo.verdict import TrailRow, Verdict, added_latency
from callindex.demo.workers import Flags, WorkerConfig, callindex_worker, legacy_worker
from callindex.errors import InvalidInputError
from callindex.loopback import Faults, LoopbackAPI
from callindex.recorder import CallRecorder
from callindex.retry import RetryPolicy
from callindex.urls import display_url, parse_url

DEMO_FILE: Final = "callindex-demo.db"
LEGACY_FILE: Final = "callindex-demo-legacy.db"
DEMO_RETRY: Final = RetryPolicy(initial_wait=0.01, max_wait=0.1, max_attempts=6, max_seconds=30)
STOP_GRACE_SECONDS: Final = 3.0
DEFAULT_FAULTS: Final = Faults(rate_429=0.08, rate_503=0.05, rate_slow=0.05, rate_drop=0.03)


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. ``url=None``: a fresh SQLite file :data:`DEMO_FILE` in ``folder``."""

    workers: int
    states: int = 40
    calls_per_state: int = 10
    faults: Faults = DEFAULT_FAULTS
    kill_one: bool = False
    legacy: bool = False
    url: str | None = None
    folder: Path = field(default_factory=Path.cwd)
    retry: RetryPolicy = DEMO_RETRY

    def __post_init__(self) -> None:
        for name in ("workers", "states", "calls_per_state"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be an integer >= 1, not {value!r}")
        if self.kill_one and self.workers < 2:
            raise InvalidInputError("kill_one needs at least 2 workers: the others finish the work")
        rates = (
            self.faults.rate_429,
            self.faults.rate_503,
            self.faults.rate_slow,
            self.faults.rate_drop,
        )
        if any(not 0 <= rate <= 1 for rate in rates) or sum(rates) > 1 + 1e-9:
            raise InvalidInputError("fault rates must be between 0 and 1, and add up to 1 at most")

    @property
    def total_calls(self) -> int:
        return self.states * self.calls_per_state


@dataclass(frozen=True)
class Side:
    """One column of the verdict table."""

    name: str
    verdict: Verdict
    phase: PhaseResult


def run_demo(config: DemoConfig, *, console: Console, progress_console: Console) -> int:
    """Run the demo, print the verdict; the exit code: 0 when callindex's trail holds."""
    started = time.monotonic()
    run_id = secrets.token_hex(4)
    state_ids = [
        f"demo-{run_id}/state-{i:0{len(str(config.states - 1))}d}" for i in range(config.states)
    ]
    prefix = f"demo-{run_id}/"
    url = config.url or _fresh_sqlite(config.folder / DEMO_FILE)
    render.header(console, config, display_url(parse_url(url)))
    sides: list[Side] = []
    with CallRecorder(url) as recorder:
        recorder.upgrade()
        for state_id in state_ids:
            recorder.open_state(state_id)
        phase = run_phase(
            "callindex", callindex_worker, url, "", state_ids, config, progress_console
        )
        # Only this run's states: on a shared --db, others' in-flight calls are theirs.
        swept = len(recorder.sweep(0, state_prefix=prefix))
        rows = _callindex_rows(recorder, state_ids)
        report = recorder.verify()
    sides.append(
        Side("callindex", _callindex_verdict(rows, phase, report, set(state_ids), config), phase)
    )
    if swept:
        progress_console.print(f"sweep: {swept} pending call(s) of dead workers marked abandoned")
    if config.legacy:
        sides.append(_legacy_side(config, state_ids, prefix, progress_console))
    render.verdicts(console, sides)
    console.print(f"finished in {time.monotonic() - started:.1f} s")
    return 0 if sides[0].verdict.ok else 1


def _fresh_sqlite(path: Path) -> str:
    """Delete ``path`` with its WAL and shared-memory files; its URL (absolute)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path.resolve()}"


def _callindex_rows(recorder: CallRecorder, state_ids: Sequence[str]) -> list[TrailRow]:
    rows = []
    for state_id in state_ids:
        for call in recorder.calls(state_id):
            request = call.request if isinstance(call.request, dict) else {}
            operation_id, attempt = request.get("operation_id"), request.get("attempt")
            rows.append(
                TrailRow(
                    call.state_id,
                    call.call_index,
                    call.call_type,
                    call.status,
                    str(operation_id) if operation_id is not None else None,
                    int(attempt) if isinstance(attempt, int) else None,
                )
            )
    return rows


def _callindex_verdict(
    rows: list[TrailRow], phase: PhaseResult, report: Report, ours: set[str], config: DemoConfig
) -> Verdict:
    """``verify`` covers the whole database; only this run's states count here."""
    duplicates = [d for d in report.duplicates if d["state_id"] in ours]
    behind = [c for c in report.counters_behind if c["state_id"] in ours]
    gaps = [
        (g["state_id"], int(g["first_missing"]), int(g["last_missing"]))
        for g in report.gaps
        if g["state_id"] in ours
    ]
    return Verdict.from_trail(
        rows,
        phase.outcomes,
        logical_calls=config.total_calls,
        seconds=phase.seconds,
        explained_gaps=gaps,
        gap_cause=GAP_CAUSE,
        verify_ok=not duplicates and not behind,
        added_latency_ms=added_latency(phase.latency_samples, phase.baselines),
        killed_in_flight=len(phase.killed),
        problems=phase.problems,
    )


def _legacy_side(
    config: DemoConfig, state_ids: Sequence[str], prefix: str, progress_console: Console
) -> Side:
    url = config.url or _fresh_sqlite(config.folder / LEGACY_FILE)
    store = LegacyStore(url, LEGACY_TABLE)
    engine = store.engine()
    try:
        store.create(engine)
        phase = run_phase(
            "legacy", legacy_worker, url, LEGACY_TABLE, state_ids, config, progress_console
        )
        rows = store.rows(engine, prefix)
    finally:
        engine.dispose()
    verdict = Verdict.from_trail(
        rows,
        phase.outcomes,
        logical_calls=config.total_calls,
        seconds=phase.seconds,
        added_latency_ms=added_latency(phase.latency_samples, phase.baselines),
        killed_in_flight=len(phase.killed),
        problems=phase.problems,
    )
    return Side("legacy", verdict, phase)


def run_phase(
    name: str,
    target: Callable[[WorkerConfig, Any, Any, Flags], None],
    url: str,
    legacy_table: str,
    state_ids: Sequence[str],
    config: DemoConfig,
    progress_console: Console,
) -> PhaseResult:
    """Run the whole workload once through ``config.workers`` spawned processes
    running ``target``, against a loopback API of its own with ``config.faults``.

    Interrupted (Ctrl-C), it stops the workers and the server before the
    ``KeyboardInterrupt`` goes on."""
    context = multiprocessing.get_context("spawn")
    work: Queue[WorkItem | None] = context.Queue()
    events: Queue[Event] = context.Queue()
    flags = Flags(start=context.Event(), baseline_over=context.Event(), stop=context.Event())
    items = list(work_items(state_ids, config.calls_per_state, config.workers))
    slow_ms = config.faults.slow_seconds * 1000 / 2 if config.faults.rate_slow else float("inf")
    with LoopbackAPI(config.faults) as api:
        for item in items:
            work.put(item)
        for _ in range(config.workers):
            work.put(None)
        processes = {
            worker: context.Process(
                target=target,
                args=(
                    WorkerConfig(worker, url, api.url, config.retry, slow_ms, legacy_table),
                    work,
                    events,
                    flags,
                ),
                name=f"callindex-demo-{name}-{worker}",
                daemon=True,
            )
            for worker in range(1, config.workers + 1)
        }
        monitor = PhaseMonitor(name, config, processes, api, len(items), flags)
        try:
            _start(processes.values())
            with render.PhaseProgress(progress_console, name, config) as progress:
                monitor.follow(events, progress)
        finally:
            with deferred_interrupt():
                _stop(processes.values(), flags)
                work.cancel_join_thread()
                work.close()
                events.close()
        return monitor.result(dict(api.stats))


def _start(processes: Iterable[SpawnProcess]) -> None:
    """Start the workers, with SIGINT blocked in them from their first instruction
    (a Ctrl-C reaches the parent alone), and held off in the parent until all have
    started (none is left half started)."""
    with deferred_interrupt(), sigint_blocked():
        for process in processes:
            process.start()


def _stop(processes: Iterable[SpawnProcess], flags: Flags) -> None:
    """End the workers: at once when they are done; when interrupted, let them
    finish the call in hand first (so no reply is cut off), then kill the rest."""
    started = [process for process in processes if process.pid is not None]
    flags.stop.set()
    flags.start.set()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in started:
        process.join(timeout=max(deadline - time.monotonic(), 0))
    for process in started:
        if process.is_alive():
            process.kill()
            process.join(timeout=10)
