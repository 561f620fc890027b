"""callindex benchmark: every strategy side by side, in one run, on one database.

``callindex bench`` declares and validates the options and calls :func:`run`
here with them; ``python bench/run.py ARGS`` is ``callindex bench ARGS``. For
each strategy, number of worker processes and mode (``hot``: all workers on
one state; ``distinct``: one state each) it keeps the median throughput of
``repeats`` runs. The repeats alternate: every combination runs once before
any runs again, so a noisy moment of a shared machine is spread over all
strategies. Every run's indices are checked: no duplicate (state, index), and
for callindex exactly 0..N-1 per state. Each worker also measures its client
CPU time (``time.process_time``). The report holds the ratios the performance
targets are stated in, and measures the audited HTTP client against plain
httpx and a worker's memory over many distinct states.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import make_url
from strategies import STRATEGIES, Job, prepare, setup_django

from callindex import AuditedHTTPClient, CallRecorder
from callindex.loopback import LoopbackAPI

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.table import Table

SPAWN = multiprocessing.get_context("spawn")
CALLINDEX = frozenset(
    {
        "allocate",
        "allocate_100",
        "record_call",
        "record_call_early",
        "record_call_plain",
        "begin_finish",
    }
)
BLOCKS = {"allocate_100": 100, "raw_update_100": 100}


@dataclass
class Measurement:
    strategy: str
    mode: str
    workers: int
    runs: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    retries: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def median_cpu_us(self) -> float:
        """Median client CPU time per operation, in microseconds."""
        return statistics.median(self.cpu_us)


def _worker_main(tasks: Any, results: Any, ready: Any, go: Any) -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        job = Job(**task)
        job.ready = ready.release
        job.go = go.wait
        try:
            got = STRATEGIES[job.strategy](job)
            results.put(
                {
                    "ok": True,
                    "indices": got,
                    "started": job.started,
                    "finished": job.finished,
                    "cpu_seconds": job.cpu_seconds,
                    "retries": job.retries,
                }
            )
        except Exception as error:  # reported, and the run fails
            ready.release()
            results.put({"ok": False, "error": f"{type(error).__name__}: {error}"})


class Pool:
    """Worker processes kept for the whole benchmark; a run releases them together."""

    def __init__(self, size: int) -> None:
        self.tasks = [SPAWN.Queue() for _ in range(size)]
        self.results = SPAWN.Queue()
        self.ready = SPAWN.Semaphore(0)
        self.go = SPAWN.Event()
        self.processes = [
            SPAWN.Process(target=_worker_main, args=(t, self.results, self.ready, self.go))
            for t in self.tasks
        ]
        for process in self.processes:
            process.start()

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.go.clear()
        for tasks, job in zip(self.tasks, jobs, strict=False):
            tasks.put(job)
        for _ in jobs:
            self.ready.acquire(timeout=300)
        self.go.set()
        outcomes = [self.results.get(timeout=900) for _ in jobs]
        failed = [o["error"] for o in outcomes if not o["ok"]]
        if failed:
            raise RuntimeError(f"a benchmark worker failed: {failed[0]}")
        return outcomes

    def close(self) -> None:
        for tasks in self.tasks:
            tasks.put(None)
        for process in self.processes:
            process.join(timeout=30)


def check_indices(strategy: str, outcomes: list[dict[str, Any]]) -> None:
    """No strategy may hand out an index twice; callindex's are exactly 0..N-1."""
    pairs = [tuple(p) for o in outcomes for p in o["indices"]]
    duplicates = [p for p, n in Counter(pairs).items() if n > 1]
    if duplicates:
        raise AssertionError(f"{strategy}: duplicate indices {duplicates[:5]}")
    if strategy in CALLINDEX:
        per_state: dict[str, list[int]] = {}
        for state_id, index in pairs:
            per_state.setdefault(state_id, []).append(index)
        for state_id, indices in per_state.items():
            if sorted(indices) != list(range(len(indices))):
                raise AssertionError(f"{strategy}: {state_id} is not exactly 0..N-1")


