"""`callindex doctor`: each finding of a deployment, its severity, its fix,
and the exit code monitoring relies on.

The classifications are pure functions, checked with every value; their
wiring runs against the real servers: the shared ones (whose own settings
must appear in the report), and throwaway ones for what the shared server
cannot be given (fsync off, a named standby that is missing, a streaming
synchronous standby behind the multi-host URL).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from alembic.script import ScriptDirectory
from click.testing import CliRunner, Result
from pgserver import (
    PG_USER,
    ReplicatedPostgres,
    postgres_binaries_available,
    replicated_postgres,
    throwaway_postgres,
)
from psycopg import sql
from sqlalchemy import Engine, create_engine, make_url, text

from callindex import CallRecorder
from callindex.audit import Report
from callindex.cli import cli
from callindex.doctor import (
    SERVER_CHECKS,
    TRAIL_CHECKS,
    Diagnosis,
    Finding,
    RoleFacts,
    diagnose,
    duration_text,
    required_standbys,
    role_finding,
    schema_finding,
    server_findings,
    sqlite_findings,
    trail_findings,
)
from callindex.migrations import OLDEST_REVISION, SchemaStatus, alembic_config, head_revision

from conftest import (
    IN_CI,
    PG_URL,
    as_role,
    create_database,
    drop_database,
    insert_bypassing_the_counter,
)

UNREACHABLE = "postgresql+psycopg://someone:hunter2-secret@127.0.0.1:1/x?connect_timeout=2"
SECRET = "hunter2-secret"
HEALTHY_SERVER = {
    "synchronous_commit": "on",
    "synchronous_standby_names": "standby_a",
    "fsync": "on",
    "full_page_writes": "on",
}


def postgresql_url_of(database: str) -> str:
    return make_url(PG_URL).set(database=database).render_as_string(hide_password=False)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def doctor_json(url: str, *options: str) -> tuple[int, dict[str, Any]]:
    result = run("doctor", "--db", url, "--json", *options)
    return result.exit_code, json.loads(result.stdout)


def by_check(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    checks = [finding["check"] for finding in report["findings"]]
    assert len(checks) == len(set(checks)), f"a check reported twice: {checks}"
    return {finding["check"]: finding for finding in report["findings"]}


def severities(findings: Sequence[Finding]) -> dict[str, str]:
    return {finding.check: finding.severity for finding in findings}


# The classifications, for values this server cannot be given


def test_a_healthy_server_has_only_ok_findings() -> None:
    found = server_findings(HEALTHY_SERVER, ["sync", "async"])
    assert severities(found) == {
        "synchronous_commit": "ok",
        "synchronous_standby": "ok",
        "fsync": "ok",
        "full_page_writes": "ok",
    }
    assert all(finding.fix == "" for finding in found)


@pytest.mark.parametrize("setting", ["fsync", "full_page_writes"])
def test_fsync_or_full_page_writes_off_is_critical(setting: str) -> None:
    found = server_findings({**HEALTHY_SERVER, setting: "off"}, ["sync"])
    [finding] = [f for f in found if f.check == setting]
    assert finding.severity == "critical"
    assert f"{setting} = off" in finding.found
    assert f"set {setting} = on" in finding.fix


def test_no_synchronous_standby_is_a_warning_that_a_single_server_may_keep() -> None:
    found = server_findings({**HEALTHY_SERVER, "synchronous_standby_names": ""})
    [finding] = [f for f in found if f.check == "synchronous_standby"]
    assert finding.severity == "warning"
    assert "acknowledged calls can be lost in a failover" in finding.found
    assert "configure a synchronous standby" in finding.fix
    assert "single server" in finding.fix


@pytest.mark.parametrize(
    ("states", "severity"),
    [
        ([], "critical"),  # named, but nothing streams: commits wait
        (["async", "potential"], "critical"),
        (["sync"], "ok"),
        (["async", "quorum"], "ok"),
        ([None], "warning"),  # this role may not see sync_state
    ],
)
def test_a_named_standby_must_be_synchronous(states: list[str | None], severity: str) -> None:
    found = server_findings(HEALTHY_SERVER, states)
    [finding] = [f for f in found if f.check == "synchronous_standby"]
    assert finding.severity == severity
    assert "standby_a" in finding.found
    assert bool(finding.fix) == (severity != "ok")


@pytest.mark.parametrize(
    ("value", "severity"),
    [
        ("on", "ok"),
        ("remote_apply", "ok"),
        ("remote_write", "ok"),
        ("local", "warning"),
        ("off", "warning"),
    ],
)
def test_synchronous_commit_off_or_local_is_a_warning(value: str, severity: str) -> None:
    found = server_findings({**HEALTHY_SERVER, "synchronous_commit": value}, ["sync"])
    [finding] = [f for f in found if f.check == "synchronous_commit"]
    assert finding.severity == severity
    assert f"start with synchronous_commit = {value}" in finding.found
    if severity == "warning":
        assert "durable" in finding.fix and "standbys" in finding.fix
        assert "ALTER ROLE ... SET synchronous_commit = on" in finding.fix


@pytest.mark.parametrize("start", ["off", "local"])
def test_the_value_callindex_forces_does_not_hide_the_roles_own(start: str) -> None:
    settings = {
        **HEALTHY_SERVER,
        "synchronous_commit": start,
        "synchronous_commit_in_callindex": "on",
    }
    [finding] = [f for f in server_findings(settings, ["sync"]) if f.check == "synchronous_commit"]
    assert finding.severity == "warning"
    assert finding.found.startswith(
        f"this role's sessions start with synchronous_commit = {start} "
        "(callindex's own sessions set on): "
    )


@pytest.mark.parametrize("start", ["off", "local"])
def test_a_role_that_starts_without_waiting_is_a_warning_on_the_real_server(
    postgresql_url: str, pg_admin: Engine, start: str
) -> None:
    # The database's setting, on this test's own database: the role's sessions
    # start with it, and callindex's own sessions override it with on.
    database = make_url(postgresql_url).database
    with pg_admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{database}" SET synchronous_commit = {start}'))
    code, report = doctor_json(postgresql_url)
    assert code == 0  # a warning only
    finding = by_check(report)["synchronous_commit"]
    assert finding["severity"] == "warning"
    assert finding["found"].startswith(
        f"this role's sessions start with synchronous_commit = {start} "
        "(callindex's own sessions set on)"
    )


@pytest.mark.parametrize(
    ("facts", "severity", "words"),
    [
        (RoleFacts("root", True, True, True), "warning", "a superuser"),
        (RoleFacts("owner", False, True, False), "warning", "not a member of callindex_app"),
        (RoleFacts("worker", False, True, True, "owner"), "ok", "a member of callindex_app"),
        (
            RoleFacts("worker", False, False, False, "owner"),
            "ok",
            "neither a superuser nor the owner of calls (callindex_app does not exist)",
        ),
        (
            RoleFacts("owner", False, False, False, "owner", True),
            "warning",
            "owner, the owner of calls: the guards that spare the owner",
        ),
        (
            RoleFacts("deployer", False, False, False, "owner", True),
            "warning",
            "deployer, a member of owner, the owner of calls",
        ),
        (
            RoleFacts("owner", False, True, False, "owner", True),
            "warning",
            "owner, the owner of calls",
        ),
        (  # granted callindex_app, the owner still skips the vouch trigger
            RoleFacts("owner", False, True, True, "owner", True),
            "warning",
            "owner, the owner of calls",
        ),
    ],
)
def test_the_role_finding(facts: RoleFacts, severity: str, words: str) -> None:
    finding = role_finding(facts)
    assert (finding.check, finding.severity) == ("role", severity)
    assert words in finding.found
    if severity == "warning":
        assert "sql/postgresql-roles.sql" in finding.fix
        assert "callindex_app" in finding.fix


@pytest.mark.parametrize(
    ("pragmas", "expected"),
    [
        ({"journal_mode": "wal", "synchronous": "2"}, {"journal_mode": "ok", "synchronous": "ok"}),
        ({"journal_mode": "wal", "synchronous": "3"}, {"journal_mode": "ok", "synchronous": "ok"}),
        (
            {"journal_mode": "delete", "synchronous": "1"},
            {"journal_mode": "warning", "synchronous": "critical"},
        ),
        (
            {"journal_mode": "wal", "synchronous": "0"},
            {"journal_mode": "ok", "synchronous": "critical"},
        ),
    ],
)
def test_sqlite_pragmas(pragmas: dict[str, str], expected: dict[str, str]) -> None:
    assert severities(sqlite_findings(pragmas)) == expected


def test_trail_findings_from_a_report() -> None:
    report = Report(
        states=1,
        calls_by_status={"success": 2, "pending": 1},
        duplicates=[{"state_id": "s", "call_index": 3, "copies": 2}],
        counters_behind=[{"state_id": "s", "next_index": 0, "max_index": 3}],
        stale_pending=[{"call_id": "c", "state_id": "s", "call_index": 4, "created_at": ""}],
        pending_threshold_seconds=900,
    )
    found = {finding.check: finding for finding in trail_findings(report)}
    assert severities(list(found.values())) == {
        "counters": "critical",
        "duplicates": "critical",
        "pending": "warning",
    }
    assert found["counters"].fix == "run `callindex repair`"
    assert found["pending"].fix.startswith("run `callindex sweep --older-than 15m`")
    clean = trail_findings(Report(states=0, calls_by_status={}))
    assert {finding.severity for finding in clean} == {"ok"}


def test_only_a_critical_finding_fails_the_diagnosis() -> None:
    warning = Finding("a", "warning", "found", "fix")
    assert Diagnosis((warning, Finding("b", "ok", "found"))).ok
    assert not Diagnosis((warning, Finding("c", "critical", "found", "fix"))).ok
    assert Diagnosis((warning,)).as_json() == {
        "ok": True,
        "findings": [{"check": "a", "severity": "warning", "found": "found", "fix": "fix"}],
    }


@pytest.mark.parametrize(
    ("seconds", "text"), [(900, "15m"), (7200, "2h"), (90, "90s"), (0, "0s"), (0.5, "0.5s")]
)
def test_durations_are_shown_as_the_options_take_them(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


# A real deployment


def test_a_fresh_database_is_healthy(db_url: str) -> None:
    code, report = doctor_json(db_url)
    assert code == 0
    assert report["ok"] is True
    found = by_check(report)
    assert set(found) >= {*SERVER_CHECKS, "schema", *TRAIL_CHECKS}
    assert all(finding["severity"] != "critical" for finding in found.values())
    assert found["schema"]["severity"] == "ok"
    assert {found[check]["severity"] for check in TRAIL_CHECKS} == {"ok"}
    if db_url.startswith("sqlite"):
        for check in SERVER_CHECKS:
            assert found[check]["severity"] == "ok"
            assert "not applicable on SQLite" in found[check]["found"]
        assert found["journal_mode"] == {
            "check": "journal_mode",
            "severity": "ok",
            "found": "journal_mode = wal",
            "fix": "",
        }
        assert found["synchronous"]["found"].startswith("synchronous = full")
    else:
        standby = found["synchronous_standby"]  # this server has no standby
        assert standby["severity"] == "warning"
        assert "acknowledged calls can be lost in a failover" in standby["found"]
        assert "configure a synchronous standby" in standby["fix"]


def test_the_real_servers_settings_are_the_ones_reported(
    postgresql_url: str, pg_admin: Engine
) -> None:
    with pg_admin.connect() as conn:
        server = {
            name: conn.execute(text(f"SHOW {name}")).scalar_one()
            for name in ("fsync", "full_page_writes", "synchronous_standby_names")
        }
    _, report = doctor_json(postgresql_url)
    found = by_check(report)
    assert found["fsync"]["found"] == f"fsync = {server['fsync']}"
    assert found["full_page_writes"]["found"] == f"full_page_writes = {server['full_page_writes']}"
    # The value a plain session of this role in this database starts with;
    # callindex's own sessions ask for on.
    plain = create_engine(postgresql_url)
    try:
        with plain.connect() as conn:
            start = conn.execute(text("SHOW synchronous_commit")).scalar_one()
    finally:
        plain.dispose()
    assert found["synchronous_commit"]["found"].startswith(
        f"this role's sessions start with synchronous_commit = {start} "
        "(callindex's own sessions set on)"
    )
    assert (server["synchronous_standby_names"] == "") == (
        found["synchronous_standby"]["severity"] == "warning"
    )


def test_the_human_report_is_one_line_per_finding_and_a_summary(db_url: str) -> None:
    result = run("doctor", "--db", db_url)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    _, report = doctor_json(db_url)
    assert len(lines) == len(report["findings"]) + 1
    for line, finding in zip(lines, report["findings"], strict=False):
        assert line.startswith(finding["severity"])
        assert f"{finding['check']}: {finding['found']}" in line
        assert ("fix: " + finding["fix"] in line) == bool(finding["fix"])
    assert lines[-1].startswith("doctor: ok")


def test_the_database_option_goes_before_or_after_or_in_the_environment(sqlite_url: str) -> None:
    after = run("doctor", "--db", sqlite_url, "--json")
    before = run("--db", sqlite_url, "doctor", "--json")
    environment = run("doctor", "--json", env={"CALLINDEX_DATABASE_URL": sqlite_url})
    assert after.exit_code == before.exit_code == environment.exit_code == 0
    assert json.loads(after.stdout) == json.loads(before.stdout) == json.loads(environment.stdout)


def test_a_database_behind_is_critical(empty_db_url: str) -> None:
    assert run("--db", empty_db_url, "db", "upgrade", "0003").exit_code == 0
    code, report = doctor_json(empty_db_url)
    assert code == 1
    assert report["ok"] is False
    schema = by_check(report)["schema"]
    assert schema["severity"] == "critical"
    assert "is behind, at 0003" in schema["found"]
    assert schema["fix"].startswith("run `callindex db upgrade`")
    for check in TRAIL_CHECKS:  # not read on a schema this callindex does not know
        assert by_check(report)[check]["found"].startswith("not checked")

    assert run("--db", empty_db_url, "db", "upgrade").exit_code == 0
    assert doctor_json(empty_db_url)[0] == 0


def test_a_database_behind_the_head_but_writable_is_a_warning(empty_db_url: str) -> None:
    head = head_revision()
    previous = ScriptDirectory.from_config(alembic_config()).get_revision(head).down_revision
    assert isinstance(previous, str) and previous >= OLDEST_REVISION
    assert run("--db", empty_db_url, "db", "upgrade", previous).exit_code == 0
    code, report = doctor_json(empty_db_url)
    assert code == 0  # callindex writes on it: a warning only
    schema = by_check(report)["schema"]
    assert schema["severity"] == "warning"
    assert schema["found"].startswith(f"at {previous}, behind the head ({head})")
    assert schema["fix"] == "run `callindex db upgrade`"
    # The trail is still read on a revision this callindex writes on.
    assert {by_check(report)[check]["severity"] for check in TRAIL_CHECKS} == {"ok"}

    assert run("--db", empty_db_url, "db", "upgrade").exit_code == 0
    _, upgraded = doctor_json(empty_db_url)
    assert by_check(upgraded)["schema"] == {
        "check": "schema",
        "severity": "ok",
        "found": f"at {head}, the newest (head {head})",
        "fix": "",
    }


def test_the_schema_finding_of_each_revision() -> None:
    shipped = {"0009", "0010", "0011"}
    behind = schema_finding(None, SchemaStatus("0010", "0011"), shipped)
    assert (behind.severity, behind.fix) == ("warning", "run `callindex db upgrade`")
    assert behind.found.startswith("at 0010, behind the head (0011)")
    newest = schema_finding(None, SchemaStatus("0011", "0011"), shipped)
    assert (newest.severity, newest.found) == ("ok", "at 0011, the newest (head 0011)")
    ahead = schema_finding(None, SchemaStatus("0012", "0011"), shipped)  # serves the interface
    assert ahead.severity == "ok" and "ahead of the head (0011)" in ahead.found


def test_a_database_without_the_schema_is_critical(empty_db_url: str) -> None:
    code, report = doctor_json(empty_db_url)
    assert code == 1
    schema = by_check(report)["schema"]
    assert (schema["severity"], schema["fix"]) == ("critical", "run `callindex db upgrade`")


def test_counters_behind_their_calls_are_critical_until_repaired(db_url: str) -> None:
    with CallRecorder(db_url) as recorder:
        recorder.open_state("s")
    insert_bypassing_the_counter(db_url, "written-past-the-counter", "s", 5)
    code, report = doctor_json(db_url)
    assert code == 1
    counters = by_check(report)["counters"]
    assert counters["severity"] == "critical"
    assert "1 counter(s) behind" in counters["found"] and "'s'" in counters["found"]
    assert counters["fix"] == "run `callindex repair`"

    assert run("--db", db_url, "repair").exit_code == 0
    assert doctor_json(db_url)[0] == 0


def test_an_old_pending_call_is_a_warning_only(db_url: str) -> None:
    with CallRecorder(db_url) as recorder:
        recorder.open_state("s")
        recorder.begin_call("s", "http", {"url": "https://example.test"})
    code, report = doctor_json(db_url, "--pending-older-than", "0s")
    assert code == 0
    pending = by_check(report)["pending"]
    assert pending["severity"] == "warning"
    assert pending["found"].startswith("1 pending call(s) older than 0s")
    assert pending["fix"].startswith("run `callindex sweep --older-than 0s`")
    # The default threshold (15m) does not count a call made just now.
    assert by_check(doctor_json(db_url)[1])["pending"]["severity"] == "ok"


def test_a_duplicate_index_is_critical(postgresql_url: str) -> None:
    with CallRecorder(postgresql_url) as recorder:
        recorder.open_state("s")
        recorder.record_call("s", "http", "success", {"n": 1}, call_id="first")
        with recorder.engine.begin() as conn:
            conn.execute(text("ALTER TABLE calls DROP CONSTRAINT uq_calls_state_id_call_index"))
    insert_bypassing_the_counter(postgresql_url, "second", "s", 0)
    code, report = doctor_json(postgresql_url)
    assert code == 1
    duplicates = by_check(report)["duplicates"]
    assert duplicates["severity"] == "critical"
    assert "state 's', index 0" in duplicates["found"]


def test_a_bad_duration_is_a_usage_error(sqlite_url: str) -> None:
    result = run("doctor", "--db", sqlite_url, "--pending-older-than", "soon")
    assert result.exit_code == 2
    assert "not a duration" in result.stderr


# Settings the shared server cannot be given, on throwaway servers of our own


@pytest.fixture
def server_binaries() -> None:
    if not postgres_binaries_available():
        message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.slow
@pytest.mark.usefixtures("server_binaries")
def test_a_server_that_can_lose_acknowledged_calls_is_critical() -> None:
    settings = {"fsync": "off", "full_page_writes": "off", "synchronous_standby_names": "'gone'"}
    with throwaway_postgres(**settings) as server:
        code, report = doctor_json(server.url)  # reads only: no commit waits for 'gone'
    assert code == 1
    found = by_check(report)
    assert found["fsync"]["severity"] == found["full_page_writes"]["severity"] == "critical"
    standby = found["synchronous_standby"]
    assert standby["severity"] == "critical"
    assert standby["found"].startswith(
        "synchronous_standby_names = 'gone' requires 1 synchronous standby(s), but 0 in sync"
    )


@pytest.mark.slow
@pytest.mark.usefixtures("server_binaries")
@pytest.mark.parametrize(("synchronous", "severity"), [(True, "ok"), (False, "warning")])
def test_a_streaming_standby_through_the_multi_host_url(synchronous: bool, severity: str) -> None:
    with replicated_postgres(synchronous=synchronous) as cluster:
        code, report = doctor_json(cluster.url)
    assert code == 1  # the throwaway primary has no schema
    standby = by_check(report)["synchronous_standby"]
    assert standby["severity"] == severity
    if synchronous:
        assert standby["found"] == (
            "1 synchronous standby(s), 1 required (synchronous_standby_names = 'standby1')"
        )


@pytest.mark.parametrize(
    ("names", "required"),
    [
        ("standby_a", 1),
        ("standby_a, standby_b", 1),  # a plain list: the first that streams
        ("*", 1),
        ('"2 (odd name)"', 1),
        ("2 (standby_a, standby_b)", 2),
        ("FIRST 2 (standby_a, standby_b, standby_c)", 2),
        ("first 3(standby_a, standby_b, standby_c)", 3),
        ("ANY 2 (standby_a, standby_b, standby_c)", 2),
        ("  any 10 (*)", 10),
    ],
)
def test_the_number_of_standbys_a_commit_waits_for(names: str, required: int) -> None:
    assert required_standbys(names) == required


@pytest.mark.parametrize(
    ("names", "states", "severity"),
    [
        ("FIRST 2 (a, b, c)", ["sync", "potential"], "critical"),
        ("FIRST 2 (a, b, c)", ["sync", "sync", "potential"], "ok"),
        ("2 (a, b)", ["sync"], "critical"),
        ("2 (a, b)", ["sync", "sync"], "ok"),
        ("ANY 2 (a, b, c)", ["quorum", "async"], "critical"),
        ("ANY 2 (a, b, c)", ["quorum", "quorum"], "ok"),
        ("ANY 2 (a, b, c)", [None, None], "warning"),
        ("a, b", ["sync", "potential"], "ok"),
        ("*", ["sync", "potential"], "ok"),
    ],
)
def test_fewer_synchronous_standbys_than_required_is_critical(
    names: str, states: list[str | None], severity: str
) -> None:
    found = server_findings({**HEALTHY_SERVER, "synchronous_standby_names": names}, states)
    [finding] = [f for f in found if f.check == "synchronous_standby"]
    assert finding.severity == severity
    if severity == "critical":
        synchronous = sum(1 for state in states if state in ("sync", "quorum"))
        assert f"requires {required_standbys(names)} synchronous standby(s)" in finding.found
        assert f"but {synchronous} in sync or quorum state" in finding.found


def _set_standby_names(cluster: ReplicatedPostgres, names: str, sync_state: str) -> None:
    """Reload the primary with ``names``; wait until a new session sees them and
    the standby in ``sync_state``."""
    conninfo = f"host=127.0.0.1 port={cluster.primary.port} user={PG_USER} dbname=postgres"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(names))
        )
        conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            seen = conn.execute(
                "SELECT current_setting('synchronous_standby_names'), "
                "(SELECT sync_state FROM pg_stat_replication)"
            ).fetchone()
        if seen == (names, sync_state):
            return
        assert time.monotonic() < deadline, f"the primary still reports {seen}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.usefixtures("server_binaries")
def test_one_streaming_standby_is_not_enough_when_two_are_required() -> None:
    with replicated_postgres(synchronous=True) as cluster:
        found = {}
        for names, sync_state in [
            ("FIRST 2 (standby1, standby2)", "sync"),
            ("2 (standby1, standby2)", "sync"),
            ("ANY 2 (standby1, standby2)", "quorum"),
            ("ANY 1 (standby1, standby2)", "quorum"),
        ]:
            _set_standby_names(cluster, names, sync_state)
            found[names] = by_check(doctor_json(cluster.url)[1])["synchronous_standby"]
    for names in ("FIRST 2 (standby1, standby2)", "2 (standby1, standby2)"):
        assert found[names]["severity"] == "critical"
        assert "requires 2 synchronous standby(s), but 1 in sync" in found[names]["found"]
    assert found["ANY 2 (standby1, standby2)"]["severity"] == "critical"
    assert found["ANY 1 (standby1, standby2)"] == {
        "check": "synchronous_standby",
        "severity": "ok",
        "found": "1 synchronous standby(s), 1 required "
        "(synchronous_standby_names = 'ANY 1 (standby1, standby2)')",
        "fix": "",
    }


# Roles


def test_running_as_a_superuser_is_a_warning(postgresql_url: str) -> None:
    code, report = doctor_json(postgresql_url)  # the test server's root
    role = by_check(report)["role"]
    assert code == 0
    assert role["severity"] == "warning"
    assert "a superuser" in role["found"]
    assert "callindex_app" in role["fix"]


def test_the_least_privilege_roles(roles: str) -> None:
    code, report = doctor_json(as_role(roles, "callindex_test_app"))
    assert code == 0
    role = by_check(report)["role"]
    assert role["severity"] == "ok"
    assert role["found"] == "callindex runs as callindex_test_app, a member of callindex_app"
    assert {by_check(report)[check]["severity"] for check in TRAIL_CHECKS} == {"ok"}

    _, audited = doctor_json(as_role(roles, "callindex_test_auditor"))
    auditor = by_check(audited)["role"]
    assert auditor["severity"] == "warning"
    assert "not a member of callindex_app" in auditor["found"]
    # pg_stat_replication hides sync_state from these roles; with no standby
    # configured there is nothing to hide, and the warning is the same.
    assert by_check(audited)["synchronous_standby"]["severity"] == "warning"

    _, owned = doctor_json(roles)  # root, with the roles in place
    assert "a superuser" in by_check(owned)["role"]["found"]


@pytest.fixture
def owner_url(pg_admin: Engine) -> Iterator[str]:
    """A database of its own, migrated by a login role of its own that is no
    superuser: the owner of callindex's tables, as a deployment's owner is."""
    role = f"callindex_doctor_owner_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    try:
        database = create_database(pg_admin)
        try:
            with pg_admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{database}" OWNER TO {role}'))
            url = make_url(postgresql_url_of(database)).set(username=role)
            owned = url.render_as_string(hide_password=False)
            assert run("--db", owned, "db", "upgrade").exit_code == 0
            yield owned
        finally:
            drop_database(pg_admin, database)
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))


def test_running_as_the_owner_is_a_warning(owner_url: str) -> None:
    # Whether or not callindex_app exists on the shared server (another
    # test's roles fixture may hold it), the owner is reported as the owner.
    code, report = doctor_json(owner_url)
    assert code == 0  # a warning only
    role = by_check(report)["role"]
    owner = make_url(owner_url).username
    assert role["severity"] == "warning"
    assert role["found"].startswith(f"callindex runs as {owner}, the owner of calls: ")
    assert "vouch trigger" in role["found"] and "disable" in role["found"]
    assert "sql/postgresql-roles.sql" in role["fix"]
    assert by_check(report)["schema"]["severity"] == "ok"


# Nothing secret or forged is printed; a failure is one line


def test_the_password_is_never_printed(postgresql_empty_url: str) -> None:
    url = make_url(postgresql_empty_url).set(password=SECRET).render_as_string(False)
    for options in ([], ["--json"]):
        result = run("doctor", "--db", url, *options)
        assert result.exit_code == 1  # no schema
        assert SECRET not in result.output
        assert "root:***@" in result.stdout


def test_stored_text_cannot_forge_output(db_url: str) -> None:
    state = "evil\n[red]x[/]\x1b[2J"
    with CallRecorder(db_url) as recorder:
        recorder.open_state(state)
    insert_bypassing_the_counter(db_url, "forged", state, 3)
    result = run("doctor", "--db", db_url)
    assert result.exit_code == 1
    assert "\x1b" not in result.stdout
    [line] = [line for line in result.stdout.splitlines() if "counters:" in line]
    assert "[red]x[/]" in line
    assert len(result.stdout.splitlines()) == len(doctor_json(db_url)[1]["findings"]) + 1


def test_an_unreachable_database_is_one_error_line_and_exit_1() -> None:
    result = run("doctor", "--db", UNREACHABLE)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "cannot reach the database" in errors[0]
    assert SECRET not in result.output
    assert "Traceback" not in result.output


def test_diagnose_is_the_library_entry_point(sqlite_url: str) -> None:
    diagnosis = diagnose(sqlite_url, 0)
    assert diagnosis.ok
    assert [finding.check for finding in diagnosis.findings][-3:] == list(TRAIL_CHECKS)
