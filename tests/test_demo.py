"""`callindex demo`: the verdict rules as pure functions, and whole runs through the CLI.

The end-to-end runs read the audit table back themselves: every state's
indices are exactly 0..n-1 and carry both call types.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from callindex import CallRecorder
from callindex.cli import cli
from callindex.demo import DemoConfig, Outcome, TrailRow, Verdict
from callindex.demo.events import AttemptStarted, ItemDone, kind_of, work_items
from callindex.demo.legacy import LegacyCounters
from callindex.demo.monitor import PhaseMonitor
from callindex.demo.render import progress_detail, rate
from callindex.demo.verdict import added_latency, find_gaps, percentile
from callindex.demo.workers import Flags
from callindex.loopback import LoopbackAPI

SMALL = ("--workers", "2", "--states", "4", "--calls-per-state", "6")
# --kill-one arms once every worker has sent its baseline calls and work is left:
# enough work that a fast machine cannot finish it first.
KILLABLE = ("--workers", "2", "--states", "8", "--calls-per-state", "12")


# The verdict, from plain rows


def _clean_trail(states: int = 2, calls: int = 4) -> tuple[list[TrailRow], list[Outcome]]:
    """Each call succeeds at its first attempt, except call 1, which needs two."""
    rows: list[TrailRow] = []
    outcomes: list[Outcome] = []
    index: defaultdict[str, int] = defaultdict(int)
    for s in range(states):
        state_id = f"s{s}"
        for n in range(calls):
            operation_id = f"{state_id}-op{n}"
            attempts = 2 if n == 1 else 1
            for attempt in range(1, attempts + 1):
                status = "success" if attempt == attempts else "error"
                kind = "http" if n % 2 == 0 else "llm"
                rows.append(
                    TrailRow(state_id, index[state_id], kind, status, operation_id, attempt)
                )
                index[state_id] += 1
            outcomes.append(Outcome(state_id, operation_id, attempts, ok=True))
    return rows, outcomes


def _verdict(rows: list[TrailRow], outcomes: list[Outcome], **options: Any) -> Verdict:
    options.setdefault("logical_calls", len(outcomes))
    options.setdefault("seconds", 2.0)
    options.setdefault("verify_ok", True)
    return Verdict.from_trail(rows, outcomes, **options)


def test_a_clean_trail_passes() -> None:
    rows, outcomes = _clean_trail()
    verdict = _verdict(rows, outcomes, added_latency_ms=[1.0, 2.0, 3.0, 10.0])
    assert verdict.ok, verdict.failures
    assert (verdict.logical_calls, verdict.calls_recorded, verdict.rows) == (8, 8, 10)
    assert (verdict.retries, verdict.errors, verdict.lost, verdict.duplicates) == (2, 0, 0, 0)
    assert verdict.gaps == () and verdict.abandoned == 0
    assert verdict.calls_per_second == 4.0
    assert (verdict.added_latency_p50_ms, verdict.added_latency_p99_ms) == (2.0, 10.0)


def test_a_duplicate_fails() -> None:
    rows, outcomes = _clean_trail()
    rows.append(TrailRow("s0", 2, "http", "success", "intruder", 1))
    verdict = _verdict(rows, outcomes)
    assert not verdict.ok
    assert verdict.duplicates == 1
    assert any("duplicate" in failure for failure in verdict.failures)


def test_a_lost_acknowledged_call_fails() -> None:
    rows, outcomes = _clean_trail()
    last = rows.pop()  # the last call of s1, which its worker saw succeed
    rows.append(
        TrailRow(
            last.state_id,
            last.call_index,
            last.call_type,
            "pending",
            last.operation_id,
            last.attempt,
        )
    )
    verdict = _verdict(rows[:-1], outcomes)
    assert not verdict.ok
    assert (verdict.lost, verdict.lost_acknowledged) == (1, 1)
    # Present but with another outcome than the worker saw: lost all the same.
    assert _verdict(rows, outcomes).lost == 1


def test_a_call_recorded_in_another_state_is_lost() -> None:
    rows, outcomes = _clean_trail()
    moved = rows[0]
    rows[0] = TrailRow("elsewhere", 0, moved.call_type, moved.status, moved.operation_id, 1)
    assert _verdict(rows, outcomes).lost == 1


def test_a_gap_fails_unless_verify_explains_it() -> None:
    rows, outcomes = _clean_trail()
    rows = [row for row in rows if not (row.state_id == "s0" and row.call_index == 3)]
    outcomes = [o for o in outcomes if o.operation_id != "s0-op2"]  # the call at index 3
    unexplained = _verdict(rows, outcomes)
    assert not unexplained.ok
    assert [(g.state_id, g.first, g.last, g.explanation) for g in unexplained.gaps] == [
        ("s0", 3, 3, None)
    ]
    explained = _verdict(rows, outcomes, explained_gaps=[("s0", 3, 3)], gap_cause="reserved")
    assert explained.ok, explained.failures
    assert explained.gaps[0].explanation == "reserved"


def test_abandoned_calls_are_reported_not_failed() -> None:
    rows, outcomes = _clean_trail()
    rows.append(TrailRow("s0", 5, "llm", "abandoned", "killed-op", 1))
    verdict = _verdict(rows, outcomes, killed_in_flight=1, logical_calls=len(outcomes) + 1)
    assert verdict.ok, verdict.failures
    assert (verdict.abandoned, verdict.killed_in_flight, verdict.calls_recorded) == (1, 1, 9)


def test_errors_must_be_recorded_as_errors() -> None:
    rows, outcomes = _clean_trail()
    failed = Outcome("s1", "s1-op0", 1, ok=False)
    outcomes = [failed if o.operation_id == "s1-op0" else o for o in outcomes]
    verdict = _verdict(rows, outcomes)
    assert verdict.lost == 1 and verdict.errors == 1
    assert verdict.lost_acknowledged == 0


def test_verify_failing_and_orchestration_problems_fail() -> None:
    rows, outcomes = _clean_trail()
    assert _verdict(rows, outcomes, verify_ok=False).failures == ("verify FAILED",)
    assert not _verdict(rows, outcomes, problems=["worker 2 crashed"]).ok
    assert _verdict(rows, outcomes, verify_ok=None).ok  # the legacy trail has no verify


def test_gaps_are_runs_below_the_highest_index() -> None:
    rows = [TrailRow("a", i, "http", "success") for i in (0, 3, 4, 7)]
    assert [(g.first, g.last) for g in find_gaps(rows)] == [(1, 2), (5, 6)]
    rows = [TrailRow("b", i, "http", "success") for i in (2,)]
    assert [(g.first, g.last) for g in find_gaps(rows, [("b", 0, 5)], "x")] == [(0, 1)]


def test_percentiles_and_added_latency() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([float(v) for v in range(1, 101)], 99) == 99.0
    samples = [("http", 12.0), ("llm", 20.0), ("other", 1.0)]
    assert added_latency(samples, {"http": [9.0, 10.0, 11.0], "llm": [15.0]}) == [2.0, 5.0]


def test_work_items_put_workers_together_on_each_state() -> None:
    items = list(work_items(["a", "b"], 5, workers=2))
    assert sorted(items) == [(s, n) for s in "ab" for n in range(5)]
    # Blocks of 2 * workers calls of one state, the states taking turns.
    assert items == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 0),
        ("b", 1),
        ("b", 2),
        ("b", 3),
        ("a", 4),
        ("b", 4),
    ]


def test_states_come_in_waves_of_as_many_states_as_workers() -> None:
    items = list(work_items(["a", "b", "c"], 5, workers=2))
    assert [state for state, _ in items] == [*"aaaabbbbab", *"ccccc"]
    assert items[-5:] == [("c", n) for n in range(5)]


# The live progress, from the workers' events


@pytest.fixture
def monitor() -> Iterator[PhaseMonitor]:
    """The parent's view of a phase of 6 states x 10 calls by 2 workers, before any event."""
    config = DemoConfig(workers=2, states=6, calls_per_state=10)
    spawn = multiprocessing.get_context("spawn")
    flags = Flags(start=spawn.Event(), baseline_over=spawn.Event(), stop=spawn.Event())
    with LoopbackAPI() as api:
        yield PhaseMonitor("callindex", config, {}, api, config.total_calls, flags)


