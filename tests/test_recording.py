"""Recording calls: allocate-and-insert in one transaction, two-phase calls,
exactly once per call_id, and a trail the database itself keeps immutable."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import psycopg
import pytest
from sqlalchemy import exc, text

from callindex import (
    CallAlreadyFinishedError,
    CallIdConflictError,
    CallRecorder,
    CounterBehindError,
    IndexNotReservedError,
    IndexTakenError,
    InvalidCallError,
    UnknownCallError,
    UnknownStateError,
    migrations,
)
from callindex.database import Database
from callindex.retry import DatabaseRetryPolicy

from conftest import (
    assert_trail_sound,
    call_rows,
    counter_count,
    counter_value,
    insert_bypassing_the_counter,
)
from workers import record_many, run_workers


@pytest.fixture
def opened(recorder: CallRecorder) -> CallRecorder:
    recorder.open_state("s1")
    return recorder


def sha256_of(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class TestRecordCall:
    def test_indices_are_consecutive_and_the_call_comes_back(self, opened: CallRecorder) -> None:
        first = opened.record_call(
            "s1", "http", "success", {"url": "https://x/1"}, {"ok": True}, latency_ms=12.5
        )
        second = opened.record_call("s1", "llm", "error", {"m": "hi"}, error={"type": "Boom"})
        assert (first.call_index, second.call_index) == (0, 1)
        assert first.status == "success" and first.latency_ms == 12.5
        assert first.request == {"url": "https://x/1"} and first.response == {"ok": True}
        assert first.request_hash == sha256_of({"url": "https://x/1"})
        assert first.response_hash == sha256_of({"ok": True})
        assert second.error == {"type": "Boom"} and second.error_hash == sha256_of({"type": "Boom"})
        assert first.completed_at is not None and first.created_at <= first.completed_at
        assert [c.call_id for c in opened.calls("s1")] == [first.call_id, second.call_id]

    def test_interleaves_with_allocate_call_index(self, opened: CallRecorder) -> None:
        assert opened.allocate_call_index("s1") == 0
        assert opened.record_call("s1", "http", "success", {}).call_index == 1
        assert opened.allocate_call_index("s1") == 2

    def test_the_same_call_id_is_recorded_once(self, opened: CallRecorder, db_url: str) -> None:
        first = opened.record_call("s1", "http", "success", {"a": 1}, call_id="call-1")
        again = opened.record_call("s1", "http", "success", {"a": 1}, call_id="call-1")
        assert again == first
        assert len(call_rows(db_url)) == 1
        assert counter_value(db_url, "s1") == 1  # no index burned by the retry
        assert opened.record_call("s1", "http", "success", {"a": 2}).call_index == 1

    def test_a_call_id_reused_for_another_call_is_refused(self, opened: CallRecorder) -> None:
        opened.record_call("s1", "http", "success", {"a": 1}, call_id="call-1")
        opened.open_state("s2")
        for state_id, call_type, request in [
            ("s2", "http", {"a": 1}),
            ("s1", "llm", {"a": 1}),
            ("s1", "http", {"a": 2}),
        ]:
            with pytest.raises(CallIdConflictError, match="call-1"):
                opened.record_call(state_id, call_type, "success", request, call_id="call-1")

    def test_an_unknown_state_writes_nothing(self, recorder: CallRecorder, db_url: str) -> None:
        with pytest.raises(UnknownStateError):
            recorder.record_call("nope", "http", "success", {})
        with pytest.raises(UnknownStateError):
            recorder.begin_call("nope", "http", {})
        assert call_rows(db_url) == []


class TestTwoPhaseCalls:
    def test_begin_writes_a_pending_row_with_its_index(self, opened: CallRecorder) -> None:
        call = opened.begin_call("s1", "llm", {"prompt": "hi"})
        assert (call.call_index, call.status, call.completed_at) == (0, "pending", None)
        assert opened.calls("s1") == [call]

    def test_finish_completes_it_once(self, opened: CallRecorder) -> None:
        begun = opened.begin_call("s1", "llm", {"prompt": "hi"})
        done = opened.finish_call(begun.call_id, "success", {"text": "hello"}, latency_ms=80)
        assert (done.call_index, done.status, done.response) == (0, "success", {"text": "hello"})
        assert done.latency_ms == 80 and done.completed_at is not None
        assert (
            opened.finish_call(begun.call_id, "success", {"text": "hello"}, latency_ms=80) == done
        )
        with pytest.raises(CallAlreadyFinishedError, match="already success"):
            opened.finish_call(begun.call_id, "error", error={"type": "Late"})

    def test_begin_is_idempotent_on_call_id(self, opened: CallRecorder, db_url: str) -> None:
        first = opened.begin_call("s1", "http", {"u": 1}, call_id="b-1")
        assert opened.begin_call("s1", "http", {"u": 1}, call_id="b-1") == first
        assert counter_value(db_url, "s1") == 1

    def test_finishing_an_unknown_call(self, opened: CallRecorder) -> None:
        with pytest.raises(UnknownCallError, match="ghost"):
            opened.finish_call("ghost", "success")

    def test_an_abandoned_call_cannot_be_finished(self, opened: CallRecorder) -> None:
        begun = opened.begin_call("s1", "http", {})
        swept = opened.sweep(0)
        assert [s["call_id"] for s in swept] == [begun.call_id]
        assert opened.calls("s1")[0].status == "abandoned"
        with pytest.raises(CallAlreadyFinishedError, match="abandoned"):
            opened.finish_call(begun.call_id, "success")

    def test_sweep_leaves_recent_pending_calls_alone(self, opened: CallRecorder) -> None:
        begun = opened.begin_call("s1", "http", {})
        assert opened.sweep(3600) == []
        assert opened.finish_call(begun.call_id, "success").status == "success"

    @pytest.mark.parametrize("prefix", ["run-1/", "run-1/%", "run-_/"])
    def test_sweep_of_a_state_prefix_leaves_other_states_alone(
        self, recorder: CallRecorder, prefix: str
    ) -> None:
        """The prefix is matched literally: LIKE's wildcards mean nothing here."""
        for state_id in ("run-1/a", "run-10/a", "run-1%/a", "other"):
            recorder.open_state(state_id)
            recorder.begin_call(state_id, "http", {}, call_id=f"pending:{state_id}")
        swept = {s["state_id"] for s in recorder.sweep(0, state_prefix=prefix)}
        assert swept == {"run-1/a"} if prefix == "run-1/" else swept == set()
        assert {s["state_id"] for s in recorder.sweep(0)} == {"run-10/a", "run-1%/a", "other"} | (
            set() if prefix == "run-1/" else {"run-1/a"}
        )


