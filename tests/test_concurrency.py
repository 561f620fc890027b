"""Concurrency: real worker processes, one recorder and connection pool each,
against real PostgreSQL and SQLite; every claim is checked from the table."""

from __future__ import annotations

import itertools
import queue
import time

import pytest

from callindex import CallRecorder

from conftest import counter_value
from workers import SPAWN, allocate_many, allocate_once, run_workers

pytestmark = pytest.mark.slow

WORKERS = 8
PER_WORKER = 500


def _indices(blocks: list[list[tuple[int, int]]]) -> list[int]:
    return sorted(
        index
        for first, count in itertools.chain.from_iterable(blocks)
        for index in range(first, first + count)
    )


def test_eight_processes_on_one_hot_state_get_exactly_0_to_3999(db_url: str) -> None:
    with CallRecorder(db_url) as recorder:
        recorder.open_state("hot")
    results = run_workers(allocate_many, [(db_url, "hot", PER_WORKER)] * WORKERS)
    assert _indices(results) == list(range(WORKERS * PER_WORKER))
    assert counter_value(db_url, "hot") == WORKERS * PER_WORKER


def test_eight_processes_on_eight_states_get_0_to_499_each(db_url: str) -> None:
    states = [f"state-{n}" for n in range(WORKERS)]
    with CallRecorder(db_url) as recorder:
        for state_id in states:
            recorder.open_state(state_id)
    results = run_workers(allocate_many, [(db_url, s, PER_WORKER) for s in states])
    for blocks in results:
        assert _indices([blocks]) == list(range(PER_WORKER))
    for state_id in states:
        assert counter_value(db_url, state_id) == PER_WORKER


def test_blocks_never_overlap_with_concurrent_single_allocations(db_url: str) -> None:
    with CallRecorder(db_url) as recorder:
        recorder.open_state("mixed")
    plans = [(db_url, "mixed", 100, 25)] * 2 + [(db_url, "mixed", 400, 1)] * 2
    results = run_workers(allocate_many, plans)
    total = 2 * 100 * 25 + 2 * 400
    # Sorted and equal to 0..total-1: no index was handed out twice, none lost.
    assert _indices(results) == list(range(total))
    assert counter_value(db_url, "mixed") == total


def _start_competitor(db_url: str, state_id: str) -> tuple[object, object, float]:
    started = SPAWN.Event()
    results = SPAWN.Queue()
    process = SPAWN.Process(target=allocate_once, args=(db_url, state_id, started, results))
    process.start()
    assert started.wait(timeout=60), "the competing process never started"
    return process, results, time.monotonic()


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_competitor_waits_for_the_callers_transaction(db_url: str, outcome: str) -> None:
    with CallRecorder(db_url) as recorder:
        recorder.open_state("s1")
        recorder.allocate_call_index("s1", count=3)
        conn = recorder.engine.connect()
        conn.begin()
        mine = recorder.allocate_call_index("s1", connection=conn)
        assert mine == 3
        process, results, _ = _start_competitor(db_url, "s1")
        try:
            with pytest.raises(queue.Empty):
                results.get(timeout=1.5)  # type: ignore[attr-defined]
        finally:
            if outcome == "commit":
                conn.commit()
            else:
                conn.rollback()
            conn.close()
        theirs = results.get(timeout=30)  # type: ignore[attr-defined]
        process.join(timeout=30)  # type: ignore[attr-defined]
    # After a rollback the competitor gets the very index the caller had: no gap.
    assert theirs == (mine + 1 if outcome == "commit" else mine)
    assert counter_value(db_url, "s1") == theirs + 1
