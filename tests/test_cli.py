"""The `callindex` command: scripts can rely on its output and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from callindex import migrations
from callindex.cli import cli

from conftest import insert_bypassing_the_counter

UNREACHABLE = "postgresql+psycopg://someone:hunter2-secret@127.0.0.1:1/x?connect_timeout=2"


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_upgrade_open_allocate(empty_db_url: str) -> None:
    assert run("--db", empty_db_url, "db", "upgrade").exit_code == 0
    assert run("--db", empty_db_url, "state", "open", "s1").exit_code == 0
    assert run("--db", empty_db_url, "allocate", "s1").stdout == "0\n"
    assert run("--db", empty_db_url, "allocate", "s1", "--count", "10").stdout == "1\n"
    assert run("--db", empty_db_url, "allocate", "s1").stdout == "11\n"


def test_db_current_check_and_downgrade(empty_db_url: str) -> None:
    head = migrations.head_revision()
    assert run("--db", empty_db_url, "db", "current").stdout == "none\n"
    assert run("--db", empty_db_url, "db", "check").exit_code == 1
    run("--db", empty_db_url, "db", "upgrade")
    assert run("--db", empty_db_url, "db", "current").stdout == f"{head}\nlegacy writers: off\n"
    assert run("--db", empty_db_url, "db", "legacy-writers", "on").exit_code == 0
    assert run("--db", empty_db_url, "db", "current").stdout == f"{head}\nlegacy writers: on\n"
    assert run("--db", empty_db_url, "db", "legacy-writers", "off").exit_code == 0
    assert run("--db", empty_db_url, "db", "current").stdout == f"{head}\nlegacy writers: off\n"
    checked = run("--db", empty_db_url, "db", "check")
    assert (checked.exit_code, checked.stdout) == (0, f"up to date at revision {head}\n")
    assert run("--db", empty_db_url, "db", "downgrade", "base").exit_code == 0
    assert run("--db", empty_db_url, "db", "current").stdout == "none\n"


def test_upgrade_sql_prints_without_connecting() -> None:
    result = run("--db", UNREACHABLE, "db", "upgrade", "--sql")
    assert result.exit_code == 0
    assert "CREATE TABLE call_index_counters" in result.stdout
    assert "CREATE FUNCTION callindex_allocate" in result.stdout
    assert "hunter2-secret" not in result.stdout


def test_database_url_comes_from_the_environment(sqlite_url: str) -> None:
    env = {"CALLINDEX_DATABASE_URL": sqlite_url}
    run("state", "open", "from-env", env=env)
    assert run("allocate", "from-env", env=env).stdout == "0\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["allocate", "nope"], "unknown state 'nope'"),
        (["allocate", "s1", "--count", "0"], "count must be between 1"),
        (["state", "open", ""], "state_id must not be empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(sqlite_url: str, args: list[str], message: str) -> None:
    run("--db", sqlite_url, "state", "open", "s1")
    result = run("--db", sqlite_url, *args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nonsense", "not a database URL"),
        (
            "postgresql+psycopg://u:hunter2-secret@/db?host=h1&host=h2&port=1&port=2&port=3",
            "hosts and ports do not pair up",
        ),
        ("mysql://u:hunter2-secret@h/db", "unsupported database"),
        (UNREACHABLE, "cannot reach the database"),
    ],
)
def test_bad_database_is_one_line_and_exit_1(url: str, message: str) -> None:
    result = run("--db", url, "allocate", "s1")
    assert result.exit_code == 1
    assert message in result.stderr
    assert "hunter2-secret" not in result.stderr
    assert "Traceback" not in result.output


def test_a_count_that_is_not_a_number_is_a_usage_error(sqlite_url: str) -> None:
    result = run("--db", sqlite_url, "allocate", "s1", "--count", "many")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_installed_command_from_a_clean_folder(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The README's first steps, through the installed console script."""
    executable = shutil.which("callindex", path=str(Path(sys.executable).parent))
    assert executable, "the callindex console script is not installed beside this Python"
    env = {k: v for k, v in os.environ.items() if k != "CALLINDEX_DATABASE_URL"}
    if backend == "postgresql":
        env["CALLINDEX_DATABASE_URL"] = request.getfixturevalue("postgresql_empty_url")

    def callindex(*args: str) -> str:
        done = subprocess.run(
            [executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return done.stdout

    callindex("db", "upgrade")
    callindex("state", "open", "s1")
    assert callindex("allocate", "s1") == "0\n"
    assert callindex("allocate", "s1") == "1\n"
    if backend == "sqlite":
        assert (tmp_path / "callindex.db").exists()  # the default database


class TestAuditCommands:
    def test_calls_lists_a_state_as_table_and_json(self, db_url: str) -> None:
        from callindex import CallRecorder

        with CallRecorder(db_url) as recorder:
            recorder.open_state("s1")
            first = recorder.record_call("s1", "http", "success", {"u": 1}, latency_ms=5)
            recorder.begin_call("s1", "llm", {"p": "hi"})
        table = run("--db", db_url, "calls", "s1")
        assert table.exit_code == 0
        assert first.call_id in table.stdout and "pending" in table.stdout
        listed = json.loads(run("--db", db_url, "calls", "s1", "--json").stdout)
        assert [(c["call_index"], c["status"]) for c in listed] == [(0, "success"), (1, "pending")]
        assert listed[0]["request"] == {"u": 1}

    def test_verify_sweep_and_repair(self, db_url: str) -> None:
        from callindex import CallRecorder

        with CallRecorder(db_url) as recorder:
            recorder.open_state("s1")
            begun = recorder.begin_call("s1", "http", {})
        assert run("--db", db_url, "verify").exit_code == 0
        report = json.loads(
            run("--db", db_url, "verify", "--json", "--pending-older-than", "0s").stdout
        )
        assert report["ok"] and [p["call_id"] for p in report["stale_pending"]] == [begun.call_id]
        swept = run("--db", db_url, "sweep", "--older-than", "0s")
        assert swept.exit_code == 0 and begun.call_id in swept.stdout
        insert_bypassing_the_counter(db_url, "rogue", "s1", 5)
        failed = run("--db", db_url, "verify")
        assert failed.exit_code == 1 and "FAIL" in failed.stdout
        assert json.loads(run("--db", db_url, "verify", "--json").stdout)["ok"] is False
        repaired = run("--db", db_url, "repair")
        assert repaired.stdout == "s1: next_index is now 6\n"
        assert run("--db", db_url, "verify").exit_code == 0

    @pytest.mark.parametrize("duration", ["", "soon", "15", "-5m", "1x"])
    def test_a_bad_duration_is_a_usage_error(self, sqlite_url: str, duration: str) -> None:
        result = run("--db", sqlite_url, "sweep", "--older-than", duration)
        assert result.exit_code == 2
        assert "not a duration" in result.stderr


class TestTheCommandLineFeelsFinished:
    def test_db_may_come_before_or_after_the_subcommand(self, sqlite_url: str) -> None:
        assert run("state", "open", "s1", "--db", sqlite_url).exit_code == 0
        assert run("allocate", "s1", "--db", sqlite_url).stdout == "0\n"
        assert run("--db", sqlite_url, "allocate", "s1").stdout == "1\n"
        assert run("db", "current", "--db", sqlite_url).stdout.startswith(
            migrations.head_revision()
        )
        assert run("db", "--db", sqlite_url, "check").exit_code == 0

    def test_version(self) -> None:
        from importlib.metadata import version

        result = run("--version")
        assert (result.exit_code, result.stdout) == (
            0,
            f"callindex, version {version('callindex')}\n",
        )

    @pytest.mark.parametrize(
        "args", [["--help"], ["--version"], ["db", "--help"], ["verify", "--help"]]
    )
    def test_help_and_version_load_no_database_stack(self, args: list[str]) -> None:
        """Listing commands imports every subcommand module: none may import
        SQLAlchemy, psycopg, alembic or httpx at module level."""
        script = (
            "import sys\n"
            "from callindex.cli import cli\n"
            f"code = cli.main({args!r}, prog_name='callindex', standalone_mode=False)\n"
            "heavy = sorted(m for m in ('sqlalchemy', 'psycopg', 'alembic', 'httpx', 'rich')\n"
            "               if m in sys.modules)\n"
            "print('loaded:', heavy)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        assert done.stdout.splitlines()[-1] == "loaded: []", done.stdout

    def test_an_unknown_state_exits_1_everywhere(self, sqlite_url: str) -> None:
        for args in (["allocate", "nope"], ["calls", "nope"], ["calls", "nope", "--json"]):
            result = run("--db", sqlite_url, *args)
            assert result.exit_code == 1, args
            assert "unknown state 'nope'" in result.stderr
        run("--db", sqlite_url, "state", "open", "empty")
        assert run("--db", sqlite_url, "calls", "empty", "--json").stdout == "[]\n"

    def test_a_bad_url_from_the_environment_names_the_variable(self) -> None:
        result = run("allocate", "s1", env={"CALLINDEX_DATABASE_URL": "nonsense"})
        assert result.exit_code == 1
        assert "$CALLINDEX_DATABASE_URL: not a database URL" in result.stderr
        given = run("--db", "nonsense", "allocate", "s1")
        assert "CALLINDEX_DATABASE_URL" not in given.stderr

    def test_stored_values_cannot_forge_output(self, sqlite_url: str) -> None:
        """A state id with a newline and an escape sequence is printed escaped:
        it cannot start a line of its own, colour the terminal or inject markup."""
        from callindex import CallRecorder

        forged = "s\nverify: ok\x1b[2K[green]ok[/]"
        with CallRecorder(sqlite_url) as recorder:
            recorder.open_state(forged)
            recorder.begin_call(forged, "http", {})
        insert_bypassing_the_counter(sqlite_url, "rogue", forged, 5)
        outputs = [
            run("--db", sqlite_url, "verify", "--pending-older-than", "0s"),
            run("--db", sqlite_url, "calls", forged),
            run("--db", sqlite_url, "sweep", "--older-than", "0s"),
            run("--db", sqlite_url, "repair"),
        ]
        assert outputs[0].exit_code == 1
        for result in outputs:
            assert "\x1b" not in result.output
            assert "verify: ok" not in [line.strip() for line in result.output.splitlines()]
        assert "s\\nverify: ok\\x1b[2K" in outputs[3].stdout

    def test_adopt_shows_the_librarys_defaults(self) -> None:
        from callindex import adoption, audit
        from callindex.cli.schema import db_adopt

        defaults = {param.name: param.default for param in db_adopt.params}
        assert defaults["batch_states"] == adoption.DEFAULT_BATCH_STATES
        assert isinstance(defaults["lock_timeout"], str)
        assert audit.parse_duration(defaults["lock_timeout"]) == (
            adoption.DEFAULT_LOCK_TIMEOUT_SECONDS
        )


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """The console script turns an interrupt into one line and exit code 130."""
    executable = shutil.which("callindex", path=str(Path(sys.executable).parent))
    assert executable
    process = subprocess.Popen(
        [executable, "--db", "postgresql+psycopg://nobody@127.0.0.1:1/x", "allocate", "s1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(1.5)  # connecting, then retrying the refused connection
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "callindex: interrupted"
    assert "Traceback" not in stderr