class TestTheDatabaseGuardsTheTrail:
    """Enforced by triggers, so writers that bypass callindex are held too."""

    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE calls SET status = 'error' WHERE call_id = 'done'",
            "UPDATE calls SET response = NULL WHERE call_id = 'done'",
            "UPDATE calls SET call_index = 7 WHERE call_id = 'done'",
            "DELETE FROM calls WHERE call_id = 'done'",
            "DELETE FROM calls WHERE call_id = 'open'",
            "UPDATE calls SET request = NULL WHERE call_id = 'open'",
            "UPDATE calls SET call_index = 9 WHERE call_id = 'open'",
            "UPDATE calls SET status = 'success' WHERE call_id = 'open'",  # no completed_at
            "UPDATE call_index_counters SET next_index = 0",
            "DELETE FROM call_index_counters WHERE state_id = 'empty'",
        ],
    )
    def test_refused(self, opened: CallRecorder, db_url: str, statement: str) -> None:
        opened.record_call("s1", "http", "success", {"a": 1}, {"b": 2}, call_id="done")
        opened.begin_call("s1", "http", {"a": 1}, call_id="open")
        opened.open_state("empty")
        before = (call_rows(db_url), counter_value(db_url, "s1"), counter_value(db_url, "empty"))
        with pytest.raises(exc.DBAPIError, match="callindex: "), opened.engine.begin() as conn:
            conn.execute(text(statement))
        assert (call_rows(db_url), counter_value(db_url, "s1"), counter_value(db_url, "empty")) == (
            before
        )

    @pytest.mark.parametrize("table", ["calls", "call_index_counters"])
    def test_postgresql_refuses_truncate(self, postgresql_url: str, table: str) -> None:
        with CallRecorder(postgresql_url) as recorder:
            recorder.open_state("s1")
            recorder.record_call("s1", "http", "success", {})
            with (
                pytest.raises(exc.DBAPIError, match=r"cannot be truncated|never deleted"),
                recorder.engine.begin() as conn,
            ):
                conn.execute(text(f"TRUNCATE {table} CASCADE"))
        assert len(call_rows(postgresql_url)) == 1

    def test_sqlite_refuses_insert_or_replace_of_a_call_id(self, sqlite_url: str) -> None:
        with CallRecorder(sqlite_url) as recorder:
            recorder.open_state("s1")
            recorder.record_call("s1", "http", "success", {}, call_id="done")
            before = call_rows(sqlite_url)
            with (
                pytest.raises(exc.DBAPIError, match="callindex: "),
                recorder.engine.begin() as conn,
            ):
                conn.execute(
                    text(
                        "INSERT OR REPLACE INTO calls (call_id, state_id, call_index, call_type, "
                        "status) VALUES ('done', 's1', 5, 'http', 'error')"
                    )
                )
        assert call_rows(sqlite_url) == before

    def test_sqlite_insert_or_replace_on_a_taken_index_is_refused(self, sqlite_url: str) -> None:
        with CallRecorder(sqlite_url) as recorder:
            recorder.open_state("s1")
            recorder.record_call("s1", "http", "success", {}, call_id="done")
            before = call_rows(sqlite_url)
            with (
                pytest.raises(exc.DBAPIError, match=r"callindex: \[CX005\] call_index taken"),
                recorder.engine.begin() as conn,
            ):
                conn.execute(
                    text(
                        "INSERT OR REPLACE INTO calls (call_id, state_id, call_index, call_type, "
                        "status) VALUES ('other', 's1', 0, 'http', 'error')"
                    )
                )
        assert call_rows(sqlite_url) == before

    def test_sqlite_insert_or_replace_on_a_taken_index_in_legacy_writers_mode_renumbers(
        self, sqlite_url: str
    ) -> None:
        database = Database(sqlite_url)
        migrations.set_legacy_writers(database, True)
        database.dispose()
        with CallRecorder(sqlite_url) as recorder:
            recorder.open_state("s1")
            recorder.record_call("s1", "http", "success", {}, call_id="done")
            before = call_rows(sqlite_url)
            with recorder.engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT OR REPLACE INTO calls (call_id, state_id, call_index, call_type, "
                        "status) VALUES ('other', 's1', 0, 'http', 'error')"
                    )
                )
            after = call_rows(sqlite_url)
        assert after[: len(before)] == before
        assert [(row[0], row[2]) for row in after[len(before) :]] == [("other", 1)]

    def test_a_pending_call_may_be_finished_by_sql(self, opened: CallRecorder) -> None:
        opened.begin_call("s1", "http", {"a": 1}, call_id="open")
        with opened.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE calls SET status = 'success', completed_at = CURRENT_TIMESTAMP "
                    "WHERE call_id = 'open'"
                )
            )
        assert opened.calls("s1")[0].status == "success"


