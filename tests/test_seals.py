"""Sealed states: a hash chain over each state's finished calls, whose head is
stored (and may be exported). Tampering by someone who can disable every
trigger is detected: a changed, deleted, renumbered or inserted call against
the stored heads; a rewritten stored head against the exported ones."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import rfc8785
from click.testing import CliRunner
from sqlalchemy import Connection, create_engine, text

from callindex import (
    CallRecorder,
    ImmutableSealError,
    IndexSealedError,
    UnknownStateError,
    adoption,
)
from callindex.cli import cli
from callindex.database import Database
from callindex.seals import SCHEME, Seal, read_heads

from legacy import create_legacy_database


@pytest.fixture
def trail(db_url: str) -> Iterator[CallRecorder]:
    """Two finished states of five calls, and one with a pending call."""
    with CallRecorder(db_url, auto_open=True) as recorder:
        for state_id in ("a", "b"):
            for n in range(5):
                recorder.record_call(
                    state_id, "http", "success", {"n": n}, response={"ok": n}, latency_ms=1.5 * n
                )
        recorder.begin_call("c", "llm", {"prompt": "hi"})
        yield recorder


@contextmanager
def as_superuser_without_triggers(url: str) -> Iterator[Connection]:
    """A connection on which callindex's guard triggers do not fire: PostgreSQL's
    replica mode (a superuser may set it); on SQLite the triggers are dropped
    and put back afterwards."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL session_replication_role = replica"))
                yield conn
                return
            triggers = conn.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
            ).all()
            for name, _ in triggers:
                conn.execute(text(f'DROP TRIGGER "{name}"'))
            yield conn
            for _, sql in triggers:
                conn.execute(text(sql))
    finally:
        engine.dispose()


def problems(recorder: CallRecorder, heads: list[Seal] | None = None) -> list[dict[str, Any]]:
    report = recorder.verify(seals=True, heads=heads or [])
    assert report.ok == (not report.seal_mismatches)
    return report.seal_mismatches


def test_sealing_skips_states_with_a_pending_call_and_verifies(trail: CallRecorder) -> None:
    made = trail.seal()
    assert [(s.state_id, s.last_index, s.calls) for s in made] == [("a", 4, 5), ("b", 4, 5)]
    assert trail.seal() == []  # nothing new to seal
    report = trail.verify(seals=True)
    assert report.ok and report.seals_checked == 2 and report.seal_mismatches == []


