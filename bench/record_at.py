"""Measure record_call(call_index=k), the allocate-then-record path, against
the plain record_call, on one database, alternating, and print medians and
their ratio.

    python bench/record_at.py --db postgresql+psycopg://USER@HOST/SCRATCH --calls 2000

Use a scratch database: the calls it writes can never be deleted.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from callindex import CallRecorder


def per_second(recorder: CallRecorder, calls: int, *, reserved: bool) -> float:
    state_id = f"bench-{uuid.uuid4().hex[:8]}"
    recorder.open_state(state_id)
    first = recorder.allocate_call_index(state_id, calls) if reserved else 0
    started = time.perf_counter()
    for n in range(calls):
        if reserved:
            recorder.record_call(state_id, "http", "success", {"n": n}, call_index=first + n)
        else:
            recorder.record_call(state_id, "http", "success", {"n": n})
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    plain, at = [], []
    with CallRecorder(options.db) as recorder:
        recorder.upgrade()
        for _ in range(options.repeats):
            plain.append(per_second(recorder, options.calls, reserved=False))
            at.append(per_second(recorder, options.calls, reserved=True))
    print(f"record_call:              {statistics.median(plain):,.0f}/s")
    print(f"record_call(call_index=k): {statistics.median(at):,.0f}/s")
    print(f"ratio: {statistics.median(at) / statistics.median(plain):.2f}")


if __name__ == "__main__":
    main()
