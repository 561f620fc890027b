"""Fixtures: a fresh PostgreSQL database per test (cloned from a migrated
template) and a fresh SQLite file per test, both at schema head.

PostgreSQL comes from ``CALLINDEX_TEST_PG_URL`` (default: the local server).
Under ``CI=true`` a missing server fails the run; elsewhere its tests skip
with the reason.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import URL, Engine, create_engine, make_url, text

from callindex import CallRecorder
from callindex.resources import resource_dir

PG_URL = os.environ.get("CALLINDEX_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"
BACKENDS = ("sqlite", "postgresql")


def _database_url(name: str) -> str:
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as error:
        message = f"PostgreSQL at {make_url(PG_URL).render_as_string()} is unreachable: {error}"
        if IN_CI:
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(f"SKIPPING POSTGRESQL TESTS: {message}")
    yield engine
    engine.dispose()


def create_database(admin: Engine, template: str = "template0") -> str:
    name = f"callindex_{uuid.uuid4().hex[:16]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    return name


def drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_template(pg_admin: Engine) -> Iterator[str]:
    name = create_database(pg_admin)
    recorder = CallRecorder(_database_url(name))
    recorder.upgrade()
    recorder.close()
    yield name
    drop_database(pg_admin, name)


@pytest.fixture
def postgresql_url(pg_admin: Engine, pg_template: str) -> Iterator[str]:
    """A PostgreSQL database of its own, at schema head."""
    name = create_database(pg_admin, template=pg_template)
    yield _database_url(name)
    drop_database(pg_admin, name)


@pytest.fixture
def postgresql_empty_url(pg_admin: Engine) -> Iterator[str]:
    """A PostgreSQL database of its own, without any table."""
    name = create_database(pg_admin)
    yield _database_url(name)
    drop_database(pg_admin, name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    recorder = CallRecorder(f"sqlite:///{path}")
    recorder.upgrade()
    recorder.close()
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A SQLite file of its own, at schema head."""
    path = tmp_path / "callindex.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def sqlite_empty_url(tmp_path: Path) -> str:
    """A SQLite file path where no database exists yet."""
    return f"sqlite:///{tmp_path / 'empty.db'}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> str:
    """A database at schema head, once per backend."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest) -> str:
    """A database without callindex's schema, once per backend."""
    url: str = request.getfixturevalue(f"{request.param}_empty_url")
    return url


@pytest.fixture
def recorder(db_url: str) -> Iterator[CallRecorder]:
    with CallRecorder(db_url) as recorder:
        yield recorder


def counter_value(url: str | URL, state_id: str) -> int | None:
    """``next_index`` of a state read straight from the table (``None``: no row)."""
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        value = conn.execute(
            text("SELECT next_index FROM call_index_counters WHERE state_id = :s"), {"s": state_id}
        ).scalar_one_or_none()
    return None if value is None else int(value)


def counter_count(url: str | URL) -> int:
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM call_index_counters")).scalar_one())


def call_rows(url: str | URL) -> list[tuple[str, str, int, str]]:
    """Every call row, straight from the table: (call_id, state_id, call_index, status)."""
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        return [
            (row.call_id, row.state_id, int(row.call_index), row.status)
            for row in conn.execute(
                text(
                    "SELECT call_id, state_id, call_index, status FROM calls "
                    "ORDER BY state_id, call_index"
                )
            )
        ]


def assert_trail_sound(
    url: str | URL,
    acknowledged: dict[str, tuple[str, int]],
    *,
    gapless: bool = True,
) -> None:
    """The checks every fault test ends with: no duplicate (state, index); every
    call acknowledged to a caller is in the table with the index it was given;
    recorded indices gapless per state (unless the test explains otherwise);
    counters ahead of their calls; ``verify`` passes."""
    rows = call_rows(url)
    pairs = [(state_id, index) for _, state_id, index, _ in rows]
    assert len(pairs) == len(set(pairs)), "duplicate (state_id, call_index)"
    by_id = {call_id: (state_id, index) for call_id, state_id, index, _ in rows}
    missing = {cid: where for cid, where in acknowledged.items() if by_id.get(cid) != where}
    assert not missing, f"acknowledged calls missing or moved: {list(missing.items())[:5]}"
    if gapless:
        per_state: dict[str, list[int]] = {}
        for state_id, index in pairs:
            per_state.setdefault(state_id, []).append(index)
        for state_id, indices in per_state.items():
            assert indices == list(range(len(indices))), f"gap in {state_id}: {indices[:20]}"
    with CallRecorder(url) as recorder:
        report = recorder.verify()
    assert report.ok, report.as_json()
    assert not report.counters_behind and not report.duplicates


def insert_bypassing_the_counter(url: str, call_id: str, state_id: str, call_index: int) -> None:
    """Write a call the way nothing should: past the numbering trigger (PostgreSQL's
    replica mode; on SQLite the trigger is dropped and put back), so the state's
    counter stays behind it."""
    insert = text(
        "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
        "VALUES (:call_id, :state_id, :call_index, 'http', 'success')"
    )
    values = {"call_id": call_id, "state_id": state_id, "call_index": call_index}
    with CallRecorder(url) as recorder, recorder.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(insert, values)
            return
        triggers = dict(
            conn.execute(
                text(
                    "SELECT name, sql FROM sqlite_master "
                    "WHERE type = 'trigger' AND name LIKE 'callindex_number_call%'"
                )
            ).all()
        )
        for name in triggers:
            conn.execute(text(f"DROP TRIGGER {name}"))
        conn.execute(insert, values)
        for sql in triggers.values():
            conn.execute(text(sql))


LOGINS = {
    "callindex_test_app": "callindex_app",
    "callindex_test_app_other": "callindex_app",
    "callindex_test_auditor": "callindex_auditor",
}


def as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role).render_as_string(hide_password=False)


@pytest.fixture
def roles(postgresql_url: str, pg_admin: Engine) -> Iterator[str]:
    """The roles script run by the owner, and a login role for each group."""
    script = (resource_dir("sql") / "postgresql-roles.sql").read_text(encoding="utf-8")
    dsn = make_url(postgresql_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(script.encode())  # idempotent: run twice
        conn.execute(script.encode())
    with pg_admin.connect() as conn:
        for login, group in LOGINS.items():
            conn.execute(text(f"DROP ROLE IF EXISTS {login}"))
            conn.execute(text(f"CREATE ROLE {login} LOGIN IN ROLE {group}"))
    with CallRecorder(postgresql_url) as owner:
        owner.open_state("s")
    yield postgresql_url
    with psycopg.connect(dsn, autocommit=True) as conn:
        for role in [*LOGINS, "callindex_app", "callindex_auditor"]:
            conn.execute(f"DROP OWNED BY {role}".encode())
    with pg_admin.connect() as conn:
        for role in [*LOGINS, "callindex_app", "callindex_auditor"]:
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