def _recomputed_head(url: str, state_id: str) -> str:
    """The chain, recomputed here from the documented formula, not the library."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            as_text = "CAST({0} AS text)" if conn.dialect.name == "postgresql" else "{0}"
            payloads = ", ".join(
                f"{as_text.format(name)} AS {name}, {name}_hash"
                for name in ("request", "response", "error")
            )
            rows = conn.execute(
                text(
                    "SELECT call_id, call_index, call_type, status, latency_ms, created_at, "
                    f"completed_at, recorded_by, hash_scheme, {payloads} FROM calls "
                    "WHERE state_id = :s ORDER BY call_index"
                ),
                {"s": state_id},
            ).all()
    finally:
        engine.dispose()
    head = hashlib.sha256(f"{SCHEME}\n{state_id}".encode()).hexdigest()
    for row in rows:
        call = row._mapping

        def utc(value: Any) -> str | None:
            if value is None:
                return None
            moment = datetime.fromisoformat(value) if isinstance(value, str) else value
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            return str(moment.astimezone(UTC).isoformat(timespec="microseconds"))

        fields = {
            "call_id": call["call_id"],
            "call_index": call["call_index"],
            "call_type": call["call_type"],
            "status": call["status"],
            "latency_ms": None if call["latency_ms"] is None else repr(float(call["latency_ms"])),
            "created_at": utc(call["created_at"]),
            "completed_at": utc(call["completed_at"]),
            "recorded_by": call["recorded_by"],
            "hash_scheme": call["hash_scheme"],
        }
        for name in ("request", "response", "error"):
            stored = call[name]
            fields[name] = None if stored is None else hashlib.sha256(stored.encode()).hexdigest()
            fields[f"{name}_hash"] = call[f"{name}_hash"]
        head = hashlib.sha256(f"{head}\n".encode() + rfc8785.dumps(fields)).hexdigest()
    return head


def test_anyone_can_recompute_a_head_from_the_table(trail: CallRecorder, db_url: str) -> None:
    (sealed, _) = trail.seal()
    assert sealed.head == _recomputed_head(db_url, "a")


def test_sealing_is_incremental(trail: CallRecorder, db_url: str) -> None:
    trail.seal(state_id="a")
    trail.record_call("a", "http", "success", {"n": 5})
    trail.record_call("a", "http", "success", {"n": 6})
    (extended,) = trail.seal(state_id="a")
    assert (extended.last_index, extended.calls) == (6, 7)
    assert extended.head == _recomputed_head(db_url, "a")  # chained to the earlier head
    assert trail.verify(seals=True).seals_checked == 2


def test_finished_before_leaves_recent_states(trail: CallRecorder) -> None:
    assert trail.seal(finished_before_seconds=3600) == []
    assert len(trail.seal(finished_before_seconds=0)) == 2


TAMPERING = {
    "a response changed": "UPDATE calls SET response = '{\"ok\":99}' "
    "WHERE state_id = 'a' AND call_index = 2",
    "a call deleted": "DELETE FROM calls WHERE state_id = 'a' AND call_index = 2",
    "the last call deleted": "DELETE FROM calls WHERE state_id = 'a' AND call_index = 4",
    "a call renumbered": "UPDATE calls SET call_index = 9 WHERE state_id = 'a' AND call_index = 1",
    "a latency changed": "UPDATE calls SET latency_ms = 0 WHERE state_id = 'a' AND call_index = 3",
    "who recorded it changed": "UPDATE calls SET recorded_by = 'someone' "
    "WHERE state_id = 'a' AND call_index = 0",
    "a timestamp made unreadable": "UPDATE calls SET completed_at = NULL "
    "WHERE state_id = 'a' AND call_index = 0",
}


@pytest.mark.parametrize("statement", TAMPERING.values(), ids=TAMPERING.keys())
def test_tampering_past_the_triggers_is_detected(
    trail: CallRecorder, db_url: str, statement: str
) -> None:
    trail.seal()
    with as_superuser_without_triggers(db_url) as conn:
        conn.exec_driver_sql(statement)
    (found,) = problems(trail)
    assert (found["state_id"], found["last_index"]) == ("a", 4)


def test_a_call_inserted_into_a_sealed_range_is_detected(trail: CallRecorder, db_url: str) -> None:
    trail.allocate_call_index("a", 3)  # indices 5..7 reserved, never used
    trail.record_call("a", "http", "success", {"n": 8})
    trail.seal()
    with as_superuser_without_triggers(db_url) as conn:
        conn.execute(
            text(
                "INSERT INTO calls (call_id, state_id, call_index, call_type, status, "
                "created_at, completed_at) VALUES ('forged', 'a', 6, 'http', 'success', "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:01')"
            )
        )
    assert [p["last_index"] for p in problems(trail)] == [8]


def test_sealing_ends_the_reservations_below_it(trail: CallRecorder) -> None:
    """A reserved index below a seal can no longer be recorded at (it would
    change the sealed chain); one above it still can."""
    first = trail.allocate_call_index("a", 3)  # 5..7
    trail.record_call("a", "http", "success", {"n": 8})
    trail.seal(state_id="a")
    with pytest.raises(IndexSealedError, match="below a seal"):
        trail.record_call("a", "http", "success", {"late": True}, call_index=first)
    later = trail.allocate_call_index("a", 1)
    assert trail.record_call("a", "http", "success", {}, call_index=later).call_index == later
    assert problems(trail) == []


def test_a_fractional_renumbering_is_detected(sqlite_url: str) -> None:
    with CallRecorder(sqlite_url, auto_open=True) as recorder:
        for n in range(3):
            recorder.record_call("a", "http", "success", {"n": n})
        recorder.seal()
        with as_superuser_without_triggers(sqlite_url) as conn:
            conn.exec_driver_sql("UPDATE calls SET call_index = 1.5 WHERE call_index = 1")
        assert len(problems(recorder)) == 1


def test_exports_of_several_runs_are_read_back(
    trail: CallRecorder, db_url: str, tmp_path: Path
) -> None:
    """`seal --json >> heads.jsonl` run after run: one line per seal."""
    runner = CliRunner()
    heads = tmp_path / "heads.jsonl"
    for state_id in ("a", "b"):
        done = runner.invoke(cli, ["seal", "--state", state_id, "--json", "--db", db_url])
        assert done.exit_code == 0, done.output
        with heads.open("a") as exported:
            exported.write(done.stdout)
    assert [s.state_id for s in read_heads(heads)] == ["a", "b"]
    verify = ["verify", "--seals", "--heads", str(heads), "--db", db_url]
    assert runner.invoke(cli, verify).exit_code == 0


def test_sealing_an_unknown_state_is_an_error(trail: CallRecorder) -> None:
    with pytest.raises(UnknownStateError):
        trail.seal(state_id="nope")


def test_a_rewritten_stored_head_is_caught_by_the_exported_heads(
    trail: CallRecorder, db_url: str
) -> None:
    exported = trail.seal()
    with as_superuser_without_triggers(db_url) as conn:
        conn.exec_driver_sql(TAMPERING["a response changed"])
    forged_head = _recomputed_head(db_url, "a")
    with as_superuser_without_triggers(db_url) as conn:
        conn.execute(
            text("UPDATE call_seals SET head = :head WHERE state_id = 'a'"), {"head": forged_head}
        )
    assert problems(trail) == []  # consistent with the rewritten head...
    (found,) = problems(trail, exported)  # ...but not with the exported one
    assert found["state_id"] == "a"
    assert found["problem"] == "the stored head differs from the exported one"


def test_a_deleted_seal_is_caught_by_the_exported_heads(trail: CallRecorder, db_url: str) -> None:
    exported = trail.seal()
    with as_superuser_without_triggers(db_url) as conn:
        conn.execute(text("DELETE FROM call_seals WHERE state_id = 'b'"))
    (found,) = problems(trail, exported)
    assert (found["state_id"], found["problem"]) == (
        "b",
        "an exported seal is missing from call_seals",
    )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE call_seals SET head = repeat('0', 64)",
        "DELETE FROM call_seals",
    ],
)
def test_a_seal_is_never_changed_or_deleted(
    trail: CallRecorder, db_url: str, statement: str
) -> None:
    trail.seal()
    db = Database(db_url)
    if db.name == "sqlite":
        statement = statement.replace("repeat('0', 64)", "'" + "0" * 64 + "'")
    with pytest.raises(ImmutableSealError), db.backend.translated(), db.engine.begin() as conn:
        conn.exec_driver_sql(statement)
    db.dispose()


def test_sqlite_insert_or_replace_cannot_rewrite_a_seal(sqlite_url: str) -> None:
    with CallRecorder(sqlite_url, auto_open=True) as recorder:
        recorder.record_call("a", "http", "success", {})
        recorder.seal()
    db = Database(sqlite_url)
    with pytest.raises(ImmutableSealError), db.backend.translated(), db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT OR REPLACE INTO call_seals (state_id, last_index, head, calls) "
                f"VALUES ('a', 0, '{'0' * 64}', 1)"
            )
        )
    db.dispose()


def test_the_command_line_exports_and_checks_heads(
    trail: CallRecorder, db_url: str, tmp_path: Path
) -> None:
    runner = CliRunner()
    sealed = runner.invoke(cli, ["seal", "--json", "--db", db_url], catch_exceptions=False)
    assert sealed.exit_code == 0
    heads = tmp_path / "heads.json"
    heads.write_text(sealed.stdout)
    assert [json.loads(line)["state_id"] for line in sealed.stdout.splitlines()] == ["a", "b"]
    verify = ["verify", "--seals", "--heads", str(heads), "--db", db_url]
    assert runner.invoke(cli, verify).exit_code == 0
    with as_superuser_without_triggers(db_url) as conn:
        conn.exec_driver_sql(TAMPERING["a call renumbered"])
    failed = runner.invoke(cli, verify)
    assert failed.exit_code == 1
    assert "sealed chains that differ" in failed.stdout and "FAIL" in failed.stdout
    assert runner.invoke(cli, ["verify", "--heads", str(heads), "--db", db_url]).exit_code == 2


def test_sealing_works_on_an_adopted_table(postgresql_empty_url: str) -> None:
    create_legacy_database(postgresql_empty_url, states=3, calls_per_state=4)
    adoption.adopt(Database(postgresql_empty_url))
    with CallRecorder(postgresql_empty_url) as recorder:
        made = recorder.seal()
        assert [(s.last_index, s.calls) for s in made] == [(3, 4)] * 3
        assert recorder.verify(seals=True).ok
    dsn = postgresql_empty_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE calls SET status = 'error' WHERE call_index = 1 AND state_id = "
                     "(SELECT min(state_id) FROM calls)")  # fmt: skip
    with CallRecorder(postgresql_empty_url) as recorder:
        assert len(recorder.verify(seals=True).seal_mismatches) == 1


def test_whoever_reads_calls_may_read_the_seals_after_the_upgrade(
    postgresql_empty_url: str, pg_admin: Any
) -> None:
    """record_call(call_index=k) reads its state's seals: migration 0011 grants
    SELECT on call_seals to every role that may read calls."""
    from callindex import migrations

    role = "callindex_test_seal_reader"
    db = Database(postgresql_empty_url)
    migrations.upgrade(db, "0010")
    with pg_admin.connect() as conn:
        conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        conn.execute(text(f"CREATE ROLE {role} NOLOGIN"))
    try:
        with db.engine.begin() as conn:
            conn.execute(text(f"GRANT SELECT ON calls TO {role}"))
        migrations.upgrade(db)
        with db.engine.connect() as conn:
            allowed = conn.execute(
                text("SELECT has_table_privilege(:role, 'call_seals', 'SELECT')"), {"role": role}
            ).scalar_one()
        assert allowed is True
    finally:
        with db.engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
        db.dispose()
        with pg_admin.connect() as conn:
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
