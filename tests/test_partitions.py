"""PostgreSQL: ``calls`` partitioned by ``created_at`` month (``callindex db
partition``). The write path, its guarantees and the roles work as before;
``purge`` drops a month's partition whole; adoption and upgrades keep working."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, make_url, text

from callindex import (
    CallIdConflictError,
    CallRecorder,
    CallRefusedError,
    ConfigurationError,
    ImmutableCallError,
    IndexTakenError,
    PermissionDeniedError,
    adoption,
    migrations,
    partitions,
)
from callindex.cli import cli
from callindex.database import Database

from conftest import (
    PG_URL,
    as_role,
    assert_trail_sound,
    call_rows,
    counter_value,
    create_database,
    drop_database,
)
from legacy import create_legacy_database
from workers import record_many, run_workers

LONG_AGO = datetime.now(UTC) - timedelta(days=62)


def _partition(url: str, months_ahead: int = 3) -> list[str]:
    db = Database(url)
    try:
        return partitions.partition(db, months_ahead)
    finally:
        db.dispose()


def _scalar(url: str, sql: str) -> object:
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


def _tables(url: str) -> set[str]:
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        return set(conn.execute(text("SELECT tablename FROM pg_tables")).scalars())


def _record_long_ago(url: str, state_id: str, calls: int, *, pending: bool = False) -> None:
    """``calls`` finished calls of ``state_id`` created two months ago (written
    by the owner, as an import would), at indices the counter handed out."""
    with CallRecorder(url) as recorder:
        recorder.open_state(state_id)
        first = recorder.allocate_call_index(state_id, calls)
        with recorder.engine.begin() as conn:
            for n in range(calls):
                last = pending and n == calls - 1
                conn.execute(
                    text(
                        "INSERT INTO calls (call_id, state_id, call_index, call_type, status, "
                        "created_at, completed_at, hash_scheme) VALUES (:id, :state, "
                        ":index, 'http', :status, :at, :done, 'rfc8785')"
                    ),
                    {
                        "id": f"{state_id}-old-{n}",
                        "state": state_id,
                        "index": first + n,
                        "status": "pending" if last else "success",
                        "at": LONG_AGO,
                        "done": None if last else LONG_AGO,
                    },
                )


def _month_partition(moment: datetime) -> str:
    return partitions.partition_name(date(moment.year, moment.month, 1))


@pytest.fixture
def partitioned(postgresql_url: str) -> Iterator[str]:
    """A database with calls two months old in states old-1 and old-2 (and
    one of this month in old-1), then partitioned by month."""
    _record_long_ago(postgresql_url, "old-1", 5)
    _record_long_ago(postgresql_url, "old-2", 3)
    with CallRecorder(postgresql_url) as recorder:
        recorder.record_call("old-1", "http", "success", {"new": True})
    created = _partition(postgresql_url)
    assert _month_partition(LONG_AGO) in created
    yield postgresql_url


class TestThePartitionedTable:
    def test_is_partitioned_by_month_with_months_ahead_and_a_default(
        self, partitioned: str
    ) -> None:
        assert _scalar(partitioned, "SELECT count(*) FROM pg_partitioned_table") == 1
        tables = _tables(partitioned)
        this_month = datetime.now(UTC)
        for months in range(4):
            moment = this_month.replace(day=1) + timedelta(days=32 * months)
            assert _month_partition(moment) in tables
        assert {"calls_p_default", "call_keys", _month_partition(LONG_AGO)} <= tables
        assert _partition(partitioned) == []  # idempotent
        assert [c.call_index for c in CallRecorder(partitioned).calls("old-1")] == list(range(6))

    def test_keeps_the_write_path_and_its_guarantees(self, partitioned: str) -> None:
        with CallRecorder(partitioned, auto_open=True) as recorder:
            once = recorder.record_call("s", "http", "success", {"q": 1}, call_id="c1")
            assert recorder.record_call("s", "http", "success", {"q": 1}, call_id="c1") == once
            with pytest.raises(CallIdConflictError):
                recorder.record_call("s", "http", "success", {"q": 2}, call_id="c1")
            first = recorder.allocate_call_index("s", 2)
            recorder.record_call("s", "http", "success", {}, call_index=first)
            with pytest.raises(IndexTakenError):
                recorder.record_call("s", "http", "success", {"x": 1}, call_index=first)
            begun = recorder.begin_call("s", "llm", {})
            recorder.finish_call(begun.call_id, "success", {"a": 1})
            assert [c.call_index for c in recorder.calls("s")] == [0, 1, 3]
            assert recorder.seal("s") and recorder.verify(seals=True, hashes=True).ok
        with pytest.raises(ImmutableCallError):
            _run(partitioned, "UPDATE calls SET status = 'error' WHERE call_id = 'c1'")
        with pytest.raises(ImmutableCallError):
            _run(partitioned, f"TRUNCATE {_month_partition(datetime.now(UTC))}")

    def test_a_duplicate_index_is_refused_across_partitions(self, partitioned: str) -> None:
        """call_keys holds the unique indexes: a call of this month may not
        take an index a call of two months ago holds."""
        with pytest.raises(IndexTakenError):
            CallRecorder(partitioned).record_call(
                "old-1", "http", "success", {"again": 1}, call_index=0
            )
        # The owner's plain INSERT, which no other guard checks.
        with (
            pytest.raises(Exception, match="uq_calls_state_id_call_index"),
            CallRecorder(partitioned) as recorder,
            recorder.engine.begin() as conn,
        ):
            conn.execute(
                text(
                    "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
                    "VALUES ('dup', 'old-1', 0, 'http', 'success')"
                )
            )

    def test_processes_record_on_shared_states(self, partitioned: str) -> None:
        with CallRecorder(partitioned) as recorder:
            recorder.open_state("hot")
        plans = [(partitioned, f"w{n}", ["hot", "old-2"], 100) for n in range(4)]
        results = run_workers(record_many, plans, timeout=240)
        acknowledged: dict[str, tuple[str, int]] = {}
        for result in results:
            acknowledged.update({cid: (s, i) for cid, (s, i) in result["acknowledged"].items()})
        assert len(acknowledged) == 400
        assert_trail_sound(partitioned, acknowledged)

    def test_the_roles_keep_their_privileges(self, roles: str) -> None:
        _partition(roles)
        with CallRecorder(as_role(roles, "callindex_test_app")) as app:
            begun = app.begin_call("s", "llm", {})
            app.finish_call(begun.call_id, "success", {})
            assert app.record_call("s", "http", "success", {}).call_index == 1
        with CallRecorder(as_role(roles, "callindex_test_auditor")) as auditor:
            assert auditor.verify().ok and len(auditor.calls("s")) == 2

    def test_sqlite_has_no_partitions(self, sqlite_url: str) -> None:
        with pytest.raises(ConfigurationError, match="PostgreSQL"):
            _partition(sqlite_url)


def _run(url: str, sql: str) -> None:
    db = Database(url)
    try:
        db.run(lambda statements: statements.connection.execute(text(sql)))
    finally:
        db.dispose()


class TestPurgingByMonth:
    def test_a_month_whose_calls_may_all_go_is_dropped(self, partitioned: str) -> None:
        month = _month_partition(LONG_AGO)
        with CallRecorder(partitioned) as recorder:
            purged = recorder.purge(30 * 86400)
            assert [(p.state_id, p.first_index, p.last_index, p.calls) for p in purged] == [
                ("old-1", 0, 4, 5),
                ("old-2", 0, 2, 3),
            ]
            report = recorder.verify()
            assert report.ok and report.gaps == [] and len(report.purged) == 2
            with pytest.raises(IndexTakenError):
                recorder.record_call("old-2", "http", "success", {}, call_index=1)
            assert recorder.record_call("old-2", "http", "success", {}).call_index == 3
        assert month not in _tables(partitioned)
        assert counter_value(partitioned, "old-1") == 6
        assert [(s, i) for _, s, i, _ in call_rows(partitioned)] == [("old-1", 5), ("old-2", 3)]

    def test_a_month_with_a_pending_call_is_purged_row_by_row(self, postgresql_url: str) -> None:
        _record_long_ago(postgresql_url, "old-1", 4, pending=True)
        _partition(postgresql_url)
        with CallRecorder(postgresql_url) as recorder:
            purged = recorder.purge(30 * 86400)
        assert [(p.first_index, p.last_index) for p in purged] == [(0, 2)]
        assert _month_partition(LONG_AGO) in _tables(postgresql_url)
        assert [(i, status) for _, _, i, status in call_rows(postgresql_url)] == [(3, "pending")]

    def test_a_sealed_state_keeps_its_seals_verifiable(self, partitioned: str) -> None:
        with CallRecorder(partitioned) as recorder:
            seals = recorder.seal()
            purged = {p.state_id: p for p in recorder.purge(30 * 86400)}
            # old-1's seal covers index 5 (this month's): the run 0..4 carries the head there.
            assert purged["old-2"].head == next(s.head for s in seals if s.state_id == "old-2")
            assert purged["old-1"].head is not None
            report = recorder.verify(seals=True)
            assert report.ok and report.seals_checked == 2, report.as_json()
            recorder.record_call("old-1", "http", "success", {"after": 1})
            assert recorder.seal("old-1")[0].calls == 7
            assert recorder.verify(seals=True).ok

    def test_the_command_line(self, postgresql_url: str) -> None:
        result = CliRunner().invoke(
            cli, ["--db", postgresql_url, "db", "partition", "--months-ahead", "1"]
        )
        assert result.exit_code == 0, result.output
        assert result.stdout.count("created calls_p") == 2


class TestAdoptionAndUpgrades:
    def test_the_upstream_schema_adopted_then_partitioned(self, postgresql_empty_url: str) -> None:
        url = postgresql_empty_url
        create_legacy_database(url, states=3, calls_per_state=4)
        db = Database(url)
        try:
            adoption.adopt(db)
        finally:
            db.dispose()
        _partition(url)
        assert {"ix_calls_state_call_index_unique", "ix_calls_operation_call_index_unique"} <= set(
            _scalar(
                url,
                "SELECT array_agg(indexname) FROM pg_indexes WHERE tablename = 'call_keys'",
            )  # type: ignore[arg-type]
        )
        with CallRecorder(url) as recorder:
            assert recorder.record_call("state-1", "http", "success", {}).call_index == 4
            assert recorder.verify().ok
        with (
            pytest.raises(Exception, match="ix_calls_operation_call_index_unique"),
            CallRecorder(url) as recorder,
            recorder.engine.begin() as conn,
        ):
            conn.execute(
                text(
                    "INSERT INTO calls (call_id, operation_id, call_index, call_type, "
                    "status, request_hash, created_at) VALUES ('op-dup', 'operation-1', "
                    "0, 'http', 'success', :hash, now())"
                ),
                {"hash": "1" * 64},
            )

    def test_downgrading_and_upgrading_a_partitioned_database(self, partitioned: str) -> None:
        db = Database(partitioned)
        try:
            migrations.downgrade(db, "0011", force=True)
            migrations.upgrade(db)
            assert migrations.check(db).current == migrations.head_revision()
        finally:
            db.dispose()
        with CallRecorder(partitioned) as recorder:
            assert recorder.record_call("old-2", "http", "success", {}).call_index == 3
            assert recorder.purge(30 * 86400)
            assert recorder.verify().ok


# What the conversion keeps of calls, and what it refuses, when the role that
# runs it is not the one that owns calls.


@pytest.fixture
def new_role(pg_admin: Engine) -> Iterator[Callable[..., str]]:
    """Makes login roles of unique names (``CREATE ROLE name LOGIN options``),
    dropped when the test is over (after the databases they own objects in)."""
    made: list[str] = []

    def make(options: str = "") -> str:
        role = f"callindex_test_{uuid.uuid4().hex[:12]}"
        with pg_admin.connect() as conn:
            conn.execute(text(f"CREATE ROLE {role} LOGIN {options}"))
        made.append(role)
        return role

    yield make
    with pg_admin.connect() as conn:
        for role in reversed(made):
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))


@pytest.fixture
def owned(pg_admin: Engine, new_role: Callable[..., str]) -> Iterator[str]:
    """A database of its own, migrated by a login role of its own that is no
    superuser (the owner of callindex's tables, as a deployment's owner is),
    with calls two months old in state old-1 and one of this month; its URL
    as that owner."""
    owner = new_role()
    database = create_database(pg_admin)
    try:
        with pg_admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" OWNER TO {owner}'))
        url = make_url(PG_URL).set(database=database, username=owner)
        owner_url = url.render_as_string(hide_password=False)
        with CallRecorder(owner_url) as recorder:
            recorder.upgrade()
        _record_long_ago(owner_url, "old-1", 3)
        with CallRecorder(owner_url) as recorder:
            recorder.record_call("old-1", "http", "success", {"new": True})
        yield owner_url
    finally:
        drop_database(pg_admin, database)


def _owner(url: str) -> str:
    owner = make_url(url).username
    assert owner is not None
    return owner


def _superuser(url: str) -> str:
    return as_role(url, _owner(PG_URL))


def _rows(url: str, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    def run(statements: Any) -> list[tuple[Any, ...]]:
        result = statements.connection.execute(text(sql), parameters or {})
        return [tuple(row) for row in result] if result.returns_rows else []

    db = Database(url)
    try:
        return db.run(run)
    finally:
        db.dispose()


def _execute(url: str, *sql: str) -> None:
    for statement in sql:
        _rows(url, statement)


def _is_partitioned(url: str) -> bool:
    return _rows(url, "SELECT count(*) FROM pg_partitioned_table "
                      "WHERE partrelid = 'calls'::regclass") == [(1,)]  # fmt: skip


_OWNERS = """
SELECT relname, pg_get_userbyid(relowner) FROM pg_class
WHERE oid = 'calls'::regclass OR relname = 'call_keys'
   OR oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'calls'::regclass)