class TestCounterBehindItsCalls:
    """A counter falls behind when calls are written past it: by a writer that
    does not use callindex outside legacy-writers mode, or past the numbering
    trigger (PostgreSQL's replica mode, SQLite with the trigger dropped)."""

    def test_a_collision_is_reported_and_not_retried(self, db_url: str) -> None:
        patient = DatabaseRetryPolicy(max_attempts=50, max_seconds=60)
        with CallRecorder(db_url, retry=patient) as recorder:
            recorder.open_state("s1")
            insert_bypassing_the_counter(db_url, "legacy", "s1", 0)
            with pytest.raises(CounterBehindError, match="callindex repair"):
                recorder.record_call("s1", "http", "success", {})
            assert counter_value(db_url, "s1") == 0

    def test_sqlite_in_legacy_writers_mode_renumbers_the_call_past_it(
        self, sqlite_url: str
    ) -> None:
        database = Database(sqlite_url)
        migrations.set_legacy_writers(database, True)
        database.dispose()
        with CallRecorder(sqlite_url) as recorder:
            recorder.open_state("s1")
            insert_bypassing_the_counter(sqlite_url, "legacy", "s1", 0)
            call = recorder.record_call("s1", "http", "success", {})
            assert call.call_index == 1
            assert recorder.get_call(call.call_id) == call
            assert recorder.verify().ok

    def test_verify_reports_it_and_repair_moves_the_counter_forward(
        self, opened: CallRecorder, db_url: str
    ) -> None:
        insert_bypassing_the_counter(db_url, "legacy", "s1", 0)
        report = opened.verify()
        assert not report.ok
        assert report.counters_behind == [{"state_id": "s1", "next_index": 0, "max_index": 0}]
        assert opened.repair() == [{"state_id": "s1", "next_index": 1}]
        assert opened.repair() == []
        assert opened.record_call("s1", "http", "success", {}).call_index == 1
        assert opened.verify().ok


