"""Adopting a large legacy audit database while its writers keep writing.

Builds a legacy database (``bench/legacy.py``, the upstream shape) of
``--calls`` rows on PostgreSQL, starts ``--writers`` upstream writer
processes (in-process MAX + 1 counters, each on states of its own), lets them
write for ``--settle`` seconds, runs ``callindex db adopt``, lets them write
``--settle`` seconds more, and reports:

* how long each adoption step took (index, schema, counter backfill);
* every insert's latency before, during and after the adoption: median,
  99th percentile and the longest, i.e. the longest block a writer saw;
* the checks afterwards: no call lost, no (state_id, call_index) twice,
  ``verify`` passes, every counter past its state's calls.

    python bench/adoption.py --db postgresql+psycopg://root@127.0.0.1/postgres

The database named by ``--db`` is only used to create (and drop) a scratch
database ``callindex_adoption_bench``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

from callindex import CallRecorder, adoption
from callindex.database import Database

from legacy import LegacyWriter, legacy_metadata  # beside this script

SCRATCH = "callindex_adoption_bench"
PER_STATE = 20


def build(url: str, calls: int) -> float:
    """The legacy schema and ``calls`` rows: PER_STATE calls per state."""
    started = time.monotonic()
    engine = create_engine(url)
    with engine.begin() as conn:
        legacy_metadata.create_all(conn)
        conn.execute(
            text(
                "INSERT INTO node_states (state_id) "
                "SELECT 'state-' || s FROM generate_series(0, (:calls - 1) / :per) AS s"
            ),
            {"per": PER_STATE, "calls": calls},
        )
        conn.execute(
            text(
                "INSERT INTO calls (call_id, state_id, call_index, call_type, status, "
                "request_hash, request_ref, latency_ms, created_at) "
                "SELECT 'legacy-' || g, 'state-' || (g / :per), g % :per, 'http', 'success', "
                "md5(g::text) || md5(g::text), 'blob://legacy-' || g, 12.5, "
                "now() - make_interval(secs => :calls - g) "
                "FROM generate_series(0, :calls - 1) AS g"
            ),
            {"per": PER_STATE, "calls": calls},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE calls"))
    engine.dispose()
    return time.monotonic() - started


def write(url: str, states: list[str], stop: Any, results: Any) -> None:
    """An upstream writer: inserts until ``stop``; reports (start, seconds) per insert."""
    writer = LegacyWriter(url)
    timings, lost, n = [], 0, 0
    while not stop.is_set():
        started = time.monotonic()
        outcome = writer.record(states[n % len(states)])
        n += 1
        if outcome is None:
            lost += 1
        else:
            timings.append((started, outcome[1], outcome[0]))
        time.sleep(0.002)
    writer.close()
    results.put({"timings": timings, "lost": lost})


def summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"inserts": 0}
    ordered = sorted(latencies)
    return {
        "inserts": len(ordered),
        "median_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "longest_ms": ordered[-1] * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="postgresql+psycopg://root@127.0.0.1/postgres")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--batch-states", type=int, default=adoption.DEFAULT_BATCH_STATES)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before and after")
    parser.add_argument("--save", metavar="FILE.json")
    args = parser.parse_args(argv)

    admin = create_engine(args.db, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {SCRATCH}"))
    url = make_url(args.db).set(database=SCRATCH).render_as_string(hide_password=False)
    try:
        report = run(url, args)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)"))
        admin.dispose()
    if args.save:
        Path(args.save).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0 if report["checks"]["ok"] else 1


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    built = build(url, args.calls)
    print(f"built {args.calls:,} legacy calls in {built:.1f}s", file=sys.stderr)
    states = args.calls // PER_STATE
    # Spread over the whole state range, so the backfill passes them all.
    chosen = [f"state-{n}" for n in range(0, states, max(1, states // 200))]
    spawn = multiprocessing.get_context("spawn")
    stop, results = spawn.Event(), spawn.Queue()
    writers = [
        spawn.Process(target=write, args=(url, chosen[w :: args.writers], stop, results))
        for w in range(args.writers)
    ]
    for process in writers:
        process.start()
    time.sleep(args.settle)
    adoption_started = time.monotonic()
    # The writers keep writing: a rolling deploy, so legacy-writers mode.
    adopted = adoption.adopt(Database(url), batch_states=args.batch_states, legacy_writers=True)
    adoption_finished = time.monotonic()
    time.sleep(args.settle)
    stop.set()
    outcomes = [results.get(timeout=60) for _ in writers]
    for process in writers:
        process.join()

    def phase(low: float, high: float) -> dict[str, float]:
        return summary(
            [
                seconds
                for outcome in outcomes
                for started, seconds, _ in outcome["timings"]
                if low <= started < high or (started < low and started + seconds > low)
            ]
        )

    report: dict[str, Any] = {
        "calls": args.calls,
        "states": states,
        "writers": args.writers,
        "batch_states": args.batch_states,
        "adoption": {
            "index_s": adopted.index_seconds,
            "schema_s": adopted.schema_seconds,
            "backfill_s": adopted.backfill_seconds,
            "batches": adopted.batches,
            "total_s": adoption_finished - adoption_started,
        },
        "writer_latency": {
            "before": phase(0, adoption_started),
            "during": phase(adoption_started, adoption_finished),
            "after": phase(adoption_finished, float("inf")),
        },
        "checks": check(url, outcomes),
    }
    return report


def check(url: str, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    written = {call_id for outcome in outcomes for _, _, call_id in outcome["timings"]}
    engine = create_engine(url)
    with engine.connect() as conn:
        present = {
            row[0]
            for row in conn.execute(
                text("SELECT call_id FROM calls WHERE call_id = ANY(:ids)"), {"ids": list(written)}
            )
        }
        duplicates = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT state_id, call_index FROM calls "
                "WHERE state_id IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1) AS d"
            )
        ).scalar_one()
        behind = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT state_id, max(call_index) AS m FROM calls "
                "WHERE state_id IS NOT NULL GROUP BY state_id) AS r "
                "LEFT JOIN call_index_counters AS c USING (state_id) "
                "WHERE c.next_index IS NULL OR c.next_index <= r.m"
            )
        ).scalar_one()
    engine.dispose()
    with CallRecorder(url) as recorder:
        verified = recorder.verify().ok
    lost = sum(outcome["lost"] for outcome in outcomes) + len(written - present)
    return {
        "writes": len(written),
        "lost": lost,
        "duplicates": duplicates,
        "states_without_counter_past_their_calls": behind,
        "verify_ok": verified,
        "ok": lost == 0 and duplicates == 0 and behind == 0 and verified,
    }


if __name__ == "__main__":
    sys.exit(main())