"""
_TRIGGERS = (
    "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
    "WHERE tgrelid = 'calls'::regclass AND NOT tgisinternal"
)
_PARTITIONS = """
SELECT part.relreplident, part.reloptions, toast.reloptions
FROM pg_inherits
JOIN pg_class AS part ON part.oid = pg_inherits.inhrelid
LEFT JOIN pg_class AS toast ON toast.oid = part.reltoastrelid
WHERE pg_inherits.inhparent = 'calls'::regclass
"""


def _kept(url: str) -> dict[str, Any]:
    """What calls has besides its columns, indexes, triggers and grants."""
    return {
        "table": _rows(
            url,
            "SELECT relrowsecurity, relforcerowsecurity, relreplident, "
            "obj_description(oid, 'pg_class') FROM pg_class WHERE oid = 'calls'::regclass",
        ),
        "policies": sorted(
            _rows(
                url,
                "SELECT policyname, permissive, roles, cmd, qual, with_check FROM pg_policies "
                "WHERE tablename = 'calls'",
            )
        ),
        "published": _rows(
            url,
            "SELECT pubname, attnames, rowfilter FROM pg_publication_tables "
            "WHERE tablename = 'calls'",
        ),
    }


class TestWhatTheConversionKeeps:
    def test_the_owner_of_calls_owns_what_replaces_it(
        self, owned: str, new_role: Callable[..., str]
    ) -> None:
        """Partitioned by a member of the owner's role, not by the owner: the
        new tables and functions are the owner's, and the triggers that skip
        the owner's inserts still name it."""
        owner = _owner(owned)
        member = as_role(owned, new_role(f"IN ROLE {owner}"))
        triggers = dict(_rows(owned, _TRIGGERS))
        assert f"CURRENT_USER <> '{owner}'::name" in triggers["callindex_vouch_index"]
        assert _partition(member, 1)
        assert _partition(member, 5)  # later partitions too
        tables = dict(_rows(owned, _OWNERS))
        # calls, call_keys, two months ago, this month and 5 ahead, the default
        assert len(tables) == 2 + 1 + 6 + 1 and set(tables.values()) == {owner}, tables
        functions = dict(_rows(owned, "SELECT proname, pg_get_userbyid(proowner) FROM pg_proc "
                                      "WHERE proname LIKE 'callindex%'"))  # fmt: skip
        assert "callindex_record_call_keys" in functions
        assert set(functions.values()) == {owner}, functions
        assert triggers.items() <= dict(_rows(owned, _TRIGGERS)).items()
        with CallRecorder(owned) as recorder:
            assert recorder.record_call("old-1", "http", "success", {}).call_index == 4
            begun = recorder.begin_call("old-1", "llm", {})
            recorder.finish_call(begun.call_id, "success", {})
            assert recorder.seal("old-1") and recorder.verify(seals=True).ok

    def test_a_role_that_is_not_a_member_of_the_owner_is_refused(
        self, owned: str, new_role: Callable[..., str]
    ) -> None:
        stranger = new_role()
        _execute(
            owned,
            f"GRANT SELECT ON calls, callindex_alembic_version, callindex_schema_interfaces "
            f"TO {stranger}",
        )
        with pytest.raises(PermissionDeniedError, match=f"owner of calls.*{_owner(owned)}"):
            _partition(as_role(owned, stranger))
        assert not _is_partitioned(owned)

    def test_row_security_replica_identity_publications_storage_and_comment(
        self, owned: str, new_role: Callable[..., str]
    ) -> None:
        owner = _owner(owned)
        with CallRecorder(owned, auto_open=True) as recorder:
            recorder.record_call("hidden", "http", "success", {})
        _execute(
            owned,
            "ALTER TABLE calls ENABLE ROW LEVEL SECURITY",
            # The owner itself sees no hidden call: a copy that went through
            # the policies would lose them.
            "ALTER TABLE calls FORCE ROW LEVEL SECURITY",
            "CREATE POLICY callindex_test_visible ON calls USING (state_id <> 'hidden')",
            "CREATE POLICY callindex_test_allowed ON calls AS RESTRICTIVE FOR INSERT "
            f"TO PUBLIC, {owner} WITH CHECK (call_type <> 'forbidden')",
            "ALTER TABLE calls REPLICA IDENTITY FULL",
            "ALTER TABLE calls SET (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.02, "
            "toast.autovacuum_enabled = false)",
            "COMMENT ON TABLE calls IS 'the audit trail, by month'",
            "CREATE PUBLICATION callindex_test_trail FOR TABLE calls WHERE (status <> 'pending')",
        )
        kept, everything = _kept(owned), _rows(_superuser(owned), "SELECT count(*) FROM calls")
        assert everything == [(5,)] and kept["policies"] and kept["published"]
        member = as_role(owned, new_role(f"IN ROLE {owner}"))
        _partition(member, 1)
        assert _kept(owned) == kept
        assert _rows(_superuser(owned), "SELECT count(*) FROM calls") == everything
        assert _rows(
            owned, "SELECT pubviaroot FROM pg_publication WHERE pubname = 'callindex_test_trail'"
        ) == [(True,)]
        _partition(member, 4)
        shapes = {
            (identity, frozenset(options), frozenset(toast))
            for identity, options, toast in _rows(owned, _PARTITIONS)
        }
        storage = frozenset({"fillfactor=90", "autovacuum_vacuum_scale_factor=0.02"})
        assert shapes == {("f", storage, frozenset({"autovacuum_enabled=false"}))}
        with CallRecorder(owned) as recorder:
            begun = recorder.begin_call("old-1", "llm", {})
            recorder.finish_call(begun.call_id, "success", {})  # an UPDATE, published
            with pytest.raises(PermissionDeniedError, match="row-level security"):
                recorder.record_call("old-1", "forbidden", "success", {})
            assert [c.state_id for c in recorder.calls("hidden")] == []

    @pytest.mark.parametrize(
        ("setup", "refusal"),
        [
            (
                ["ALTER TABLE calls REPLICA IDENTITY USING INDEX pk_calls"],
                "replica identity of calls is its index pk_calls",
            ),
            (
                ["CREATE PUBLICATION callindex_test_trail FOR TABLE calls"],
                "replica identity.*primary key.*callindex_test_trail",
            ),
            (
                [
                    "CREATE TABLE callindex_test_other (at timestamptz) PARTITION BY RANGE (at)",
                    "CREATE TABLE callindex_test_other_rest PARTITION OF callindex_test_other "
                    "DEFAULT",
                    "ALTER TABLE calls REPLICA IDENTITY FULL",
                    "CREATE PUBLICATION callindex_test_trail FOR TABLE calls, callindex_test_other",
                ],
                "callindex_test_trail.*publish_via_partition_root",
            ),
        ],
        ids=["replica-identity-index", "published-by-primary-key", "partitions-published"],
    )
    def test_what_it_cannot_keep_is_refused(
        self, owned: str, setup: list[str], refusal: str
    ) -> None:
        _execute(owned, *setup)
        with pytest.raises(ConfigurationError, match=refusal):
            _partition(owned)
        assert not _is_partitioned(owned)
        assert _rows(owned, "SELECT count(*) FROM pg_publication WHERE pubviaroot") == [(0,)]

    def test_a_publication_of_inserts_needs_no_replica_identity(self, owned: str) -> None:
        _execute(
            owned, "CREATE PUBLICATION callindex_test_trail FOR TABLE calls WITH (publish = insert)"
        )
        published = _kept(owned)["published"]
        _partition(owned)
        assert _kept(owned)["published"] == published
        assert _rows(owned, "SELECT pubinsert, pubupdate, pubviaroot FROM pg_publication") == [
            (True, False, True)
        ]


