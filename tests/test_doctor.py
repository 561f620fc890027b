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
from collections.abc import Sequence
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pgserver import postgres_binaries_available, replicated_postgres, throwaway_postgres
from sqlalchemy import Engine, make_url, text

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
    role_finding,
    server_findings,
    sqlite_findings,
    trail_findings,
)

from conftest import IN_CI, as_role, insert_bypassing_the_counter

UNREACHABLE = "postgresql+psycopg://someone:hunter2-secret@127.0.0.1:1/x?connect_timeout=2"
SECRET = "hunter2-secret"
HEALTHY_SERVER = {
    "synchronous_commit": "on",
    "synchronous_standby_names": "standby_a",
    "fsync": "on",
    "full_page_writes": "on",
}


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
    assert f"synchronous_commit = {value}" in finding.found
    if severity == "warning":
        assert "durable" in finding.fix and "standbys" in finding.fix


def test_the_role_sessions_start_with_is_shown_when_callindex_overrides_it() -> None:
    settings = {**HEALTHY_SERVER, "synchronous_commit_default": "local"}
    [finding] = [f for f in server_findings(settings, ["sync"]) if f.check == "synchronous_commit"]
    assert finding.severity == "ok"
    assert "start with local" in finding.found


@pytest.mark.parametrize(
    ("facts", "severity", "words"),
    [
        (RoleFacts("root", True, True, True), "warning", "a superuser"),
        (RoleFacts("owner", False, True, False), "warning", "not a member of callindex_app"),
        (RoleFacts("worker", False, True, True), "ok", "a member of callindex_app"),
        (RoleFacts("owner", False, False, False), "ok", "callindex_app does not exist"),
    ],
)
def test_the_role_finding(facts: RoleFacts, severity: str, words: str) -> None:
    finding = role_finding(facts)
    assert (finding.check, finding.severity) == ("role", severity)
    assert words in finding.found


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
    # callindex's own session asks for synchronous_commit = on, whatever the default.
    assert found["synchronous_commit"]["found"].startswith("synchronous_commit = on in callindex")
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
    assert "synchronous_standby_names = 'gone', but no standby is in sync" in standby["found"]


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
        assert (
            standby["found"] == "1 synchronous standby(s) (synchronous_standby_names = 'standby1')"
        )


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