def measure_once(pool: Pool, url: str, measurement: Measurement, operations: int) -> None:
    """One run of one combination, added to ``measurement``."""
    strategy, mode, workers = measurement.strategy, measurement.mode, measurement.workers
    run_id = uuid.uuid4().hex[:10]
    jobs = [
        asdict(
            Job(
                url=url,
                strategy=strategy,
                operations=operations,
                worker=w,
                workers=workers,
                state_id=f"b-{run_id}-hot" if mode == "hot" else f"b-{run_id}-{w}",
            )
        )
        for w in range(workers)
    ]
    for job in jobs:
        for local in ("ready", "go", "started", "finished", "cpu_seconds", "retries", "closers"):
            del job[local]
    prepare(url, strategy, {j["state_id"] for j in jobs})
    outcomes = pool.run(jobs)
    check_indices(strategy, outcomes)
    elapsed = max(o["finished"] for o in outcomes) - min(o["started"] for o in outcomes)
    measurement.runs.append(workers * operations * BLOCKS.get(strategy, 1) / elapsed)
    cpu = sum(o["cpu_seconds"] for o in outcomes)
    measurement.cpu_us.append(cpu / (workers * operations) * 1e6)
    measurement.retries += sum(o["retries"] for o in outcomes)


def http_overhead(url: str, calls: int = 200) -> dict[str, float]:
    """Median milliseconds per GET on the loopback server, plain httpx vs audited."""
    import httpx

    with LoopbackAPI() as api, CallRecorder(url) as recorder:
        state_id = f"b-http-{uuid.uuid4().hex[:8]}"
        recorder.open_state(state_id)
        timings: dict[str, list[float]] = {"plain": [], "audited": []}
        with (
            httpx.Client(base_url=api.url) as plain,
            AuditedHTTPClient(recorder, state_id, base_url=api.url, retry=None) as audited,
        ):
            for client in (plain, audited):
                client.get("/items/0")  # connect outside the timing
            for n in range(calls):
                for name, client in (("plain", plain), ("audited", audited)):
                    started = time.perf_counter()
                    client.get(f"/items/{n}").raise_for_status()
                    timings[name].append((time.perf_counter() - started) * 1000)
    plain_ms = statistics.median(timings["plain"])
    audited_ms = statistics.median(timings["audited"])
    return {"plain_ms": plain_ms, "audited_ms": audited_ms, "added_ms": audited_ms - plain_ms}


def _memory_worker(url: str, states: list[int], prefix: str, results: Any) -> None:
    with CallRecorder(url) as recorder:
        peaks = {}
        done = 0
        for target in states:
            for n in range(done, target):
                recorder.record_call(f"{prefix}-{n}", "http", "success", {"n": n})
            done = target
            peaks[target] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results.put(peaks)


def memory_growth(url: str, states: int) -> dict[str, float]:
    """Peak RSS (MiB) of one worker after recording calls for 1,000 and for
    ``states`` distinct states; flat means nothing grows with the states seen."""
    prefix = f"m-{uuid.uuid4().hex[:8]}"
    with CallRecorder(url) as recorder, recorder.engine.begin() as conn:
        from sqlalchemy import text

        values = ", ".join(f"('{prefix}-{n}')" for n in range(states))
        conn.execute(text(f"INSERT INTO call_index_counters (state_id) VALUES {values}"))
    results = SPAWN.Queue()
    process = SPAWN.Process(target=_memory_worker, args=(url, [1000, states], prefix, results))
    process.start()
    peaks = results.get(timeout=3600)
    process.join()
    return {
        "states": states,
        "peak_mib_at_1000": peaks[1000],
        f"peak_mib_at_{states}": peaks[states],
        "growth_mib": peaks[states] - peaks[1000],
    }


Key = tuple[str, str, int]