class TestTheVouchTriggerOnAPartitionedTable:
    def test_a_writer_cannot_date_a_call_into_another_month(
        self, owned: str, new_role: Callable[..., str]
    ) -> None:
        """The database dates a writer's call (callindex_vouch_index): one the
        writer dates in another month would have to move to another
        partition, which PostgreSQL cannot do in a BEFORE trigger. It is
        refused, with a callindex error that says so, and not written."""
        writer = new_role()
        _execute(owned, f"GRANT SELECT, INSERT ON calls TO {writer}")
        _partition(owned)
        # As if partitioned before the guard was: the next partition adds it.
        _execute(owned, f"DROP TRIGGER {partitions.MONTH_GUARD} ON calls")
        assert _partition(owned) == []
        with CallRecorder(owned) as recorder:
            first = recorder.allocate_call_index("old-1", 3)
        insert = (
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status, created_at) "
            "VALUES (:id, 'old-1', :index, 'http', 'success', :at)"
        )
        past = datetime(2001, 1, 1, tzinfo=UTC)  # the default partition
        for n, at in enumerate([LONG_AGO, past, None]):
            values = {"id": f"dated-{n}", "index": first + n, "at": at}
            with pytest.raises(CallRefusedError, match=r"created_at.*another month"):
                _rows(as_role(owned, writer), insert, values)
        ids = "SELECT call_id FROM calls WHERE call_id LIKE 'dated-%'"
        assert _rows(owned, ids) == []
        undated = insert.replace(", created_at)", ")").replace(", :at)", ")")
        _rows(as_role(owned, writer), undated, {"id": "dated-now", "index": first})
        assert _rows(owned, ids) == [("dated-now",)]
        with CallRecorder(owned) as recorder:
            assert recorder.verify().ok
