"""Measure sealing: `callindex seal` and `verify --seals` over many calls.

    python bench/sealing.py --db postgresql+psycopg://USER@HOST/SCRATCH --calls 1000000

The database is filled with finished calls (``--states`` states sharing
``--calls``), sealed once, extended by one call per state and sealed again (the
incremental step reads only the new calls), then every chain is verified. It
prints the seconds and calls per second of each step. Use a scratch database:
the calls it writes can never be deleted.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlalchemy import text

from callindex import CallRecorder

FILL_POSTGRESQL = """
INSERT INTO call_index_counters (state_id, next_index)
SELECT 'bench-' || s, :per_state FROM generate_series(0, :states - 1) AS s;
INSERT INTO calls (call_id, state_id, call_index, call_type, status, request, request_hash,
                   response, response_hash, latency_ms, created_at, completed_at, hash_scheme)
SELECT 'bench-' || s || '-' || i, 'bench-' || s, i, 'http', 'success',
       json_build_object('n', i), md5(i::text) || md5(s::text),
       json_build_object('ok', true), md5(s::text) || md5(i::text),
       i * 0.5, now(), now(), 'rfc8785'
FROM generate_series(0, :states - 1) AS s, generate_series(0, :per_state - 1) AS i;
"""


def fill(recorder: CallRecorder, states: int, per_state: int) -> None:
    with recorder.engine.begin() as conn:
        for statement in FILL_POSTGRESQL.split(";"):
            if statement.strip():
                conn.execute(text(statement), {"states": states, "per_state": per_state})


def timed(step: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = step()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a scratch PostgreSQL database")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--states", type=int, default=1_000)
    options = parser.parse_args()
    per_state = options.calls // options.states
    with CallRecorder(options.db) as recorder:
        recorder.upgrade()
        _, filled = timed(lambda: fill(recorder, options.states, per_state))
        sealed, first = timed(recorder.seal)
        for state in range(options.states):
            recorder.record_call(f"bench-{state}", "http", "success", {"n": "more"})
        resealed, incremental = timed(recorder.seal)
        report, verified = timed(lambda: recorder.verify(seals=True))
    calls = options.states * per_state
    result = {
        "calls": calls,
        "states": options.states,
        "fill_seconds": round(filled, 2),
        "seal_seconds": round(first, 2),
        "seal_calls_per_second": round(calls / first),
        "incremental_seal_seconds": round(incremental, 2),
        "incremental_states_resealed": len(resealed),
        "verify_seconds": round(verified, 2),
        "verify_calls_per_second": round((calls + options.states) / verified),
        "seals": len(sealed) + len(resealed),
        "verify_ok": report.ok,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