def targets(backend: str, workers: list[int]) -> list[tuple[str, Key, Key, float]]:
    """Each performance target as (label, measured, compared with, lowest ratio)."""
    few, most = min(workers), max(workers)
    if backend == "postgresql":
        rows = [
            ("record_call / bare insert", ("record_call", "distinct", few),
             ("bare_insert", "distinct", few), 0.8),
            ("record_call / bare insert", ("record_call", "distinct", most),
             ("bare_insert", "distinct", most), 0.8),
            ("record_call hot / bare insert distinct", ("record_call", "hot", most),
             ("bare_insert", "distinct", most), 0.7),
            ("record_call, never early release, hot / bare insert distinct",
             ("record_call_plain", "hot", most), ("bare_insert", "distinct", most), 0.7),
            ("record_call, always early release, hot / bare insert distinct",
             ("record_call_early", "hot", most), ("bare_insert", "distinct", most), 0.7),
            ("begin+finish / insert+update", ("begin_finish", "distinct", few),
             ("bare_insert_update", "distinct", few), 0.8),
            ("begin+finish / insert+update", ("begin_finish", "distinct", most),
             ("bare_insert_update", "distinct", most), 0.8),
            ("allocate / raw UPDATE", ("allocate", "distinct", few),
             ("raw_update", "distinct", few), 0.9),
            ("allocate / raw UPDATE", ("allocate", "distinct", most),
             ("raw_update", "distinct", most), 0.9),
            ("allocate / raw UPDATE, hot", ("allocate", "hot", most),
             ("raw_update", "hot", most), 0.9),
            ("allocate count=100 / raw UPDATE +100", ("allocate_100", "distinct", few),
             ("raw_update_100", "distinct", few), 0.9),
            ("allocate count=100 / raw UPDATE +100", ("allocate_100", "distinct", most),
             ("raw_update_100", "distinct", most), 0.9),
            ("allocate / django-sequences, hot", ("allocate", "hot", most),
             ("django_sequences", "hot", most), 2.0),
            ("allocate / max+1 with retry, hot", ("allocate", "hot", most),
             ("max_plus_one", "hot", most), 5.0),
        ]  # fmt: skip
    else:
        rows = [
            ("record_call / bare insert", ("record_call", "distinct", few),
             ("bare_insert", "distinct", few), 0.85),
            ("record_call / bare insert", ("record_call", "distinct", most),
             ("bare_insert", "distinct", most), 0.85),
            ("record_call / bare insert, hot", ("record_call", "hot", most),
             ("bare_insert", "hot", most), 0.85),
            ("begin+finish / insert+update", ("begin_finish", "distinct", few),
             ("bare_insert_update", "distinct", few), 0.8),
            ("allocate / raw UPDATE", ("allocate", "distinct", few),
             ("raw_update", "distinct", few), 0.9),
        ]  # fmt: skip
    return rows


def ratios(measurements: list[Measurement], backend: str) -> list[dict[str, Any]]:
    """The performance targets, each as measured ratio against its threshold."""
    table = {(m.strategy, m.mode, m.workers): m for m in measurements}
    workers = sorted({m.workers for m in measurements})
    rows = []
    for label, a, b, target in targets(backend, workers):
        value = table[a].median / table[b].median if a in table and b in table else None
        rows.append(_row(f"{label}, {a[2]}w {a[1]}", value, target, at_least=True))
    for count in workers:
        a, b = ("record_call", "distinct", count), ("bare_insert", "distinct", count)
        value = (
            table[a].median_cpu_us / table[b].median_cpu_us if a in table and b in table else None
        )
        rows.append(
            _row(f"client CPU record_call / bare insert, {count}w", value, 2.0, at_least=False)
        )
    return rows


def _row(label: str, value: float | None, target: float, *, at_least: bool) -> dict[str, Any]:
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"ratio": label, "value": value, "target": target, "at_least": at_least, "met": met}