def _work_through(monitor: PhaseMonitor) -> Iterator[None]:
    """Send ``monitor`` the events of each work item in turn, as 2 workers would;
    yield after each item is done."""
    config = monitor.config
    state_ids = [f"s{i}" for i in range(config.states)]
    for i, (state_id, n) in enumerate(work_items(state_ids, config.calls_per_state, 2)):
        worker = 1 + i % 2
        kind = kind_of(n)
        monitor.handle(AttemptStarted(worker, state_id, n, kind, 1, time.monotonic()))
        monitor.handle(ItemDone(worker, state_id, n, kind, f"{state_id}-{n}", 1, True, None))
        yield


def test_states_done_count_up_all_through_the_run(monitor: PhaseMonitor) -> None:
    seen = []
    for _ in _work_through(monitor):
        seen.append((monitor.done, monitor.states_done))
        assert f"states {monitor.states_done}/6 " in progress_detail(monitor, 6)
    states_done = [states for _, states in seen]
    assert states_done == sorted(states_done)
    assert seen[-1] == (60, 6)
    # A wave of 2 states is done every 20 calls, not every state at the very end.
    assert [states for done, states in seen if done % 20 == 0] == [2, 4, 6]


def test_the_live_rate_is_the_verdicts(monitor: PhaseMonitor) -> None:
    for _ in _work_through(monitor):
        time.sleep(0.001)
    result = monitor.result({})
    verdict = Verdict.from_trail([], result.outcomes, logical_calls=60, seconds=result.seconds)
    assert monitor.calls_per_second is not None and monitor.calls_per_second > 0
    assert verdict.calls_per_second == monitor.calls_per_second
    assert rate(verdict.calls_per_second) in progress_detail(monitor, 6)


