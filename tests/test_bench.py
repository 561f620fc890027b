"""The benchmark: its command refuses bad options and missing dependencies
before running anything, every strategy's indices are checked for duplicates,
and a small run of every strategy passes them on both backends."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import run as bench
import strategies
from click.testing import CliRunner, Result

from callindex.cli import cli
from callindex.cli.bench import STRATEGIES

INSTALL = "pip install 'callindex[bench]'"


def callindex(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def outcome(pairs: list[tuple[str, int]]) -> dict[str, Any]:
    return {"ok": True, "indices": pairs, "started": 0.0, "finished": 1.0, "retries": 0}


def test_duplicates_fail_any_strategy() -> None:
    with pytest.raises(AssertionError, match="duplicate"):
        bench.check_indices("max_plus_one", [outcome([("s", 0)]), outcome([("s", 0)])])


def test_callindex_indices_must_be_exactly_0_to_n() -> None:
    bench.check_indices("record_call", [outcome([("s", 0), ("s", 2)]), outcome([("s", 1)])])
    with pytest.raises(AssertionError, match="not exactly"):
        bench.check_indices("record_call", [outcome([("s", 0), ("s", 2)])])
    bench.check_indices("bare_insert", [outcome([("s", 0), ("s", 2)])])  # client-chosen


def test_help_lists_every_strategy_and_the_defaults() -> None:
    assert list(STRATEGIES) == list(strategies.STRATEGIES)
    result = callindex("bench", "--help")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for name, strategy in STRATEGIES.items():
        assert any(line.split()[:1] == [name] and strategy.summary in line for line in lines)
    text = " ".join(result.stdout.split())
    for default in ("1,2,4,8", "hot,distinct", "300", "5", "100000", "200"):
        assert f"[default: {default}" in text


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["--strategies", "banana"], "--strategies"),
        (["--strategies", "record_call,"], "--strategies"),
        (["--strategies", "nextval"], "--strategies"),  # PostgreSQL only, on SQLite
        (["--workers", "0"], "--workers"),
        (["--workers", "1,x"], "--workers"),
        (["--workers", ""], "--workers"),
        (["--modes", "warm"], "--modes"),
        (["--repeats", "0"], "--repeats"),
        (["--operations", "0"], "--operations"),
        (["--memory-states", "10"], "--memory-states"),
        (["--http-calls", "-1"], "--http-calls"),
        (["--plot", "throughput.txt"], "--plot"),
        (["--save", "/no-such-folder/report.json"], "--save"),
    ],
)
def test_bad_values_are_usage_errors(arguments: list[str], option: str, tmp_path: Path) -> None:
    database = tmp_path / "bench.db"
    result = callindex("bench", "--db", f"sqlite:///{database}", *arguments)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output
    assert "Traceback" not in result.output
    assert not database.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--plot", "throughput.png"], f"--plot needs matplotlib: {INSTALL}"),
        (
            ["--strategies", "allocate,django_sequences"],
            f"django_sequences needs django-sequences: {INSTALL}",
        ),
    ],
)
def test_missing_dependencies_are_refused_before_running(
    arguments: list[str], message: str, tmp_path: Path
) -> None:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for module in ("matplotlib", "sequences"):
        (stubs / f"{module}.py").write_text(f"raise ImportError('no {module} here')\n")
    executable = shutil.which("callindex", path=str(Path(sys.executable).parent))
    assert executable, "the callindex console script is not installed beside this Python"
    # Nothing listens on port 1: connecting first would fail differently.
    database = "postgresql+psycopg://root@127.0.0.1:1/nothing?connect_timeout=2"
    done = subprocess.run(
        [executable, "bench", "--db", database, *arguments],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(stubs)},
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stderr, done.stdout) == (1, f"Error: {message}\n", "")


def test_a_tiny_run_prints_the_ratios(tmp_path: Path) -> None:
    """--db after the subcommand; a fresh SQLite file, which the run upgrades."""
    database, saved, drawn = tmp_path / "bench.db", tmp_path / "report.json", tmp_path / "t.png"
    result = callindex(
        "bench",
        "--db",
        f"sqlite:///{database}",
        "--workers",
        "1,2",
        "--repeats",
        "1",
        "--operations",
        "20",
        "--strategies",
        "bare_insert,record_call",
        "--memory-states",
        "0",
        "--http-calls",
        "0",
        "--save",
        str(saved),
        "--plot",
        str(drawn),
    )
    assert result.exit_code == 0, result.output
    assert "targets (ratios from this run)" in result.stdout
    assert "record_call / bare insert, 2w distinct" in result.stdout
    with sqlite3.connect(database) as conn:
        inserted = conn.execute("SELECT count(*) FROM bench_plain_calls").fetchone()[0]
        recorded = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
    conn.close()
    assert (inserted, recorded) == (2 * (1 + 2) * 20,) * 2  # modes x workers x operations
    report = json.loads(saved.read_text())
    assert {m["strategy"] for m in report["measurements"]} == {"bare_insert", "record_call"}
    assert drawn.stat().st_size > 0
    figure = bench.figure(report)
    for axis in figure.axes:
        assert axis.get_xticks().tolist() == [1, 2]
        assert [label.get_text() for label in axis.get_xticklabels()] == ["1", "2"]


def test_the_script_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, str(Path(bench.__file__)), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert done.stdout.startswith("Usage: callindex bench [OPTIONS]")


@pytest.mark.slow
def test_a_small_run_of_every_strategy(db_url: str, tmp_path: Path) -> None:
    """--db before the subcommand."""
    saved = tmp_path / "report.json"
    result = callindex(
        "--db",
        db_url,
        "bench",
        "--workers",
        "1,2",
        "--operations",
        "15",
        "--repeats",
        "1",
        "--memory-states",
        "1500",
        "--http-calls",
        "5",
        "--json",
        "--save",
        str(saved),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(saved.read_text())
    assert json.loads(result.stdout) == report
    measured = {(m["strategy"], m["mode"], m["workers"]) for m in report["measurements"]}
    expected = {
        "bare_insert",
        "bare_insert_update",
        "raw_update",
        "raw_update_100",
        "legacy_insert",
        "allocate",
        "allocate_100",
        "record_call",
        "begin_finish",
    }
    if db_url.startswith("postgresql"):
        expected |= {"nextval", "max_plus_one", "select_for_update", "record_call_early"}
    assert {s for s, _, _ in measured} >= expected
    assert all(m["median"] > 0 for m in report["measurements"])
    assert report["memory"]["states"] == 1500
    assert report["http"]["audited_ms"] > 0
    assert report["ratios"]
    assert all(m["median_cpu_us"] > 0 for m in report["measurements"])
    assert {(row["mode"], row["workers"]) for row in report["trigger_cost"]} == {
        (mode, workers) for mode in ("hot", "distinct") for workers in (1, 2)
    }
