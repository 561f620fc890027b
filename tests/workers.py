"""Worker processes for the concurrency tests: one process, one recorder,
one connection pool each; results travel back through a queue.

Processes are spawned (not forked) so that no engine or connection is ever
shared with the parent.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable, Sequence
from multiprocessing.synchronize import Barrier
from typing import Any

from callindex import CallRecorder

SPAWN = multiprocessing.get_context("spawn")


def run_workers(
    target: Callable[..., Any], args_per_worker: Sequence[tuple[Any, ...]], timeout: float = 120
) -> list[Any]:
    """Run ``target(barrier, results, *args)`` in one process per args tuple,
    all released together by ``barrier``; return what each put on ``results``."""
    barrier = SPAWN.Barrier(len(args_per_worker))
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=target, args=(barrier, results, *args)) for args in args_per_worker
    ]
    for process in processes:
        process.start()
    collected = []
    try:
        for _ in processes:
            collected.append(results.get(timeout=timeout))
    except queue.Empty:
        raise AssertionError(f"a worker sent no result within {timeout}s") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    assert not failed, f"worker processes exited with {failed}"
    errors = [r for r in collected if isinstance(r, str)]
    assert not errors, errors
    return collected


def allocate_many(
    barrier: Barrier, results: Any, url: str, state_id: str, times: int, count: int = 1
) -> None:
    """Allocate ``times`` blocks of ``count`` and report ``[(first, count), ...]``."""
    try:
        with CallRecorder(url) as recorder:
            barrier.wait()
            blocks = [(recorder.allocate_call_index(state_id, count), count) for _ in range(times)]
        results.put(blocks)
    except Exception as error:  # reported to the parent, which fails the test
        results.put(f"{type(error).__name__}: {error}")


def allocate_once(url: str, state_id: str, started: Any, results: Any) -> None:
    """Signal ``started``, allocate one index, report it."""
    try:
        with CallRecorder(url) as recorder:
            recorder.engine.connect().close()  # connect before signalling
            started.set()
            results.put(recorder.allocate_call_index(state_id))
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")