def trigger_cost(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """What the numbering trigger adds to one insert: legacy_insert (into calls)
    against bare_insert (the same insert into a copy without the trigger),
    per mode and worker count, in microseconds of wall time per insert."""
    table = {(m.strategy, m.mode, m.workers): m.median for m in measurements}
    rows = []
    for (strategy, mode, workers), with_trigger in sorted(table.items()):
        without = table.get(("bare_insert", mode, workers))
        if strategy != "legacy_insert" or not without:
            continue
        rows.append(
            {
                "mode": mode,
                "workers": workers,
                "plain_per_s": without,
                "with_trigger_per_s": with_trigger,
                "ratio": with_trigger / without,
                "added_us_per_insert": (workers / with_trigger - workers / without) * 1e6,
            }
        )
    return rows


@dataclass(frozen=True)
class Options:
    """One benchmark, as ``callindex bench`` validated it (its options are declared there)."""

    url: str
    workers: tuple[int, ...]
    modes: tuple[str, ...]
    strategies: tuple[str, ...]
    operations: int
    repeats: int
    memory_states: int
    http_calls: int
    log: Callable[[str], None]


def run(options: Options) -> dict[str, Any]:
    """Measure every combination of ``options`` and return the report."""
    url = options.url
    backend = make_url(url).get_backend_name()
    with CallRecorder(url) as recorder:
        recorder.upgrade()
    if "django_sequences" in options.strategies:
        migrate_django_sequences(url)
    measurements = measure(options)
    report: dict[str, Any] = {
        "database": backend,
        "operations_per_worker": options.operations,
        "repeats": options.repeats,
        "measurements": [
            asdict(m) | {"median": m.median, "median_cpu_us": m.median_cpu_us} for m in measurements
        ],
        "ratios": ratios(measurements, backend),
        "trigger_cost": trigger_cost(measurements),
    }
    if options.http_calls:
        report["http"] = http_overhead(url, options.http_calls)
        report["ratios"].append(
            _row("audited GET: added ms over plain httpx (p50)", report["http"]["added_ms"],
                 1.0, at_least=False)
        )  # fmt: skip
    if options.memory_states:
        report["memory"] = memory_growth(url, options.memory_states)
    return report


def migrate_django_sequences(url: str) -> None:
    setup_django(url)
    from django.core.management import call_command

    call_command("migrate", "sequences", verbosity=0)


def measure(options: Options) -> list[Measurement]:
    """Every (strategy, mode, workers) combination, run ``options.repeats`` times."""
    measurements = [
        Measurement(strategy, mode, count)
        for strategy in options.strategies
        for mode in options.modes
        for count in options.workers
    ]
    pool = Pool(max(options.workers))
    try:
        for repeat in range(1, options.repeats + 1):
            for m in measurements:
                measure_once(pool, options.url, m, options.operations)
                options.log(
                    f"{repeat}/{options.repeats} {m.strategy:>18} {m.mode:>8} {m.workers} "
                    f"workers: {m.runs[-1]:12,.0f}/s, {m.cpu_us[-1]:6.0f} µs CPU per operation"
                )
    finally:
        pool.close()
    return measurements


Cells = dict[tuple[str, str, int], float]


def _workers(report: dict[str, Any]) -> list[int]:
    return sorted({m["workers"] for m in report["measurements"]})


def _modes(report: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(m["mode"] for m in report["measurements"]))


def _rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The (strategy, mode) rows of the tables, in the order of STRATEGIES."""
    return sorted(
        {(m["strategy"], m["mode"]) for m in report["measurements"]},
        key=lambda k: (list(STRATEGIES).index(k[0]), k[1]),
    )


def _cells(report: dict[str, Any], field: str) -> Cells:
    return {(m["strategy"], m["mode"], m["workers"]): m[field] for m in report["measurements"]}


def markdown(report: dict[str, Any]) -> str:
    """The report's tables in Markdown: throughput, client CPU, the targets."""
    workers = _workers(report)
    header = "| strategy | mode | " + " | ".join(f"{w} w" for w in workers) + " |"
    rule = "|---|---|" + "---:|" * len(workers)

    def grid(field: str) -> list[str]:
        cells = _cells(report, field)
        rows = [header, rule]
        for strategy, mode in _rows(report):
            values = [cells.get((strategy, mode, w)) for w in workers]
            shown = ["-" if v is None else f"{v:,.0f}" for v in values]
            rows.append(f"| `{strategy}` | {mode} | " + " | ".join(shown) + " |")
        return rows

    lines = [f"Median operations/s ({report['repeats']} alternating repeats):", ""]
    lines += grid("median")
    lines += ["", "Median client CPU per operation, µs:", ""]
    lines += grid("median_cpu_us")
    lines += ["", "| target | measured | wanted | met |", "|---|---:|---:|---|"]
    for row in report["ratios"]:
        value = "-" if row["value"] is None else f"{row['value']:.2f}"
        bound = "≥" if row["at_least"] else "≤"
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['ratio']} | {value} | {bound} {row['target']:g} | {met} |")
    return "\n".join(lines) + "\n"


