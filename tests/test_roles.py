"""sql/postgresql-roles.sql: the application role records calls (INSERT),
moves counters forward within the guard, and finishes its own calls through
callindex's function; the auditor only reads."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, exc, text

from callindex import (
    CallOwnedByAnotherRoleError,
    CallRecorder,
    DatabaseError,
    migrations,
)
from callindex.database import Database

from conftest import as_role, counter_value


def refused(url: str, role: str, statement: str, because: str = "permission denied") -> None:
    engine = create_engine(as_role(url, role))
    try:
        with pytest.raises(exc.DBAPIError, match=because), engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


class TestTheApplicationRole:
    def test_uses_the_whole_library_write_path(self, roles: str) -> None:
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            app.open_state("t")
            assert app.allocate_call_index("t", 3) == 0
            assert app.allocate_call_indices({"s": 1, "t": 1}) == {"s": 0, "t": 3}
            done = app.record_call("s", "http", "success", {"q": 1}, response={"a": 1})
            begun = app.begin_call("s", "llm", {"q": 2})
            finished = app.finish_call(begun.call_id, "error", error={"e": 1})
            assert (done.call_index, finished.call_index, finished.status) == (1, 2, "error")
            assert [c.call_index for c in app.calls("s")] == [1, 2]
            reserved = app.record_call("t", "tool", "success", {}, call_index=1)
            assert [c.call_index for c in app.calls("t")] == [reserved.call_index] == [1]
            assert app.verify().ok

    @pytest.mark.parametrize("early_release", [False, True])
    def test_opens_states_on_demand_with_auto_open(self, roles: str, early_release: bool) -> None:
        app_url = as_role(roles, "callindex_test_app")
        with CallRecorder(app_url, auto_open=True, early_release=early_release) as app:
            assert app.record_call("new-1", "http", "success", {}).call_index == 0
            assert app.begin_call("new-2", "http", {}).call_index == 0
            assert app.allocate_call_index("new-3", 2) == 0
            assert app.allocate_call_indices({"new-4": 1, "new-3": 1}) == {"new-3": 2, "new-4": 0}
            assert app.record_call("new-1", "http", "success", {}).call_index == 1
            assert app.verify().ok

    def test_a_plain_insert_is_numbered_by_the_counter_in_legacy_writers_mode(
        self, roles: str
    ) -> None:
        database = Database(roles)
        migrations.set_legacy_writers(database, True)
        database.dispose()
        engine = create_engine(as_role(roles, "callindex_test_app"))
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO calls (call_id, state_id, call_type, status) "
                    "VALUES ('plain', 's', 'http', 'success')"
                )
            )
            row = conn.execute(
                text("SELECT call_index, recorded_by FROM calls WHERE call_id = 'plain'")
            ).one()
        engine.dispose()
        assert tuple(row) == (0, "callindex_test_app")

    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE calls SET status = 'error' WHERE call_id = 'finished'",
            "UPDATE calls SET status = 'success', completed_at = now() WHERE call_id = 'open'",
            "DELETE FROM calls WHERE call_id = 'finished'",
            "TRUNCATE calls",
            "UPDATE call_index_counters SET state_id = 'y' WHERE state_id = 's'",
            "DELETE FROM call_index_counters WHERE state_id = 's'",
            "UPDATE callindex_alembic_version SET version_num = '0001'",
        ],
    )
    def test_cannot_change_what_is_recorded(self, roles: str, statement: str) -> None:
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            app.record_call("s", "http", "success", {}, call_id="finished")
            app.begin_call("s", "http", {}, call_id="open")
        refused(roles, "callindex_test_app", statement)
        with CallRecorder(roles) as owner:
            calls = {c.call_id: (c.call_index, c.status) for c in owner.calls("s")}
        assert calls == {"finished": (0, "success"), "open": (1, "pending")}

    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE call_index_counters SET next_index = 0 WHERE state_id = 's'",
            "UPDATE call_index_counters SET next_index = next_index + 1000001 WHERE state_id = 's'",
        ],
    )
    def test_moves_a_counter_only_forward_and_not_far(self, roles: str, statement: str) -> None:
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            app.allocate_call_index("s", 5)
        refused(roles, "callindex_test_app", statement, because="callindex: a counter may only")
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            assert app.allocate_call_index("s", 1_000_000) == 5
            assert app.allocate_call_index("s") == 1_000_005

    def test_finishes_only_its_own_pending_calls(self, roles: str) -> None:
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            begun = app.begin_call("s", "http", {})
        with (
            CallRecorder(as_role(roles, "callindex_test_app_other")) as other,
            pytest.raises(CallOwnedByAnotherRoleError, match="recorded by another role"),
        ):
            other.finish_call(begun.call_id, "success")
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            assert app.finish_call(begun.call_id, "success").status == "success"

    def test_cannot_sweep_or_repair(self, roles: str) -> None:
        with (
            CallRecorder(as_role(roles, "callindex_test_app")) as app,
            pytest.raises(DatabaseError, match="permission denied"),
        ):
            app.sweep(0)


class TestTheAuditorRole:
    def test_reads_and_verifies(self, roles: str) -> None:
        with CallRecorder(roles) as owner:
            owner.record_call("s", "http", "success", {})
        with CallRecorder(as_role(roles, "callindex_test_auditor")) as auditor:
            assert [c.call_index for c in auditor.calls("s")] == [0]
            assert auditor.verify().ok

    @pytest.mark.parametrize(
        "statement",
        [
            "INSERT INTO calls (call_id, state_id, call_type, status) "
            "VALUES ('x', 's', 'http', 'success')",
            "SELECT callindex_allocate_v2('s')",
            "SELECT callindex_reserve_v2('s', 1)",
            "SELECT callindex_open_state_v2('y')",
            "SELECT * FROM callindex_record_call_v2('x', 's', 'http', 'success', NULL, NULL, NULL, "
            "NULL, NULL, NULL, NULL)",
            "UPDATE call_index_counters SET next_index = 9",
        ],
    )
    def test_writes_nothing(self, roles: str, statement: str) -> None:
        refused(roles, "callindex_test_auditor", statement)
        with CallRecorder(roles) as owner:
            assert owner.calls("s") == [] and owner.allocate_call_index("s") == 0


class TestWhatAnInsertCannotForge:
    """What an application role's INSERT could try to forge."""

    def insert(
        self,
        url: str,
        values: str,
        columns: str = "call_id, state_id, call_index, call_type, status",
    ) -> None:
        engine = create_engine(as_role(url, "callindex_test_app"))
        try:
            with engine.begin() as conn:
                conn.execute(text(f"INSERT INTO calls ({columns}) VALUES {values}"))
        finally:
            engine.dispose()

    def test_recorded_by_cannot_be_named(self, roles: str) -> None:
        with pytest.raises(exc.DBAPIError, match="permission denied"):
            self.insert(
                roles,
                "('forged', 's', 0, 'http', 'pending', 'callindex_test_app_other')",
                "call_id, state_id, call_index, call_type, status, recorded_by",
            )
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            begun = app.begin_call("s", "http", {})
        with CallRecorder(roles) as owner, owner.engine.connect() as conn:
            recorded_by = conn.execute(
                text("SELECT recorded_by FROM calls WHERE call_id = :id"), {"id": begun.call_id}
            ).scalar_one()
        assert recorded_by == "callindex_test_app"

    @pytest.mark.parametrize("call_index", [1, 9223372036854775806])
    def test_an_index_the_counter_did_not_hand_out_is_refused(
        self, roles: str, call_index: int
    ) -> None:
        with pytest.raises(exc.DBAPIError, match="was not handed out by its counter"):
            self.insert(roles, f"('ahead', 's', {call_index}, 'http', 'success')")
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            assert app.record_call("s", "http", "success", {}).call_index == 0
            assert app.allocate_call_index("s", 3) == 1
        self.insert(roles, "('reserved', 's', 2, 'http', 'success')")  # handed out: taken
        with CallRecorder(roles) as owner:
            assert [c.call_index for c in owner.calls("s")] == [0, 2]
            assert owner.verify().ok

    def test_a_new_counter_cannot_start_out_of_reach(self, roles: str) -> None:
        """The role may open states (auto_open does, in the statement that
        records), but a new counter starts at most 1,000,000 ahead."""
        refused(
            roles,
            "callindex_test_app",
            "INSERT INTO call_index_counters (state_id, next_index) VALUES ('x', 9e18)",
            because="callindex: a new counter starts at most 1000000",
        )
        app = create_engine(as_role(roles, "callindex_test_app"))
        try:
            with app.begin() as conn:
                conn.execute(
                    text("INSERT INTO call_index_counters (state_id, next_index) VALUES ('y', 10)")
                )
        finally:
            app.dispose()
        assert counter_value(roles, "x") is None
        assert counter_value(roles, "y") == 10

    def test_a_counter_cannot_be_pushed_out_of_reach(self, roles: str) -> None:
        database = Database(roles)
        migrations.set_legacy_writers(database, True)
        database.dispose()
        with pytest.raises(exc.DBAPIError, match="more than 1000000 ahead"):
            self.insert(roles, "('far', 's', 9223372036854775806, 'http', 'success')")
        refused_by_function = create_engine(as_role(roles, "callindex_test_app"))
        try:
            with (
                pytest.raises(exc.DBAPIError, match="count must be 1 to 1000000"),
                refused_by_function.begin() as conn,
            ):
                conn.execute(text("SELECT callindex_allocate_v2('s', 2147483647)"))
            with refused_by_function.begin() as conn:
                reserved = conn.execute(text("SELECT callindex_reserve_v2('s', 2000000)")).all()
            assert reserved == []
        finally:
            refused_by_function.dispose()
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            assert app.allocate_call_index("s") == 0
