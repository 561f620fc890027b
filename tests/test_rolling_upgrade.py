"""A rolling upgrade, expand then contract: the functions a worker calls carry
a version in their name (``callindex_record_call_v2``). Revision 0009 adds
version 2 beside version 1, so workers of an earlier callindex go on calling
the functions they know while upgraded workers call the new ones, on the
same states; revision 0010 drops version 1 once no earlier worker is left."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from sqlalchemy import Engine, make_url, text

from callindex import CallRecorder, migrations
from callindex.database import Database

from conftest import assert_trail_sound
from workers import record_many, record_through_version_1, run_workers

EXPAND = "0009"
BEFORE = "0008"
VERSION_2 = (
    "callindex_open_state_v2(text)",
    "callindex_reserve_v2(text, integer)",
    "callindex_allocate_v2(text, integer)",
    "callindex_record_call_v2(text, text, text, text, text, text, text, text, text, text, "
    "double precision)",
    "callindex_finish_call_v2(text, text, text, text, text, text, double precision)",
)
ROLE = "callindex_test_rolling"


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _functions(url: str) -> set[str]:
    with psycopg.connect(_dsn(url)) as conn:
        rows = conn.execute(
            "SELECT proname FROM pg_proc WHERE proname LIKE 'callindex\\_%' "
            "AND pronamespace = current_schema()::regnamespace"
        ).fetchall()
    return {name for (name,) in rows}


@pytest.fixture
def at_0008(postgresql_empty_url: str) -> str:
    """A database at the revision before the expand step, with state ``s`` open."""
    db = Database(postgresql_empty_url)
    migrations.upgrade(db, BEFORE)
    db.dispose()
    with psycopg.connect(_dsn(postgresql_empty_url), autocommit=True) as conn:
        conn.execute("SELECT callindex_open_state('s')")
    return postgresql_empty_url


@pytest.fixture
def rolling_role(pg_admin: Engine, at_0008: str) -> Iterator[str]:
    """A role granted the version-1 functions, as the roles script of an
    earlier callindex left it."""
    with pg_admin.connect() as conn:
        conn.execute(text(f"DROP ROLE IF EXISTS {ROLE}"))
        conn.execute(text(f"CREATE ROLE {ROLE} NOLOGIN"))
    with psycopg.connect(_dsn(at_0008), autocommit=True) as conn:
        conn.execute(
            f"GRANT EXECUTE ON FUNCTION callindex_open_state(text), "
            f"callindex_finish_call(text, text, text, text, text, text, double precision) "
            f"TO {ROLE}"
        )
    yield ROLE
    with psycopg.connect(_dsn(at_0008), autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {ROLE}")
    with pg_admin.connect() as conn:
        conn.execute(text(f"DROP ROLE IF EXISTS {ROLE}"))


def _may_execute(url: str, role: str, signature: str) -> bool:
    with psycopg.connect(_dsn(url)) as conn:
        row = conn.execute(
            "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, signature)
        ).fetchone()
    assert row is not None
    return bool(row[0])


def test_the_expand_step_keeps_version_1_beside_version_2(at_0008: str) -> None:
    before = _functions(at_0008)
    migrations.upgrade(Database(at_0008), EXPAND)
    after = _functions(at_0008)
    assert before <= after, "nothing an earlier worker calls is gone"
    assert {signature.partition("(")[0] for signature in VERSION_2} <= after
    assert "callindex_record_released_v2" in after


def test_whoever_may_execute_version_1_may_execute_version_2(
    at_0008: str, rolling_role: str
) -> None:
    migrations.upgrade(Database(at_0008), EXPAND)
    finish_v2 = "callindex_finish_call_v2(text, text, text, text, text, text, double precision)"
    assert _may_execute(at_0008, rolling_role, "callindex_open_state_v2(text)")
    assert _may_execute(at_0008, rolling_role, finish_v2)
    # Not granted version 1 of it, so not version 2 either; PUBLIC never.
    assert not _may_execute(at_0008, rolling_role, "callindex_reserve_v2(text, integer)")
    assert not _may_execute(at_0008, "public", finish_v2)


def test_earlier_and_upgraded_workers_number_one_state_together(at_0008: str) -> None:
    """Two workers of an earlier callindex record through version 1 while the
    schema is upgraded under them and two upgraded workers record through
    version 2 on the same state: every call is in the table, once, at the
    index it was given, with no gap."""
    dsn = _dsn(at_0008)
    with ThreadPoolExecutor(max_workers=1) as background:
        earlier = background.submit(
            run_workers,
            record_through_version_1,
            [(dsn, f"v1-{w}", "s", 150, 0.01) for w in range(2)],
        )
        time.sleep(0.3)  # the earlier workers are recording
        migrations.upgrade(Database(at_0008), EXPAND)
        upgraded = run_workers(
            record_many, [(at_0008, f"v2-{w}", ["s"], 60, None, 0.005) for w in range(2)]
        )
        earlier_results = earlier.result(timeout=120)
    acknowledged = {}
    for result in [*earlier_results, *upgraded]:
        acknowledged.update(result["acknowledged"])
    assert len(acknowledged) == 2 * 150 + 2 * 60
    with psycopg.connect(dsn) as conn:
        last_v1, first_v2 = conn.execute(
            "SELECT max(created_at) FILTER (WHERE call_id LIKE 'v1-%'), "
            "min(created_at) FILTER (WHERE call_id LIKE 'v2-%') FROM calls"
        ).fetchone() or (None, None)
    assert last_v1 is not None and first_v2 is not None and last_v1 > first_v2, (
        "the earlier workers were still recording when the upgraded ones began"
    )
    assert_trail_sound(at_0008, acknowledged)


def test_the_contract_step_drops_version_1(at_0008: str) -> None:
    db = Database(at_0008)
    migrations.upgrade(db)
    functions = _functions(at_0008)
    for name in (
        "callindex_open_state",
        "callindex_reserve",
        "callindex_allocate",
        "callindex_record_call",
        "callindex_finish_call",
        "callindex_record_released",
    ):
        assert name not in functions
        assert f"{name}_v2" in functions
    with (
        psycopg.connect(_dsn(at_0008)) as conn,
        pytest.raises(psycopg.errors.UndefinedFunction),
    ):
        conn.execute("SELECT callindex_open_state('t')")
    with CallRecorder(at_0008) as recorder:
        recorder.open_state("t")
        assert recorder.record_call("t", "http", "success", {}).call_index == 0
    db.dispose()


def test_downgrading_the_contract_step_brings_version_1_back_with_its_grants(
    at_0008: str, rolling_role: str
) -> None:
    db = Database(at_0008)
    migrations.upgrade(db)
    migrations.downgrade(db, EXPAND, force=True)
    assert _may_execute(at_0008, rolling_role, "callindex_open_state(text)")
    with psycopg.connect(_dsn(at_0008), autocommit=True) as conn:
        conn.execute("SELECT callindex_open_state('u')")
        row = conn.execute(
            "SELECT call_index FROM callindex_record_call('c', 'u', 'http', 'success', "
            "'{}'::jsonb, NULL, NULL::jsonb, NULL, NULL::jsonb, NULL, NULL)"
        ).fetchone()
    assert row == (0,)
    db.dispose()