class TestVerify:
    def test_a_clean_trail(self, opened: CallRecorder, db_url: str) -> None:
        acknowledged = {}
        for n in range(3):
            call = opened.record_call("s1", "http", "success", {"n": n})
            acknowledged[call.call_id] = ("s1", call.call_index)
        assert_trail_sound(db_url, acknowledged)
        report = opened.verify()
        assert report.calls_by_status == {"success": 3} and report.gaps == []

    def test_gaps_and_unused_reservations_are_listed_with_their_cause(
        self, opened: CallRecorder
    ) -> None:
        opened.record_call("s1", "http", "success", {})
        opened.allocate_call_index("s1", count=3)
        opened.record_call("s1", "http", "success", {})
        opened.allocate_call_index("s1")
        report = opened.verify()
        assert report.ok
        assert report.gaps == [{"state_id": "s1", "first_missing": 1, "last_missing": 3}]
        assert report.unused_reservations == [
            {"state_id": "s1", "first_unused": 5, "last_unused": 5}
        ]
        assert "allocate_call_index" in report.as_json()["gap_cause"]

    def test_old_pending_calls_are_reported(self, opened: CallRecorder) -> None:
        begun = opened.begin_call("s1", "http", {})
        assert opened.verify(pending_threshold_seconds=3600).stale_pending == []
        stale = opened.verify(pending_threshold_seconds=0).stale_pending
        assert [s["call_id"] for s in stale] == [begun.call_id]


def test_allocating_for_several_states_at_once(opened: CallRecorder) -> None:
    opened.open_state("s2")
    assert opened.allocate_call_indices({"s2": 2, "s1": 3}) == {"s1": 0, "s2": 0}
    assert opened.allocate_call_indices({"s1": 1, "s2": 1}) == {"s1": 3, "s2": 2}
    with pytest.raises(UnknownStateError):
        opened.allocate_call_indices({"s1": 1, "zz-unknown": 1})
    assert opened.allocate_call_index("s1") == 4  # the failed pair rolled back whole


class TestRepeatingACallIdWithAnotherOutcome:
    def test_record_call_on_a_pending_call_is_refused(self, opened: CallRecorder) -> None:
        opened.begin_call("s1", "http", {"a": 1}, call_id="c")
        with pytest.raises(CallIdConflictError, match="finish it with finish_call"):
            opened.record_call("s1", "http", "success", {"a": 1}, {"ok": 1}, call_id="c")
        assert opened.calls("s1")[0].status == "pending"

    def test_record_call_with_another_outcome_is_refused(self, opened: CallRecorder) -> None:
        opened.record_call("s1", "http", "success", {"a": 1}, {"ok": 1}, call_id="c")
        with pytest.raises(CallIdConflictError, match="another outcome"):
            opened.record_call("s1", "http", "error", {"a": 1}, error={"e": 1}, call_id="c")

    def test_begin_call_repeated_after_the_call_finished_returns_it(
        self, opened: CallRecorder
    ) -> None:
        begun = opened.begin_call("s1", "http", {"a": 1}, call_id="c")
        done = opened.finish_call("c", "success")
        assert opened.begin_call("s1", "http", {"a": 1}, call_id="c") == done != begun