def print_report(report: dict[str, Any], console: Console) -> None:
    """The report as tables on ``console``: throughput, client CPU, the targets, the rest."""
    repeats = report["repeats"]
    console.print(
        _grid(
            report,
            f"median operations/s on {report['database']}, {repeats} alternating repeats",
            "median",
        )
    )
    console.print(_grid(report, "median client CPU µs per operation", "median_cpu_us"))
    console.print(_targets(report))
    for line in _notes(report):
        console.print(line)


def _grid(report: dict[str, Any], title: str, field: str) -> Table:
    from rich.table import Table

    workers = _workers(report)
    cells = _cells(report, field)
    table = Table(title=title)
    table.add_column("strategy")
    table.add_column("mode")
    for count in workers:
        table.add_column(f"{count}w", justify="right")
    for strategy, mode in _rows(report):
        row = [cells.get((strategy, mode, c)) for c in workers]
        table.add_row(strategy, mode, *["-" if v is None else f"{v:,.0f}" for v in row])
    return table


def _targets(report: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title="targets (ratios from this run)")
    for column in ("ratio", "measured", "target", "met"):
        table.add_column(column)
    for row in report["ratios"]:
        value = "-" if row["value"] is None else f"{row['value']:,.2f}"
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "n/a"}[row["met"]]
        bound = "≥" if row["at_least"] else "≤"
        table.add_row(row["ratio"], value, f"{bound} {row['target']:,}", met)
    return table


def _notes(report: dict[str, Any]) -> list[str]:
    """The trigger cost, HTTP overhead and memory growth, a line each."""
    lines = [
        f"numbering trigger, {row['mode']}, {row['workers']}w: "
        f"{row['with_trigger_per_s']:,.0f}/s vs {row['plain_per_s']:,.0f}/s without "
        f"(ratio {row['ratio']:.2f}, +{row['added_us_per_insert']:.0f} µs per insert)"
        for row in report.get("trigger_cost", [])
    ]
    if "http" in report:
        h = report["http"]
        lines.append(
            f"HTTP on loopback, median per GET: plain httpx {h['plain_ms']:.2f} ms, "
            f"audited {h['audited_ms']:.2f} ms, added {h['added_ms']:.2f} ms"
        )
    if "memory" in report:
        m = report["memory"]
        at_most = m[f"peak_mib_at_{m['states']}"]
        lines.append(
            f"worker peak RSS: {m['peak_mib_at_1000']:.1f} MiB after 1,000 states, "
            f"{at_most:.1f} MiB after {m['states']:,} "
            f"(growth {m['growth_mib']:.1f} MiB; target within 5 MB)"
        )
    return lines


def figure(report: dict[str, Any]) -> Figure:
    """Throughput against workers, one panel per mode; the x axis has a tick
    at each measured worker count and nowhere else."""
    from matplotlib.figure import Figure

    workers = _workers(report)
    modes = _modes(report)
    cells = _cells(report, "median")
    drawn = Figure(figsize=(6 * len(modes), 4.5))
    axes = drawn.subplots(1, len(modes), sharey=True, squeeze=False)[0]
    for axis, mode in zip(axes, modes, strict=True):
        for strategy in STRATEGIES:
            points = [
                (w, cells[strategy, mode, w]) for w in workers if (strategy, mode, w) in cells
            ]
            if points and strategy != "allocate_100":
                axis.plot(*zip(*points, strict=True), marker="o", label=strategy)
        axis.set_title(f"{mode} state(s)")
        axis.set_xlabel("worker processes")
        axis.set_xticks(workers, [str(w) for w in workers])
        axis.set_yscale("log")
    axes[0].set_ylabel("operations / s (median)")
    axes[-1].legend(fontsize=8)
    drawn.tight_layout()
    return drawn


def plot(report: dict[str, Any], path: Path) -> None:
    figure(report).savefig(path, dpi=120)


if __name__ == "__main__":
    from callindex.cli import main

    sys.argv[1:1] = ["bench"]
    main()
