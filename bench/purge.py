"""Measure `callindex purge` of 1,000,000 calls: row by row, and (PostgreSQL,
``calls`` partitioned by month) by dropping the month's partition.

    python bench/purge.py --db postgresql+psycopg://USER@HOST/SCRATCH
    python bench/purge.py --db postgresql+psycopg://USER@HOST/SCRATCH --partitioned
    python bench/purge.py --db sqlite:////tmp/purge.db

The calls (``--states`` states of ``--calls-per-state`` calls, finished, with
small payloads) are written straight into the table, created two months ago;
then the purge is timed, and the result checked: every call purged, every
counter kept, ``verify`` without a gap. Use a scratch database.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from callindex import CallRecorder, partitions
from callindex.database import Database

POSTGRESQL_FILL = """
INSERT INTO calls (call_id, state_id, call_index, call_type, status, request, request_hash,
                   response, response_hash, latency_ms, created_at, completed_at, hash_scheme)
SELECT 'bench-' || s || '-' || i, 'bench-' || s, i, 'http', 'success',
       '{"n": 1}', repeat('a', 64), '{"ok": true}', repeat('b', 64), 1.5,
       CAST(:created_at AS timestamptz), CAST(:created_at AS timestamptz), 'rfc8785'
FROM generate_series(1, :states) AS s, generate_series(0, :per_state - 1) AS i
"""
SQLITE_FILL = """
WITH RECURSIVE
  s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :states),
  i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n < :per_state - 1)
INSERT INTO calls (call_id, state_id, call_index, call_type, status, request, request_hash,
                   response, response_hash, latency_ms, created_at, completed_at, hash_scheme)
SELECT 'bench-' || s.n || '-' || i.n, 'bench-' || s.n, i.n, 'http', 'success',
       '{"n": 1}', printf('%064d', 0), '{"ok": true}', printf('%064d', 1), 1.5,
       :created_at, :created_at, 'rfc8785'
FROM s, i
"""


def fill(url: str, states: int, per_state: int) -> None:
    created_at = datetime.now(UTC) - timedelta(days=62)
    with CallRecorder(url) as recorder:
        recorder.upgrade()
        counts = {f"bench-{n}": per_state for n in range(1, states + 1)}
        for state_id in counts:
            recorder.open_state(state_id)
        recorder.allocate_call_indices(counts)
        with recorder.engine.begin() as conn:
            postgresql = conn.dialect.name == "postgresql"
            conn.execute(
                text(POSTGRESQL_FILL if postgresql else SQLITE_FILL),
                {
                    "states": states,
                    "per_state": per_state,
                    "created_at": created_at.isoformat()
                    if postgresql
                    else created_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                },
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--states", type=int, default=1000)
    parser.add_argument("--calls-per-state", type=int, default=1000)
    parser.add_argument("--partitioned", action="store_true")
    options = parser.parse_args()
    total = options.states * options.calls_per_state
    started = time.perf_counter()
    fill(options.db, options.states, options.calls_per_state)
    print(f"wrote {total:,} calls in {time.perf_counter() - started:.1f} s")
    if options.partitioned:
        started = time.perf_counter()
        db = Database(options.db)
        partitions.partition(db)
        db.dispose()
        print(f"partitioned calls by month in {time.perf_counter() - started:.1f} s")
    with CallRecorder(options.db) as recorder:
        started = time.perf_counter()
        purged = recorder.purge(30 * 86400)
        elapsed = time.perf_counter() - started
        calls = sum(run.calls for run in purged)
        way = "by dropping the month's partition" if options.partitioned else "row by row"
        print(f"purged {calls:,} calls ({len(purged):,} runs) {way} in {elapsed:.2f} s")
        assert calls == total, f"purged {calls}, not {total}"
        report = recorder.verify()
        assert report.ok and not report.gaps and len(report.purged) == options.states
        assert recorder.allocate_call_index("bench-1") == options.calls_per_state
        print("checked: every call purged, every counter kept, verify without a gap")


if __name__ == "__main__":
    main()