class TestAResultLostAfterCommit:
    """The connection breaks after the database committed but before the caller
    heard back: the retry finds the committed call instead of writing another."""

    @pytest.fixture
    def break_once_after(self, monkeypatch: pytest.MonkeyPatch) -> Any:
        """Lose the reply of the first write whose SQL holds a marker, after it
        committed: the backend's driver connection raises a lost connection
        right after the statement (PostgreSQL, autocommit) or the COMMIT
        (SQLite) went through."""
        broken: list[str] = []

        class Losing:
            def __init__(self, conn: Any, markers: tuple[str, ...]) -> None:
                self._conn = conn
                self._markers = markers
                self._pending = False

            def __getattr__(self, name: str) -> Any:
                return getattr(self._conn, name)

            def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
                done = self._conn.execute(query, *args, **kwargs)
                marked = any(m in query for m in self._markers) and not broken
                committed = isinstance(self._conn, psycopg.Connection) or query == "COMMIT"
                self._pending = self._pending or marked
                if self._pending and committed:
                    broken.append(query)
                    self._pending = False
                    raise psycopg.OperationalError("server closed the connection unexpectedly")
                return done

        def install(recorder: CallRecorder, *markers: str) -> list[str]:
            pool = recorder._db.backend.pool
            acquire, release = pool.acquire, pool.release
            monkeypatch.setattr(pool, "acquire", lambda: Losing(acquire(), markers))
            monkeypatch.setattr(pool, "release", lambda conn: release(getattr(conn, "_conn", conn)))
            return broken

        return install

    def test_record_call(self, opened: CallRecorder, db_url: str, break_once_after: Any) -> None:
        broken = break_once_after(opened, "INSERT INTO calls")
        call = opened.record_call("s1", "http", "success", {"a": 1}, call_id="lost-ack")
        assert broken, "the fault was never injected"
        assert (call.call_id, call.call_index) == ("lost-ack", 0)
        assert call_rows(db_url) == [("lost-ack", "s1", 0, "success")]
        assert counter_value(db_url, "s1") == 1

    def test_finish_call(self, opened: CallRecorder, db_url: str, break_once_after: Any) -> None:
        opened.begin_call("s1", "http", {"a": 1}, call_id="lost-ack")
        broken = break_once_after(opened, "UPDATE calls", "callindex_finish_call_v2(")
        done = opened.finish_call("lost-ack", "success", {"ok": True})
        assert broken and done.status == "success" and done.response == {"ok": True}
        assert call_rows(db_url) == [("lost-ack", "s1", 0, "success")]


@pytest.mark.parametrize("call_type", ["sql", "filesystem", "vector", "http_redirect", "a" * 32])
def test_any_short_identifier_is_a_call_type(opened: CallRecorder, call_type: str) -> None:
    """The call shapes of the framework callindex replaces record as they are."""
    call = opened.record_call("s1", call_type, "success", {"q": 1})
    assert opened.get_call(call.call_id) == call
    assert call.call_type == call_type


