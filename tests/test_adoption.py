"""Adopting a legacy audit database: its rows and columns are kept, a counter
per state is backfilled past its calls, and writers keep writing meanwhile."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from callindex import AdoptionError, CallRecorder, DatabaseError, adoption, migrations, numbering
from callindex.cli import cli
from callindex.database import Database

from conftest import call_rows, counter_value
from legacy import create_legacy_database, legacy_snapshot
from workers import legacy_write_many, run_workers, write_as

STATES, PER_STATE = 5, 20


@pytest.fixture
def legacy_url(empty_db_url: str) -> str:
    create_legacy_database(empty_db_url, STATES, PER_STATE)
    return empty_db_url


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


class TestAdoptingALegacyDatabase:
    def test_rows_and_columns_are_kept_and_counters_start_past_the_calls(
        self, legacy_url: str
    ) -> None:
        before = legacy_snapshot(legacy_url)
        report = adoption.adopt(Database(legacy_url), batch_states=2)
        assert (report.calls, report.states, report.batches) == (STATES * PER_STATE + 2, 5, 3)
        assert legacy_snapshot(legacy_url) == before
        for state in range(STATES):
            assert counter_value(legacy_url, f"state-{state}") == PER_STATE
        assert counter_value(legacy_url, "operation-1") is None
        assert migrations.check(Database(legacy_url)).up_to_date
        with CallRecorder(legacy_url) as recorder:
            assert recorder.verify().ok
            call = recorder.record_call("state-0", "http", "success", {"q": 1})
            begun = recorder.begin_call("state-1", "llm", {"q": 2})
            recorder.finish_call(begun.call_id, "success", {"a": 2})
        assert (call.call_index, begun.call_index) == (PER_STATE, PER_STATE)

    def test_the_upstream_schema_is_adopted_untouched(self, legacy_url: str) -> None:
        """request_hash NOT NULL, state_id and operation_id with foreign keys to
        their parents, one-parent CHECK, partial unique indexes: as upstream
        declares them (bench/legacy.py)."""
        engine = create_engine(legacy_url)
        before = {
            "foreign_keys": inspect(engine).get_foreign_keys("calls"),
            "checks": inspect(engine).get_check_constraints("calls"),
            "request_hash": next(
                c for c in inspect(engine).get_columns("calls") if c["name"] == "request_hash"
            )["nullable"],
        }
        engine.dispose()
        assert before["request_hash"] is False
        assert {k["referred_table"] for k in before["foreign_keys"]} == {
            "node_states", "operations"
        }  # fmt: skip
        adoption.adopt(Database(legacy_url))
        with CallRecorder(legacy_url) as recorder:
            empty = recorder.record_call("state-2", "http", "success", None)
            assert empty.request_hash == hashlib.sha256(b"null").hexdigest()
            recorder.open_state("not-a-node-state")
            with pytest.raises(DatabaseError, match=r"(?i)foreign key"):
                recorder.record_call("not-a-node-state", "http", "success", {})
            assert recorder.verify(hashes=True).ok
        engine = create_engine(legacy_url)
        after_keys = inspect(engine).get_foreign_keys("calls")
        after_checks = inspect(engine).get_check_constraints("calls")
        engine.dispose()
        assert all(key in after_keys for key in before["foreign_keys"])
        assert all(check in after_checks for check in before["checks"])

    def test_adopting_again_changes_nothing(self, legacy_url: str) -> None:
        adoption.adopt(Database(legacy_url))
        with CallRecorder(legacy_url) as recorder:
            recorder.record_call("state-0", "http", "success", {})
        rows = call_rows(legacy_url)
        again = adoption.adopt(Database(legacy_url))
        assert again.states == STATES and call_rows(legacy_url) == rows
        assert counter_value(legacy_url, "state-0") == PER_STATE + 1

    def test_a_state_the_backfill_has_not_reached_still_numbers_correctly(
        self, legacy_url: str
    ) -> None:
        """Between the schema step and the backfill, the trigger and open_state
        start a missing counter past the state's calls."""
        migrations.upgrade(Database(legacy_url))
        with CallRecorder(legacy_url) as recorder:
            recorder.open_state("state-3")
            assert recorder.record_call("state-3", "http", "success", {}).call_index == PER_STATE
        adoption.backfill_counters(Database(legacy_url))
        assert counter_value(legacy_url, "state-3") == PER_STATE + 1

    def test_downgrading_keeps_the_adopted_table(self, legacy_url: str) -> None:
        before = legacy_snapshot(legacy_url)
        adoption.adopt(Database(legacy_url))
        migrations.downgrade(Database(legacy_url), "base", force=True)
        assert "call_index_counters" not in tables(legacy_url)
        assert legacy_snapshot(legacy_url) == before

    def test_the_command(self, legacy_url: str) -> None:
        result = CliRunner().invoke(cli, ["--db", legacy_url, "db", "adopt", "--batch-states", "2"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"adopted {STATES * PER_STATE + 2} calls of 5 states")
        assert not numbering.legacy_writers(Database(legacy_url))

    def test_the_command_in_legacy_writers_mode(self, legacy_url: str) -> None:
        arguments = ["--db", legacy_url, "db", "adopt", "--legacy-writers"]
        assert CliRunner().invoke(cli, arguments).exit_code == 0
        assert numbering.legacy_writers(Database(legacy_url))
        current = CliRunner().invoke(cli, ["--db", legacy_url, "db", "current"]).output
        assert current.endswith("legacy writers: on\n")


def test_sqlite_renumbering_leaves_an_integer_primary_key_to_sqlite(sqlite_empty_url: str) -> None:
    """An adopted SQLite table whose key is a rowid alias: a renumbered call is
    inserted again without it, so SQLite gives it a fresh one."""
    engine = create_engine(sqlite_empty_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE calls (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "call_id VARCHAR(64) NOT NULL UNIQUE, state_id VARCHAR(64), "
                "call_index INTEGER NOT NULL, call_type VARCHAR(32), status VARCHAR(32), "
                "created_at TIMESTAMP, UNIQUE (state_id, call_index))"
            )
        )
        conn.execute(text("INSERT INTO calls (call_id, state_id, call_index) VALUES ('a', 's', 0)"))
    engine.dispose()
    adoption.adopt(Database(sqlite_empty_url), legacy_writers=True)
    with create_engine(sqlite_empty_url).begin() as conn:
        for call_id in ("b", "c"):  # both stale: index 0 is taken
            conn.execute(
                text("INSERT INTO calls (call_id, state_id, call_index) VALUES (:id, 's', 0)"),
                {"id": call_id},
            )
        rows = conn.execute(text("SELECT id, call_id, call_index FROM calls ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [(1, "a", 0), (2, "b", 1), (3, "c", 2)]


@pytest.mark.slow
def test_the_backfill_races_writers_of_the_same_states(empty_db_url: str) -> None:
    """After the schema step, the backfill (a state per transaction) runs while
    upstream writers and callindex writers (which open their states) work the
    same states: whoever creates a state's counter, none disagrees with the
    calls, nothing is lost, nothing is numbered twice."""
    create_legacy_database(empty_db_url, states=300, calls_per_state=5)
    migrations.upgrade(Database(empty_db_url))
    states = [f"state-{n}" for n in range(0, 300, 10)]
    outcomes = run_workers(
        write_as,
        [("backfill", empty_db_url, 0.05)]
        + [("legacy", empty_db_url, states, 90, 0.002)] * 2
        + [
            ("callindex", empty_db_url, f"new-{n}", states, 90, None, 0.002, True) for n in range(2)
        ],
    )
    backfill = next(o for o in outcomes if o["kind"] == "backfill")
    assert backfill["batches"] == 300
    assert [o["lost"] for o in outcomes if o["kind"] == "legacy"] == [0, 0]
    rows = call_rows(empty_db_url)
    pairs = [(row[1], row[2]) for row in rows if row[1] is not None]
    assert len(pairs) == len(set(pairs)) == 300 * 5 + 4 * 90
    by_id = {row[0]: (row[1], row[2]) for row in rows}
    for outcome in outcomes:
        if outcome["kind"] == "callindex":
            for call_id, (state_id, index) in outcome["acknowledged"].items():
                assert by_id[call_id] == (state_id, index)
    with CallRecorder(empty_db_url) as recorder:
        assert recorder.verify().ok
    for state in states:
        assert counter_value(empty_db_url, state) == max(r[2] for r in rows if r[1] == state) + 1


def test_a_table_with_only_the_key_columns_is_adopted(empty_db_url: str) -> None:
    engine = create_engine(empty_db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE calls (call_id VARCHAR(64) PRIMARY KEY, state_id VARCHAR(64), "
                "call_index INTEGER NOT NULL CHECK (call_index >= 0), "
                "UNIQUE (state_id, call_index))"
            )
        )
        conn.execute(text("INSERT INTO calls VALUES ('old', 's', 0)"))
    engine.dispose()
    assert adoption.adopt(Database(empty_db_url)).states == 1
    with CallRecorder(empty_db_url) as recorder:
        begun = recorder.begin_call("s", "http", {})
        assert begun.call_index == 1
        assert recorder.verify(pending_threshold_seconds=3600).ok


class TestWhatCannotBeAdopted:
    def assert_nothing_written(self, url: str, before: set[str]) -> None:
        assert tables(url) == before

    def test_no_calls_table(self, empty_db_url: str) -> None:
        if empty_db_url.startswith("sqlite"):
            Database(empty_db_url).prepare_file()
        with pytest.raises(AdoptionError, match=r"no calls table .* `callindex db upgrade`"):
            adoption.adopt(Database(empty_db_url))
        self.assert_nothing_written(empty_db_url, set())

    def test_no_unique_index_on_state_and_index(self, legacy_url: str) -> None:
        with create_engine(legacy_url).begin() as conn:
            conn.execute(text("DROP INDEX ix_calls_state_call_index_unique"))
        with pytest.raises(AdoptionError, match=r"no unique index on \(state_id, call_index\)"):
            adoption.adopt(Database(legacy_url))
        self.assert_nothing_written(legacy_url, {"calls", "node_states", "operations"})

    def test_a_not_null_column_callindex_would_leave_empty(self, empty_db_url: str) -> None:
        engine = create_engine(empty_db_url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TABLE calls (call_id VARCHAR(64) PRIMARY KEY, state_id VARCHAR(64), "
                    "call_index INTEGER NOT NULL, call_type VARCHAR(32) NOT NULL, "
                    "status VARCHAR(32) NOT NULL, request_hash VARCHAR(64) NOT NULL, "
                    "tenant VARCHAR(64) NOT NULL, "
                    "created_at TIMESTAMP NOT NULL, UNIQUE (state_id, call_index))"
                )
            )
        engine.dispose()
        # request_hash is always written (a request without a payload has the
        # hash of its canonical null); tenant is not.
        with pytest.raises(AdoptionError, match=r"calls\.tenant is NOT NULL without a default"):
            adoption.adopt(Database(empty_db_url))
        self.assert_nothing_written(empty_db_url, {"calls"})

    @pytest.mark.parametrize(
        ("definition", "refusal"),
        [
            (
                "call_id VARCHAR(64) PRIMARY KEY, state_id BIGINT, call_index INTEGER NOT NULL, "
                "UNIQUE (state_id, call_index)",
                "calls.state_id is BIGINT, not text",
            ),
            (
                "call_id VARCHAR(64) PRIMARY KEY, state_id VARCHAR(64), call_index INTEGER, "
                "status VARCHAR(16) CONSTRAINT legacy_status CHECK (status IN ('ok', 'failed')), "
                "UNIQUE (state_id, call_index)",
                "CHECK constraint legacy_status",
            ),
            (
                "call_id VARCHAR(64) PRIMARY KEY, state_id VARCHAR(64), "
                "call_index INTEGER CONSTRAINT from_one CHECK (call_index >= 1), "
                "UNIQUE (state_id, call_index)",
                "CHECK constraint from_one",
            ),
        ],
    )
    def test_columns_callindex_cannot_write_into(
        self, empty_db_url: str, definition: str, refusal: str
    ) -> None:
        engine = create_engine(empty_db_url)
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE calls ({definition})"))
        engine.dispose()
        with pytest.raises(AdoptionError, match=refusal):
            adoption.adopt(Database(empty_db_url))
        # The migrations refuse it the same way, and roll back whole.
        with pytest.raises(AdoptionError, match=refusal):
            migrations.upgrade(Database(empty_db_url))
        self.assert_nothing_written(empty_db_url, {"calls"})

    def test_through_an_applications_alembic_nothing_is_left_behind(self, legacy_url: str) -> None:
        """upgrade_with refuses the same way; on SQLite, whose DDL on such a
        connection is not transactional, the check runs before anything is created."""
        engine = create_engine(legacy_url)
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_calls_state_call_index_unique"))
        with engine.connect() as conn, pytest.raises(AdoptionError, match="no unique index"):
            migrations.upgrade_with(conn)
        assert "call_index_counters" not in tables(legacy_url)
        with engine.begin() as conn:
            conn.execute(text("CREATE UNIQUE INDEX legacy_unique ON calls (state_id, call_index)"))
        with engine.connect() as conn:
            migrations.upgrade_with(conn)
        engine.dispose()
        assert migrations.check(Database(legacy_url)).up_to_date

    def test_a_database_callindex_created(self, db_url: str) -> None:
        with pytest.raises(AdoptionError, match="created by callindex"):
            adoption.check(Database(db_url))

    def test_a_bad_batch_size(self, legacy_url: str) -> None:
        with pytest.raises(ValueError, match="batch_states"):
            adoption.adopt(Database(legacy_url), batch_states=0)


@pytest.mark.slow
def test_writers_keep_writing_during_the_adoption(empty_db_url: str) -> None:
    """Two upstream writers insert all through an adoption of 8,000 calls in
    legacy-writers mode;
    none is lost, none duplicated, and every counter ends past its calls.
    (Each writer has states of its own: before the adoption, two upstream
    writers of one state collide, which is the bug callindex fixes.)"""
    create_legacy_database(empty_db_url, states=400, calls_per_state=20)
    states = [f"state-{n}" for n in range(0, 400, 7)]
    halves = [states[0::2], states[1::2]]
    reports: list[adoption.AdoptionReport] = []

    def adopt_soon() -> None:
        time.sleep(0.5)
        reports.append(adoption.adopt(Database(empty_db_url), batch_states=25, legacy_writers=True))

    adopter = threading.Thread(target=adopt_soon)
    adopter.start()
    outcomes = run_workers(legacy_write_many, [(empty_db_url, half, 150, 0.01) for half in halves])
    adopter.join()
    assert reports and reports[0].batches == 16
    assert [o["lost"] for o in outcomes] == [0, 0]
    rows = call_rows(empty_db_url)
    assert len(rows) == 400 * 20 + 2 + 300
    assert {c for o in outcomes for c in o["recorded"]} <= {row[0] for row in rows}
    with CallRecorder(empty_db_url) as recorder:
        assert recorder.verify().ok
    for state in states:
        indices = [row[2] for row in rows if row[1] == state]
        assert counter_value(empty_db_url, state) == max(indices) + 1


def test_a_bad_lock_timeout_is_a_usage_error(legacy_url: str) -> None:
    result = CliRunner().invoke(cli, ["--db", legacy_url, "db", "adopt", "--lock-timeout", "soon"])
    assert result.exit_code == 2 and "not a duration" in result.output
    assert "call_index_counters" not in tables(legacy_url)
