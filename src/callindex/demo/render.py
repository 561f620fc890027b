"""What the demo shows: the header, the live progress of each phase, the verdict table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from callindex.audit import GAP_CAUSE
from callindex.demo.verdict import Verdict

if TYPE_CHECKING:
    from callindex.demo.monitor import PhaseMonitor
    from callindex.demo.runner import DemoConfig, Side


LATENCY_NOTE: Final = (
    "added latency: each attempt of an audited call costs two durable database writes, "
    "begin (the pending call) and finish (its outcome)"
)


def header(console: Console, config: DemoConfig, database: str) -> None:
    faults = config.faults
    console.print(
        f"[bold]callindex demo[/]: {config.workers} worker processes, {config.states} states "
        f"x {config.calls_per_state} calls (even calls HTTP, odd calls LLM), "
        f"database {escape(database)}"
    )
    console.print(
        f"loopback API faults: 429 {faults.rate_429:.0%} · 503 {faults.rate_503:.0%} · "
        f"slow {faults.rate_slow:.0%} · dropped {faults.rate_drop:.0%} (seed {faults.seed}); "
        f"retries up to {config.retry.max_attempts} attempts"
        + ("; one worker will be killed mid-call" if config.kill_one else "")
    )


class PhaseProgress:
    """A live progress line for one phase: calls done, states done, retries,
    errors, calls/s. Printed once at the end when the console is not a terminal."""

    def __init__(self, console: Console, name: str, config: DemoConfig) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("calls · {task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=8,
        )
        self._task: TaskID = self._progress.add_task(
            name, total=config.total_calls, detail="starting workers"
        )
        self._states = config.states

    def __enter__(self) -> PhaseProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        if interrupted and not self._progress.console.is_terminal:
            # Where nothing was shown live (a log, a pipe), Ctrl-C adds no last
            # progress line, nor the blank line after it: only "interrupted".
            self._progress.live.transient = True
            self._progress.live.stop()
        else:
            self._progress.stop()

    def update(self, monitor: PhaseMonitor) -> None:
        detail = progress_detail(monitor, self._states)
        self._progress.update(self._task, completed=monitor.done, detail=detail)

    def note(self, message: str) -> None:
        self._progress.console.print(escape(message))


def progress_detail(monitor: PhaseMonitor, states: int) -> str:
    """The progress line after the calls done: states done, retries, errors, rate."""
    killed = f" · killed {len(monitor.killed)}" if monitor.killed else ""
    return (
        f"states {monitor.states_done}/{states} · retries {monitor.retries} · "
        f"errors {monitor.errors}{killed} · {rate(monitor.calls_per_second)}"
    )


def verdicts(console: Console, sides: Sequence[Side]) -> None:
    """The verdict table, one column per side, then what failed and why."""
    table = Table(title="verdict", title_justify="left")
    table.add_column("")
    for side in sides:
        table.add_column(side.name, justify="right")
    for label, cell in _ROWS:
        table.add_row(label, *(cell(side) for side in sides))
    console.print(table)
    console.print(LATENCY_NOTE)
    for side in sides:
        verdict = side.verdict
        gaps = verdict.gaps
        if gaps:
            shown = ", ".join(f"{g.state_id} {g.first}..{g.last}" for g in gaps[:5])
            more = f" and {len(gaps) - 5} more" if len(gaps) > 5 else ""
            console.print(escape(f"{side.name} gaps: {shown}{more}"))
            explained = [g for g in gaps if g.explanation]
            if explained:
                console.print(f"  explained by verify: {GAP_CAUSE}")
        for failure in verdict.failures:
            console.print(f"[red]{escape(side.name)}: {escape(failure)}[/]")
    if len(sides) > 1:
        console.print(
            "legacy: each process counts indices in a dict under a lock, seeded once per state "
            "from SELECT MAX(call_index); a write refused by UNIQUE(state_id, call_index) "
            "is a lost call. Expected to fail."
        )
    first = sides[0].verdict
    console.print(
        f"callindex: {'[green]PASS[/]' if first.ok else '[red]FAIL[/]'}: "
        + (
            "every call recorded once, no duplicate, no unexplained gap"
            if first.ok
            else "an invariant failed (see above)"
        )
    )


def _num(value: int, bad: bool = False) -> str:
    return f"[red]{value}[/]" if bad and value else str(value)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _gaps(verdict: Verdict) -> str:
    if not verdict.gaps:
        return "0"
    unexplained = sum(g.size for g in verdict.unexplained_gaps)
    explained = sum(g.size for g in verdict.gaps) - unexplained
    parts = [f"[red]{unexplained} unexplained[/]"] if unexplained else []
    return ", ".join([*parts, f"{explained} explained"] if explained else parts)


def _abandoned(side: Side) -> str:
    verdict = side.verdict
    text = str(verdict.abandoned)
    if verdict.pending:
        text += f" (+{verdict.pending} pending)"
    if verdict.killed_in_flight and side.name != "callindex":
        text += f" ({verdict.killed_in_flight} killed mid-call, no trace)"
    return text


def _faults(side: Side) -> str:
    stats = side.phase.server_stats
    return f"{stats.get('429', 0)}x429 {stats.get('503', 0)}x503 {stats.get('dropped', 0)} dropped"


def _latency(side: Side) -> str:
    verdict = side.verdict
    if verdict.added_latency_p50_ms is None:
        return "n/a (no clean first attempt)"
    return f"{_ms(verdict.added_latency_p50_ms)} / {_ms(verdict.added_latency_p99_ms)} ms"


def rate(calls_per_second: float | None) -> str:
    """A throughput as the progress line and the verdict both show it."""
    return "- calls/s" if calls_per_second is None else f"{calls_per_second:.1f} calls/s"


def _throughput(side: Side) -> str:
    return rate(side.verdict.calls_per_second)


def _together(side: Side) -> str:
    phase = side.phase
    return f"{phase.shared_states} (both clients: {phase.mixed_states})"


def _verify(side: Side) -> str:
    ok = side.verdict.verify_ok
    return "—" if ok is None else "[green]ok[/]" if ok else "[red]FAILED[/]"


def _result(side: Side) -> str:
    return "[green]PASS[/]" if side.verdict.ok else "[red]FAIL[/]"


_ROWS: list[tuple[str, Callable[[Side], str]]] = [
    ("logical calls (work items)", lambda s: str(s.verdict.logical_calls)),
    ("calls recorded", lambda s: str(s.verdict.calls_recorded)),
    ("attempts (rows)", lambda s: str(s.verdict.rows)),
    ("retries", lambda s: str(s.verdict.retries)),
    ("errors (retries ran out)", lambda s: str(s.verdict.errors)),
    ("lost calls", lambda s: _num(s.verdict.lost, bad=True)),
    ("duplicates", lambda s: _num(s.verdict.duplicates, bad=True)),
    ("gaps", lambda s: _gaps(s.verdict)),
    ("abandoned calls", _abandoned),
    ("states worked by 2+ processes at once", _together),
    ("faults injected", _faults),
    ("throughput", _throughput),
    ("added latency p50 / p99", _latency),
    ("verify", _verify),
    ("verdict", _result),
]