class TestRecordingAtAReservedIndex:
    """The upstream pattern: allocate an index, make the call, record it at
    that index. Never moved: an index not reserved, or taken, is refused."""

    def test_allocate_then_record(self, opened: CallRecorder, db_url: str) -> None:
        first = opened.allocate_call_index("s1", 3)
        later = opened.record_call("s1", "http", "success", {"q": 2}, call_index=first + 2)
        earlier = opened.record_call("s1", "llm", "success", {"q": 0}, call_index=first)
        assert (earlier.call_index, later.call_index) == (0, 2)
        assert opened.get_call(later.call_id) == later
        assert opened.record_call("s1", "http", "success", {}).call_index == 3
        assert counter_value(db_url, "s1") == 4

    def test_an_index_never_handed_out_is_refused(self, opened: CallRecorder, db_url: str) -> None:
        opened.allocate_call_index("s1")
        with pytest.raises(IndexNotReservedError, match="never handed out"):
            opened.record_call("s1", "http", "success", {}, call_index=1)
        assert call_rows(db_url) == []
        assert counter_value(db_url, "s1") == 1

    def test_a_taken_index_is_refused_not_moved(self, opened: CallRecorder, db_url: str) -> None:
        taken = opened.record_call("s1", "http", "success", {"q": 1})
        with pytest.raises(IndexTakenError, match="taken"):
            opened.record_call("s1", "http", "success", {"q": 2}, call_index=taken.call_index)
        assert [row[0] for row in call_rows(db_url)] == [taken.call_id]

    def test_unknown_state_and_bad_index(self, opened: CallRecorder) -> None:
        with pytest.raises(UnknownStateError):
            opened.record_call("never", "http", "success", {}, call_index=0)
        for bad in (-1, True, 1.0, "0"):
            with pytest.raises(InvalidCallError):
                opened.record_call("s1", "http", "success", {}, call_index=bad)  # type: ignore[arg-type]

    def test_idempotent_on_call_id(self, opened: CallRecorder) -> None:
        index = opened.allocate_call_index("s1", 2)
        call = opened.record_call("s1", "http", "success", {}, call_id="c", call_index=index)
        again = opened.record_call("s1", "http", "success", {}, call_id="c", call_index=index)
        assert again == call
        with pytest.raises(CallIdConflictError):
            opened.record_call("s1", "http", "success", {}, call_id="c", call_index=index + 1)


class TestAutoOpen:
    """``CallRecorder(url, auto_open=True)``: a state never opened is opened by
    the first allocation or call; the default stays strict."""

    def test_every_write_opens_its_state(self, db_url: str) -> None:
        with CallRecorder(db_url, auto_open=True) as recorder:
            assert recorder.allocate_call_index("a", 2) == 0
            assert recorder.record_call("b", "sql", "success", {}).call_index == 0
            assert recorder.begin_call("c", "http", {}).call_index == 0
            assert recorder.allocate_call_indices({"d": 1, "e": 3, "a": 1}) == {
                "a": 2,
                "d": 0,
                "e": 0,
            }
            with recorder.engine.begin() as conn:
                assert recorder.allocate_call_index("f", connection=conn) == 0
            assert recorder.allocate_call_index("f") == 1
            assert recorder.verify().ok
        assert counter_count(db_url) == 6

    def test_a_write_that_fails_opens_nothing(self, db_url: str) -> None:
        """The state is opened by the statement that records: when the call is
        refused, no counter row is left behind."""
        with CallRecorder(db_url, auto_open=True) as recorder:
            recorder.record_call("first", "http", "success", {"n": 1}, call_id="taken")
            with pytest.raises(CallIdConflictError):
                recorder.record_call("second", "http", "success", {"n": 2}, call_id="taken")
            with pytest.raises(CallIdConflictError):
                recorder.begin_call("third", "http", {"n": 3}, call_id="taken")
            with pytest.raises(IndexNotReservedError):
                recorder.record_call("fourth", "http", "success", {}, call_index=0)
            with recorder.engine.connect() as conn, conn.begin() as transaction:
                assert recorder.allocate_call_index("fifth", connection=conn) == 0
                transaction.rollback()
        for state_id in ("second", "third", "fourth", "fifth"):
            assert counter_value(db_url, state_id) is None
        assert counter_value(db_url, "first") == 1

    @pytest.mark.parametrize("early_release", [None, True])
    def test_processes_opening_the_same_new_states_at_once(
        self, db_url: str, early_release: bool | None
    ) -> None:
        states = [f"new-{n}" for n in range(3)]
        reports = run_workers(
            record_many,
            [
                (db_url, f"w{w}", states, 30, None, 0.0, False, None, early_release, True)
                for w in range(4)
            ],
        )
        acknowledged = {k: tuple(v) for r in reports for k, v in r["acknowledged"].items()}
        assert len(acknowledged) == 120
        assert_trail_sound(db_url, acknowledged)
        assert counter_count(db_url) == 3
        assert [counter_value(db_url, s) for s in states] == [40, 40, 40]

    def test_the_default_stays_strict(self, recorder: CallRecorder, db_url: str) -> None:
        with pytest.raises(UnknownStateError):
            recorder.record_call("never", "http", "success", {})
        assert counter_count(db_url) == 0
