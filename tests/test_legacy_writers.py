"""Writers that pick their own indices, during a rolling deploy: in
legacy-writers mode the numbering trigger makes the state's counter the
single source of truth for every insert into calls, callindex's or not.
Both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, exc, text

from callindex import CallRecorder, adoption, migrations
from callindex.database import Database

from conftest import call_rows, counter_value
from legacy import create_legacy_database
from workers import run_workers, write_as


@pytest.fixture(autouse=True)
def legacy_writers_mode(request: pytest.FixtureRequest) -> None:
    """Every database of these tests is in legacy-writers mode."""
    for name in ("db_url", "postgresql_url", "sqlite_url"):
        if name in request.fixturenames:
            database = Database(request.getfixturevalue(name))
            migrations.set_legacy_writers(database, True)
            database.dispose()


def insert(url: str, call_id: str, state_id: str, call_index: int | None) -> None:
    with CallRecorder(url) as recorder, recorder.engine.begin() as conn:
        if call_index is None:
            conn.execute(
                text(
                    "INSERT INTO calls (call_id, state_id, call_type, status) "
                    "VALUES (:id, :state, 'http', 'success')"
                ),
                {"id": call_id, "state": state_id},
            )
        else:
            conn.execute(
                text(
                    "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
                    "VALUES (:id, :state, :index, 'http', 'success')"
                ),
                {"id": call_id, "state": state_id, "index": call_index},
            )


def index_of(url: str, call_id: str) -> int:
    return {row[0]: row[2] for row in call_rows(url)}[call_id]


class TestTheTrigger:
    def test_an_insert_without_an_index_gets_the_counters_next(
        self, recorder: CallRecorder, db_url: str
    ) -> None:
        recorder.open_state("s")
        recorder.record_call("s", "http", "success", {})
        insert(db_url, "bare", "s", None)
        assert index_of(db_url, "bare") == 1
        assert counter_value(db_url, "s") == 2
        assert recorder.record_call("s", "http", "success", {}).call_index == 2

    def test_an_index_ahead_of_the_counter_moves_it_past(
        self, recorder: CallRecorder, db_url: str
    ) -> None:
        recorder.open_state("s")
        insert(db_url, "ahead", "s", 7)
        assert index_of(db_url, "ahead") == 7
        assert counter_value(db_url, "s") == 8
        assert recorder.record_call("s", "http", "success", {}).call_index == 8
        report = recorder.verify()
        assert report.ok and report.gaps == [
            {"state_id": "s", "first_missing": 0, "last_missing": 6}
        ]

    def test_a_taken_index_is_renumbered_not_refused(
        self, recorder: CallRecorder, db_url: str
    ) -> None:
        recorder.open_state("s")
        first = recorder.record_call("s", "http", "success", {})
        insert(db_url, "stale", "s", first.call_index)  # a legacy writer's stale MAX + 1
        assert index_of(db_url, "stale") == 1
        assert index_of(db_url, first.call_id) == 0
        assert counter_value(db_url, "s") == 2

    def test_a_free_index_below_the_counter_is_kept(
        self, recorder: CallRecorder, db_url: str
    ) -> None:
        recorder.open_state("s")
        recorder.allocate_call_index("s", 5)  # 0..4 reserved, none recorded
        insert(db_url, "reserved", "s", 3)
        assert index_of(db_url, "reserved") == 3
        assert counter_value(db_url, "s") == 5

    def test_a_state_without_a_counter_gets_one_past_its_calls(self, db_url: str) -> None:
        insert(db_url, "first", "new", 4)
        assert counter_value(db_url, "new") == 5
        insert(db_url, "second", "new", None)
        assert index_of(db_url, "second") == 5

    def test_open_state_starts_past_calls_already_recorded(
        self, recorder: CallRecorder, db_url: str
    ) -> None:
        insert(db_url, "before", "s", 9)
        recorder.open_state("s")
        assert recorder.record_call("s", "http", "success", {}).call_index == 10

    def test_an_index_far_ahead_of_the_counter_is_refused(
        self, recorder: CallRecorder, db_url: str
    ) -> None:
        recorder.open_state("s")
        with pytest.raises(exc.DBAPIError, match="more than 1000000 ahead"):
            insert(db_url, "far", "s", 1_000_001)
        with pytest.raises(exc.DBAPIError, match="by at most 1000000 at a time"):
            insert(db_url, "edge", "s", 1_000_000)  # the counter would move 1,000,001
        insert(db_url, "near", "s", 999_999)
        assert counter_value(db_url, "s") == 1_000_000


def test_postgresql_repeatable_read_writer_is_told_to_retry_not_refused(
    postgresql_url: str,
) -> None:
    """A REPEATABLE READ writer whose snapshot misses the state's last insert
    gets a serialization failure (retry), never a unique violation (a lost call)."""
    with CallRecorder(postgresql_url) as recorder:
        recorder.open_state("s")
        recorder.allocate_call_index("s", 5)  # 0..4 reserved, free below the counter
    engine = create_engine(postgresql_url, isolation_level="REPEATABLE READ")
    try:
        with engine.connect() as stale:
            stale.execute(text("SELECT count(*) FROM calls"))  # its snapshot starts here
            insert(postgresql_url, "first", "s", 3)
            with pytest.raises(exc.OperationalError) as raised:
                stale.execute(
                    text(
                        "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
                        "VALUES ('second', 's', 3, 'http', 'success')"
                    )
                )
            assert raised.value.orig.sqlstate == "40001"  # type: ignore[union-attr]
            stale.rollback()
            stale.execute(
                text(
                    "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
                    "VALUES ('second', 's', 3, 'http', 'success')"
                )
            )
            stale.commit()
    finally:
        engine.dispose()
    assert index_of(postgresql_url, "first") == 3
    assert index_of(postgresql_url, "second") == 5


@pytest.fixture(params=["sqlite", "postgresql"])
def adopted_url(request: pytest.FixtureRequest) -> str:
    """A legacy database (3 states of 20 calls) adopted by callindex."""
    url: str = request.getfixturevalue(f"{request.param}_empty_url")
    create_legacy_database(url, states=3, calls_per_state=20)
    adoption.adopt(Database(url), legacy_writers=True)
    return url


@pytest.mark.slow
def test_legacy_and_callindex_writers_share_states_without_loss(adopted_url: str) -> None:
    """Two upstream writers (own MAX + 1 counters) and two callindex writers,
    each a process, on the same three states at once."""
    states = ["state-0", "state-1", "state-2"]
    per_worker = 120
    outcomes = run_workers(
        write_as,
        [("legacy", adopted_url, states, per_worker)] * 2
        + [("callindex", adopted_url, f"new-{n}", states, per_worker) for n in range(2)],
    )
    legacy_outcomes = [o for o in outcomes if o["kind"] == "legacy"]
    callindex_outcomes = [o for o in outcomes if o["kind"] == "callindex"]
    assert [o["lost"] for o in legacy_outcomes] == [0, 0]
    rows = call_rows(adopted_url)
    by_id = {row[0]: row for row in rows}
    assert len(by_id) == len(rows)
    pairs = [(row[1], row[2]) for row in rows if row[1] is not None]
    assert len(pairs) == len(set(pairs)), "a (state_id, call_index) was recorded twice"
    written = [c for o in legacy_outcomes for c in o["recorded"]]
    assert len(written) == 2 * per_worker and all(c in by_id for c in written)
    for outcome in callindex_outcomes:
        for call_id, (state_id, call_index) in outcome["acknowledged"].items():
            assert by_id[call_id][1:3] == (state_id, call_index)
    assert len(rows) == 3 * 20 + 2 + 4 * per_worker
    with CallRecorder(adopted_url) as recorder:
        report = recorder.verify()
    assert report.ok, report
    for state_id in states:
        indices = sorted(row[2] for row in rows if row[1] == state_id)
        assert counter_value(adopted_url, state_id) == indices[-1] + 1
