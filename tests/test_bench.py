"""The benchmark's correctness checks: every strategy's indices are checked for
duplicates, and a small run of every strategy passes them on both backends."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import run as bench  # noqa: E402


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


@pytest.mark.slow
def test_a_small_run_of_every_strategy(db_url: str, tmp_path: Path, capsys: Any) -> None:
    saved = tmp_path / "report.json"
    arguments = [
        "--db",
        db_url,
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
    ]
    assert bench.main(arguments) == 0
    report = json.loads(saved.read_text())
    assert json.loads(capsys.readouterr().out) == report
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