def test_legacy_counters_collide_across_processes() -> None:
    """Two processes seeded from the same MAX hand out the same index: the old bug."""
    table: dict[str, int] = {}

    def seed(state_id: str) -> int:
        return table.get(state_id, -1) + 1

    first, second = LegacyCounters(seed), LegacyCounters(seed)
    assert first.next_index("s") == 0
    table["s"] = 0
    assert second.next_index("s") == 1
    table["s"] = 1
    assert first.next_index("s") == 1  # collides with second's row 1


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="workers"):
        DemoConfig(workers=0)
    with pytest.raises(ValueError, match="2 workers"):
        DemoConfig(workers=1, kill_one=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fault-rate-429", "0.7", "--fault-rate-503", "0.5"], "add up to 1.2"),
        (["--kill-one", "--workers", "1"], "--kill-one needs --workers 2"),
        (["--states", "0"], "'--states'"),
        (["--fault-rate-drop", "-0.1"], "'--fault-rate-drop'"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["demo", *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


# Whole runs


def _demo(*args: str) -> Result:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def _table(stdout: str) -> dict[str, list[str]]:
    """The verdict table's rows: label -> cells, one per column."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def _calls(url: str) -> list[tuple[str, int, str, str]]:
    """(state_id, call_index, call_type, status) of every call of the demo's states."""
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        return [
            (row.state_id, int(row.call_index), row.call_type, row.status)
            for row in conn.execute(
                text(
                    "SELECT state_id, call_index, call_type, status FROM calls "
                    "WHERE state_id LIKE 'demo-%' ORDER BY state_id, call_index"
                )
            )
        ]


def _assert_trail(url: str, states: int = 4) -> list[tuple[str, int, str, str]]:
    calls = _calls(url)
    indices, types = defaultdict(list), defaultdict(set)
    for state_id, index, call_type, _ in calls:
        indices[state_id].append(index)
        types[state_id].add(call_type)
    assert len(indices) == states
    for state_id, found in indices.items():
        assert found == list(range(len(found))), f"{state_id}: {found}"
        assert types[state_id] == {"http", "llm"}, state_id
    return calls


def _assert_passed(result: Result, logical_calls: int = 24) -> dict[str, list[str]]:
    assert result.exit_code == 0, result.output
    table = _table(result.stdout)
    assert table["logical calls (work items)"][0] == str(logical_calls)
    assert table["calls recorded"][0] == str(logical_calls)
    assert table["duplicates"][0] == "0"
    assert table["lost calls"][0] == "0"
    assert table["gaps"][0] == "0"
    assert table["verify"][0] == "ok"
    assert table["verdict"][0] == "PASS"
    assert "finished in" in result.stdout
    _assert_progress_agrees(result.stderr, table, logical_calls)
    return table


def _assert_progress_agrees(stderr: str, table: dict[str, list[str]], logical_calls: int) -> None:
    """callindex's last progress line (printed once, stderr not being a terminal):
    every call done (or killed) and every state, at the verdict's throughput."""
    lines = [line for line in stderr.splitlines() if line.startswith("callindex ")]
    assert len(lines) == 1, stderr
    line = lines[0]
    calls = re.search(r" (\d+)/(\d+) calls ", line)
    killed = re.search(r" killed (\d+) ", line)
    assert calls is not None and int(calls[2]) == logical_calls, line
    assert int(calls[1]) + (int(killed[1]) if killed else 0) == logical_calls, line
    states = re.search(r" states (\d+)/(\d+) ", line)
    assert states is not None and states[1] == states[2], line
    assert f" {table['throughput'][0]} " in line


@pytest.fixture
def demo_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder, without a database URL in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CALLINDEX_DATABASE_URL", raising=False)
    return tmp_path


@pytest.mark.parametrize("given", ["--db before", "--db after", "environment"])
def test_a_given_database_needs_yes(
    given: str, sqlite_empty_url: str, demo_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Demo rows in a real trail could never be deleted: refused, nothing written."""
    args = {
        "--db before": ["--db", sqlite_empty_url, "demo", *SMALL],
        "--db after": ["demo", *SMALL, "--db", sqlite_empty_url],
        "environment": ["demo", *SMALL],
    }[given]
    if given == "environment":
        monkeypatch.setenv("CALLINDEX_DATABASE_URL", sqlite_empty_url)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "permanent" in message and "append-only" in message
    assert "can never be deleted" in message and "--yes" in message
    assert "Traceback" not in result.output
    assert not Path(sqlite_empty_url.removeprefix("sqlite:///")).exists()
    assert not list(demo_folder.iterdir())


@pytest.mark.slow
def test_a_given_database_with_yes_gets_the_demo(sqlite_url: str, demo_folder: Path) -> None:
    table = _assert_passed(_demo("demo", *SMALL, "--db", sqlite_url, "--yes"))
    assert len(_assert_trail(sqlite_url)) == int(table["attempts (rows)"][0])
    assert not (demo_folder / "callindex-demo.db").exists()


@pytest.mark.slow
def test_demo_on_a_fresh_sqlite_file(demo_folder: Path) -> None:
    (demo_folder / "callindex-demo.db").write_text("left over from an earlier run")
    table = _assert_passed(_demo("demo", *SMALL))
    assert table["abandoned calls"][0] == "0"
    calls = _assert_trail(f"sqlite:///{demo_folder / 'callindex-demo.db'}")
    assert len(calls) == int(table["attempts (rows)"][0])
    assert not (demo_folder / "callindex.db").exists()


@pytest.mark.slow
def test_demo_on_postgresql(postgresql_url: str, demo_folder: Path) -> None:
    table = _assert_passed(_demo("--db", postgresql_url, "demo", "--yes", *SMALL))
    calls = _assert_trail(postgresql_url)
    assert len(calls) == int(table["attempts (rows)"][0])
    assert not list(demo_folder.iterdir())  # nothing written to the current folder


@pytest.mark.slow
def test_kill_one_leaves_an_abandoned_call(demo_folder: Path) -> None:
    result = _demo("demo", *KILLABLE, "--kill-one")
    table = _assert_passed(result, logical_calls=96)
    assert "killed worker" in result.stderr
    assert int(table["abandoned calls"][0]) >= 1
    calls = _assert_trail(f"sqlite:///{demo_folder / 'callindex-demo.db'}", states=8)
    assert [status for *_, status in calls].count("abandoned") == 1
    assert "pending" not in {status for *_, status in calls}


@pytest.mark.slow
def test_legacy_replay_is_shown_beside(demo_folder: Path) -> None:
    result = _demo("demo", *SMALL, "--legacy")
    table = _assert_passed(result)
    assert table["logical calls (work items)"] == ["24", "24"]
    recorded, lost = int(table["calls recorded"][1]), int(table["lost calls"][1])
    assert recorded + lost == 24
    assert table["verify"][1] == "—"
    assert (demo_folder / "callindex-demo-legacy.db").exists()


@pytest.mark.slow
def test_shared_database_keeps_to_its_own_states(
    sqlite_url: str, demo_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a database from the environment: states of its own, the legacy table
    beside callindex's, and the sweep leaves other applications' calls alone."""
    with CallRecorder(sqlite_url) as recorder:
        recorder.open_state("another-app")
        in_flight = recorder.begin_call("another-app", "http", {"url": "https://x"})
    monkeypatch.setenv("CALLINDEX_DATABASE_URL", sqlite_url)
    result = _demo("demo", "--yes", *KILLABLE, "--kill-one", "--legacy")
    table = _assert_passed(result, logical_calls=96)
    recorded, lost = int(table["calls recorded"][1]), int(table["lost calls"][1])
    assert recorded + lost + 1 == 96  # the killed call leaves no trace in the legacy table
    _assert_trail(sqlite_url, states=8)
    with CallRecorder(sqlite_url) as recorder:
        call = recorder.get_call(in_flight.call_id)
        assert call is not None and call.status == "pending"
        with recorder.engine.connect() as conn:
            legacy_rows = conn.execute(text("SELECT count(*) FROM legacy_calls")).scalar_one()
    assert legacy_rows == recorded
    assert not (demo_folder / "callindex-demo.db").exists()
    assert not (demo_folder / "callindex-demo-legacy.db").exists()
