"""Allocation throughput on one hot state, by number of worker processes.

    python bench/allocation_throughput.py --db postgresql+psycopg://root@127.0.0.1/test \
        --workers 1,8 --allocations 2000 --repeats 3

Each worker process has its own recorder; all allocate on the same state.
Prints the median allocations per second over the repeats, and checks the
indices handed out are exactly 0..N-1 (no duplicate, nothing lost).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
import uuid
from typing import Any

from callindex import CallRecorder

SPAWN = multiprocessing.get_context("spawn")


def _worker(url: str, state_id: str, allocations: int, barrier: Any, results: Any) -> None:
    with CallRecorder(url) as recorder:
        recorder.allocate_call_index(state_id, 1)  # warm the pool outside the timing
        barrier.wait()
        got = [recorder.allocate_call_index(state_id) for _ in range(allocations)]
        results.put((time.perf_counter(), got))


def run_once(url: str, workers: int, allocations: int) -> float:
    state_id = f"bench-{uuid.uuid4().hex[:8]}"
    with CallRecorder(url) as recorder:
        recorder.open_state(state_id)
    barrier = SPAWN.Barrier(workers + 1)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_worker, args=(url, state_id, allocations, barrier, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    barrier.wait()
    started = time.perf_counter()
    outcomes = [results.get(timeout=600) for _ in processes]
    finished = max(end for end, _ in outcomes)
    for process in processes:
        process.join()
    indices = sorted(i for _, got in outcomes for i in got)
    assert indices == list(range(workers, workers + workers * allocations)), "duplicate or lost"
    return workers * allocations / (finished - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--workers", default="1,8")
    parser.add_argument("--allocations", type=int, default=2000, help="per worker")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    CallRecorder(args.db).upgrade()
    print(f"{'workers':>7}  {'median alloc/s':>14}  runs")
    for workers in (int(w) for w in args.workers.split(",")):
        rates = [run_once(args.db, workers, args.allocations) for _ in range(args.repeats)]
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"{workers:>7}  {statistics.median(rates):>14,.0f}  {runs}")


if __name__ == "__main__":
    main()
