"""Errors recognised by meaning: each refusal of the database has a code of its
own and a typed error; a unique violation is told apart by the columns its
index covers, whatever the index is called (an adopted table's ``calls_pkey``)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable

import psycopg
import pytest
from sqlalchemy import make_url

from callindex import (
    CallIndexError,
    CallRecorder,
    CallRefusedError,
    ConfigurationError,
    ContentionError,
    CounterBehindError,
    CounterGuardError,
    ImmutableCallError,
    IndexAheadError,
    PermissionDeniedError,
    adoption,
    migrations,
)
from callindex.database import Database
from callindex.translation import CALLINDEX_CODES, translate

from conftest import as_role
from legacy import create_legacy_database


def refusal(url: str, statement: str) -> CallIndexError:
    """What callindex makes of the driver's error for ``statement`` on ``url``."""
    db = Database(url)
    try:
        if db.name == "sqlite":
            path = make_url(url).database
            assert path is not None
            conn = sqlite3.connect(path)
            try:
                conn.execute(statement)
                conn.commit()
            except sqlite3.Error as error:
                return translate(error, db.display_url)
            finally:
                conn.close()
        else:
            dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
            with psycopg.connect(dsn, autocommit=True) as pg:
                try:
                    pg.execute(statement)
                except psycopg.Error as error:
                    return translate(
                        error, db.display_url, unique_columns=db.backend.unique_columns
                    )
        raise AssertionError(f"the database accepted {statement!r}")
    finally:
        db.dispose()


@pytest.fixture
def recorded(db_url: str) -> str:
    with CallRecorder(db_url) as recorder:
        recorder.open_state("s")
        recorder.allocate_call_index("s", 5)
        recorder.record_call("s", "http", "success", {}, call_id="done")
    return db_url


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("UPDATE calls SET status = 'error' WHERE call_id = 'done'", ImmutableCallError),
        ("DELETE FROM calls WHERE call_id = 'done'", ImmutableCallError),
        ("UPDATE call_index_counters SET next_index = 0", CounterGuardError),
        ("UPDATE call_index_counters SET next_index = next_index + 2000000", CounterGuardError),
        (
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
            "VALUES ('again', 's', 5, 'http', 'success')",
            CounterBehindError,
        ),
        (
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
            "VALUES ('done', 's', 0, 'http', 'success')",
            ContentionError,
        ),
        ("DELETE FROM call_index_counters", CounterGuardError),
        (
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
            "VALUES ('bad-type', 's', 1, 'HTTP call', 'success')",
            CallRefusedError,
        ),
        (
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status, latency_ms) "
            "VALUES ('bad-latency', 's', 1, 'http', 'success', -1)",
            CallRefusedError,
        ),
    ],
    ids=[
        "finished",
        "delete",
        "rewind",
        "leap",
        "index taken",
        "call_id taken",
        "counter deleted",
        "call_type",
        "latency",
    ],
)
def test_each_refusal_has_its_type(
    recorded: str, statement: str, expected: type[CallIndexError]
) -> None:
    if recorded.startswith("sqlite") and expected is ContentionError:
        # SQLite's trigger against INSERT OR REPLACE of a call answers first
        # (the write path looks the call_id up itself).
        expected = ImmutableCallError
    assert type(refusal(recorded, statement)) is expected


def test_sqlite_insert_or_replace_is_a_counter_guard_error(sqlite_url: str) -> None:
    with CallRecorder(sqlite_url) as recorder:
        recorder.open_state("s")
        recorder.allocate_call_index("s", 3)
    error = refusal(
        sqlite_url,
        "INSERT OR REPLACE INTO call_index_counters (state_id, next_index) VALUES ('s', 0)",
    )
    assert type(error) is CounterGuardError


def test_an_index_far_ahead_in_legacy_writers_mode(recorded: str) -> None:
    migrations.set_legacy_writers(Database(recorded), on=True)
    error = refusal(
        recorded,
        "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
        "VALUES ('far', 's', 5000000, 'http', 'success')",
    )
    assert type(error) is IndexAheadError


@pytest.mark.parametrize("legacy_writers", [False, True], ids=["default", "legacy writers"])
def test_every_sqlite_refusal_carries_a_code(sqlite_url: str, legacy_writers: bool) -> None:
    """SQLite has no SQLSTATE: each of callindex's triggers starts its message
    with one, and nothing is recognised by its wording."""
    db = Database(sqlite_url)
    migrations.upgrade(db)
    migrations.set_legacy_writers(db, on=legacy_writers)
    with db.engine.connect() as conn:
        triggers = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
        ).all()
    db.dispose()
    aborts = [
        (name, message)
        for name, sql in triggers
        for message in re.findall(r"RAISE\(ABORT,\s*'([^']*)'", sql)
    ]
    assert len(aborts) >= 9
    for name, message in aborts:
        code = re.match(r"callindex: \[(CX\d{3})\] ", message)
        assert code is not None, f"{name} raises {message!r} without a code"
        assert code[1] in CALLINDEX_CODES


class TestPostgreSQLRoles:
    def test_an_index_ahead_of_the_counter(self, roles: str) -> None:
        app = as_role(roles, "callindex_test_app")
        error = refusal(
            app,
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
            "VALUES ('ahead', 's', 99, 'http', 'success')",
        )
        assert type(error) is IndexAheadError

    def test_a_missing_privilege_is_not_an_immutable_call(self, roles: str) -> None:
        auditor = as_role(roles, "callindex_test_auditor")
        error = refusal(
            auditor,
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
            "VALUES ('x', 's', 0, 'http', 'success')",
        )
        assert type(error) is PermissionDeniedError


def test_an_adopted_tables_own_index_names(postgresql_empty_url: str) -> None:
    """Upstream's primary key is calls_pkey and its unique index on
    (state_id, call_index) is partial: recognised by their columns."""
    create_legacy_database(postgresql_empty_url, states=2, calls_per_state=3)
    adoption.adopt(Database(postgresql_empty_url))
    statement: Callable[[str, int], str] = lambda call_id, index: (  # noqa: E731
        "INSERT INTO calls (call_id, state_id, call_index, call_type, status, request_hash, "
        f"created_at) VALUES ('{call_id}', 'state-0', {index}, 'http', 'success', 'h', now())"
    )
    assert type(refusal(postgresql_empty_url, statement("legacy-0-0", 9))) is ContentionError
    with CallRecorder(postgresql_empty_url) as recorder:
        recorder.allocate_call_index("state-0", 2)
    assert type(refusal(postgresql_empty_url, statement("new", 1))) is CounterBehindError


def test_a_write_to_a_standby_says_how_to_reach_the_primary(postgresql_url: str) -> None:
    """A read-only server (a standby) refuses writes with 25006: the URL
    should select the primary, which retrying the same server would not do."""
    dsn = make_url(postgresql_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute("SET default_transaction_read_only = on")
        with pytest.raises(psycopg.Error) as raised:
            pg.execute("SELECT callindex_open_state_v2('s')")
    error = translate(raised.value, "the server")
    assert type(error) is ConfigurationError
    assert "target_session_attrs=read-write" in str(error)
