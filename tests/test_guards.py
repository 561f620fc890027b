"""Guards that hold on every path: what a call may hold is the database's to
enforce, whichever way a row arrives."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, create_engine, exc, text

from callindex import CallRecorder, adoption
from callindex.database import Database

from conftest import as_role, counter_value


def execute(url: str, statement: str, **params: object) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


INSERT = (
    "INSERT INTO calls (call_id, state_id, call_index, call_type, status, latency_ms, "
    "created_at, completed_at) VALUES (:id, 's', :index, :type, 'success', :latency, "
    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
)


class TestWhatACallMayHold:
    @pytest.mark.parametrize(
        ("call_type", "latency"),
        [("HTTP", 1.0), ("", 1.0), ("x" * 33, 1.0), ("http call", 1.0), ("http", -1.0),
         ("http", float("inf"))],
    )  # fmt: skip
    def test_is_refused_on_a_plain_insert(
        self, db_url: str, call_type: str, latency: float
    ) -> None:
        with CallRecorder(db_url) as recorder:
            recorder.open_state("s")
            recorder.allocate_call_index("s", 3)
        with pytest.raises(exc.IntegrityError):
            execute(db_url, INSERT, id="bad", index=0, type=call_type, latency=latency)
        execute(db_url, INSERT, id="good", index=1, type="http_redirect", latency=0.5)

    def test_a_finish_with_a_negative_latency_is_refused(self, db_url: str) -> None:
        with CallRecorder(db_url) as recorder:
            recorder.open_state("s")
            call = recorder.begin_call("s", "http", {})
        with pytest.raises(exc.IntegrityError):
            execute(
                db_url,
                "UPDATE calls SET status = 'success', completed_at = CURRENT_TIMESTAMP, "
                "latency_ms = -5 WHERE call_id = :id",
                id=call.call_id,
            )


def test_sqlite_insert_or_replace_cannot_rewind_a_counter(sqlite_url: str) -> None:
    with CallRecorder(sqlite_url) as recorder:
        recorder.open_state("s")
        assert recorder.allocate_call_index("s", 5) == 0
    for next_index in (0, 5 + 1_000_001):
        with pytest.raises(exc.IntegrityError, match="a counter may only move forward"):
            execute(
                sqlite_url,
                "INSERT OR REPLACE INTO call_index_counters (state_id, next_index) "
                "VALUES ('s', :n)",
                n=next_index,
            )
    with CallRecorder(sqlite_url, auto_open=True) as recorder:
        recorder.open_state("s")
        assert recorder.allocate_call_index("s") == 5
        assert recorder.allocate_call_index("new") == 0


@pytest.fixture
def app_url(roles: str) -> Iterator[str]:
    yield as_role(roles, "callindex_test_app")


class TestTheApplicationRoleCannotForgeTimes:
    """PostgreSQL: an insert by a role other than the owner gets its
    created_at and completed_at from the database."""

    def test_a_backdated_call_is_stamped_now(self, app_url: str, pg_admin: Engine) -> None:
        before = datetime.now(UTC) - timedelta(seconds=5)
        with CallRecorder(app_url) as app:
            app.allocate_call_index("s", 2)
        execute(
            app_url,
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status, created_at, "
            "completed_at) VALUES ('old', 's', 0, 'http', 'pending', :then, NULL), "
            "('done', 's', 1, 'http', 'success', :then, NULL)",
            then=datetime(2001, 1, 1, tzinfo=UTC),
        )
        with CallRecorder(app_url) as app:
            calls = {c.call_id: c for c in app.calls("s")}
        with CallRecorder(app_url.replace("callindex_test_app@", "root@")) as owner:
            assert owner.sweep(60) == []  # nothing looks abandoned
        assert calls["old"].created_at > before and calls["old"].completed_at is None
        assert calls["done"].created_at > before
        assert calls["done"].completed_at is not None and calls["done"].completed_at > before

    @pytest.mark.parametrize(("call_type", "latency"), [("Bad Type", 1.0), ("http", -1.0)])
    def test_bad_values_are_refused(self, app_url: str, call_type: str, latency: float) -> None:
        with CallRecorder(app_url) as app:
            app.allocate_call_index("s", 1)
        with pytest.raises(exc.IntegrityError):
            execute(app_url, INSERT, id="bad", index=0, type=call_type, latency=latency)


def test_sqlite_adoption_quotes_every_column_name(sqlite_empty_url: str) -> None:
    """Columns named like keywords, in mixed case, or with - and spaces."""
    engine = create_engine(sqlite_empty_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE calls (call_id VARCHAR(64) PRIMARY KEY, state_id VARCHAR(64), "
                "call_index INTEGER NOT NULL, call_type VARCHAR(32), status VARCHAR(32), "
                '"order" INTEGER, "Group" TEXT, "request-id" TEXT, "user agent" TEXT, '
                "UNIQUE (state_id, call_index))"
            )
        )
        conn.execute(
            text(
                'INSERT INTO calls (call_id, state_id, call_index, "order", "user agent") '
                "VALUES ('a', 's', 0, 7, 'curl')"
            )
        )
    engine.dispose()
    adoption.adopt(Database(sqlite_empty_url), legacy_writers=True)
    execute(
        sqlite_empty_url,
        'INSERT INTO calls (call_id, state_id, call_index, "order", "Group", "request-id", '
        "\"user agent\") VALUES ('b', 's', 0, 8, 'g', 'r-1', 'httpx')",
    )
    engine = create_engine(sqlite_empty_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text('SELECT call_id, call_index, "order", "Group", "request-id", "user agent" '
                 "FROM calls ORDER BY call_index")
        ).all()  # fmt: skip
    engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("a", 0, 7, None, None, "curl"),
        ("b", 1, 8, "g", "r-1", "httpx"),
    ]
    assert counter_value(sqlite_empty_url, "s") == 2
