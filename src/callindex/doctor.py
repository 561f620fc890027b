"""Checking a deployment: the settings callindex's durability rests on, the
role it runs as, its schema and its trail (``callindex doctor``).

Each check gives one :class:`Finding`: a severity (``critical``, ``warning``
or ``ok``), what was found, and a one-line fix. The classifications are pure
functions of the values read (:func:`server_findings`, :func:`role_finding`,
:func:`sqlite_findings`, :func:`trail_findings`); :func:`diagnose` reads the
values from a database, in sessions opened the way the library opens its own,
and classifies them.

On SQLite the server checks (standbys, ``fsync``, roles) are reported as not
applicable; ``journal_mode`` and ``synchronous`` are checked instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, TypeVar

from alembic.script import ScriptDirectory
from sqlalchemy import URL, Engine

from callindex import audit, migrations
from callindex.backends import Backend
from callindex.database import Database
from callindex.errors import PermissionDeniedError, SchemaError
from callindex.retry import DatabaseRetryPolicy

T = TypeVar("T")

Severity = Literal["critical", "warning", "ok"]
CRITICAL: Final = "critical"
WARNING: Final = "warning"
OK: Final = "ok"

APP_ROLE: Final = "callindex_app"
SERVER_CHECKS: Final = (
    "synchronous_commit",
    "synchronous_standby",
    "fsync",
    "full_page_writes",
    "role",
)
TRAIL_CHECKS: Final = ("counters", "duplicates", "pending")
DOCTOR_RETRY: Final = DatabaseRetryPolicy(max_attempts=3, max_seconds=10.0)
"""A check should answer soon: an unreachable database fails after about 10 s."""


@dataclass(frozen=True)
class Finding:
    """What one check found, and the fix (empty when there is nothing to do)."""

    check: str
    severity: Severity
    found: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Diagnosis:
    """Every finding; ``ok`` is false when one of them is critical."""

    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.count(CRITICAL)

    def count(self, severity: Severity) -> int:
        return sum(1 for finding in self.findings if finding.severity == severity)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [finding.as_json() for finding in self.findings]}


# Classifications: pure functions of the values read


def server_findings(
    settings: Mapping[str, str], standby_states: Sequence[str | None] = ()
) -> list[Finding]:
    """PostgreSQL's durability settings: ``synchronous_commit`` as the role's
    sessions start with it (``pg_settings.reset_val``; optionally
    ``synchronous_commit_in_callindex``, the value callindex's own sessions
    set), ``synchronous_standby_names``, ``fsync`` and ``full_page_writes``;
    and the ``sync_state`` of every row of ``pg_stat_replication`` (``None``
    where the role may not see it)."""
    return [
        synchronous_commit_finding(
            settings["synchronous_commit"], settings.get("synchronous_commit_in_callindex")
        ),
        synchronous_standby_finding(settings["synchronous_standby_names"], standby_states),
        fsync_finding(settings["fsync"]),
        full_page_writes_finding(settings["full_page_writes"]),
    ]


def synchronous_commit_finding(start: str, in_callindex: str | None = None) -> Finding:
    """``start``: the value this role's sessions start with; ``in_callindex``:
    the value callindex's own sessions set (``on``, whatever ``start`` is)."""
    found = f"this role's sessions start with synchronous_commit = {start}"
    if in_callindex is not None:
        found += f" (callindex's own sessions set {in_callindex})"
    if start in ("off", "local"):
        not_yet = "on disk or on a standby" if start == "off" else "on a standby"
        return Finding(
            "synchronous_commit",
            WARNING,
            f"{found}: a session that keeps it (an SQL caller, a legacy writer, psql) "
            f"acknowledges commits before they are {not_yet}",
            "callindex makes its own writes durable (each asks for synchronous_commit = on), "
            f"but `{start}` does not wait for standbys in other sessions of this role: set "
            "synchronous_commit = on for this role (ALTER ROLE ... SET synchronous_commit = on)",
        )
    return Finding("synchronous_commit", OK, found)


_NUM_SYNC: Final = re.compile(r"^\s*(?:(?:FIRST|ANY)\s+)?([0-9]+)\s*\(", re.IGNORECASE)


def required_standbys(names: str) -> int:
    """How many standbys a commit waits for under ``synchronous_standby_names``:
    the number of its ``FIRST n (...)``, ``ANY n (...)`` and ``n (...)`` forms,
    1 for a plain list of names (or ``*``)."""
    match = _NUM_SYNC.match(names)
    return int(match.group(1)) if match else 1


def synchronous_standby_finding(names: str, standby_states: Sequence[str | None]) -> Finding:
    check = "synchronous_standby"
    if not names.strip():
        return Finding(
            check,
            WARNING,
            "no synchronous standby (synchronous_standby_names is empty): acknowledged calls "
            "can be lost in a failover",
            "configure a synchronous standby (synchronous_standby_names, or Patroni's "
            "synchronous_mode); a single server that never fails over may leave this warning",
        )
    required = required_standbys(names)
    synchronous = sum(1 for state in standby_states if state in ("sync", "quorum"))
    setting = f"synchronous_standby_names = {names!r}"
    if synchronous >= required:
        return Finding(
            check, OK, f"{synchronous} synchronous standby(s), {required} required ({setting})"
        )
    if any(state is None for state in standby_states):
        return Finding(
            check,
            WARNING,
            f"{setting}, but this role may not see the standbys' replication states",
            "run `callindex doctor` as a role granted pg_read_all_stats to check the standbys",
        )
    return Finding(
        check,
        CRITICAL,
        f"{setting} requires {required} synchronous standby(s), but {synchronous} in sync "
        "or quorum state: commits wait for the missing ones (or, if the wait is given up, are "
        f"on fewer than {required} standby(s))",
        "start or reconnect the synchronous standbys, or make synchronous_standby_names name "
        "the standbys that stream (pg_stat_replication.application_name) and require no "
        "more of them than stream",
    )


def fsync_finding(value: str) -> Finding:
    if value == "off":
        return Finding(
            "fsync",
            CRITICAL,
            "fsync = off: a crash of the machine can lose or corrupt acknowledged calls",
            "set fsync = on in postgresql.conf and reload",
        )
    return Finding("fsync", OK, f"fsync = {value}")


def full_page_writes_finding(value: str) -> Finding:
    if value == "off":
        return Finding(
            "full_page_writes",
            CRITICAL,
            "full_page_writes = off: a crash in the middle of a page write can corrupt the trail",
            "set full_page_writes = on in postgresql.conf and reload",
        )
    return Finding("full_page_writes", OK, f"full_page_writes = {value}")


@dataclass(frozen=True)
class RoleFacts:
    """The role callindex runs as, as the catalog describes it. ``calls_owner``
    is the role that owns ``calls`` (``None`` without the table);
    ``owns_calls``, whether the role is it or a member of it."""

    name: str
    superuser: bool
    app_role_exists: bool
    member_of_app: bool
    calls_owner: str | None = None
    owns_calls: bool = False


def role_finding(role: RoleFacts) -> Finding:
    fix = (
        f"log the workers in as a role granted {APP_ROLE} (sql/postgresql-roles.sql); keep "
        "the owner for migrations, sweep and repair"
    )
    if role.superuser:
        return Finding(
            "role",
            WARNING,
            f"callindex runs as {role.name}, a superuser, who can switch off every guard "
            "of the trail",
            fix,
        )
    if role.owns_calls:
        owner = (
            "the owner of calls"
            if role.calls_owner in (None, role.name)
            else f"a member of {role.calls_owner}, the owner of calls"
        )
        return Finding(
            "role",
            WARNING,
            f"callindex runs as {role.name}, {owner}: the guards that spare the owner "
            "(CURRENT_USER <> owner: the vouch trigger) do not check its inserts, and it can "
            "disable the trail's triggers",
            fix
            if role.app_role_exists
            else f"create the least-privilege roles as the owner (sql/postgresql-roles.sql) and "
            f"log the workers in as a role granted {APP_ROLE}; keep the owner for migrations, "
            "sweep and repair",
        )
    if role.app_role_exists and not role.member_of_app:
        return Finding(
            "role",
            WARNING,
            f"callindex runs as {role.name}, not a member of {APP_ROLE}: the least-privilege "
            "roles are not in use",
            fix,
        )
    if role.member_of_app:
        return Finding("role", OK, f"callindex runs as {role.name}, a member of {APP_ROLE}")
    return Finding(
        "role",
        OK,
        f"callindex runs as {role.name}, neither a superuser nor the owner of calls "
        f"({APP_ROLE} does not exist)",
    )


SQLITE_SYNCHRONOUS: Final = {"0": "off", "1": "normal", "2": "full", "3": "extra"}


def sqlite_findings(pragmas: Mapping[str, str]) -> list[Finding]:
    """SQLite's ``journal_mode`` and ``synchronous`` (the number ``PRAGMA``
    returns) in callindex's connection."""
    return [journal_mode_finding(pragmas["journal_mode"]), sqlite_synchronous_finding(pragmas)]


def journal_mode_finding(mode: str) -> Finding:
    if mode.lower() == "wal":
        return Finding("journal_mode", OK, "journal_mode = wal")
    return Finding(
        "journal_mode",
        WARNING,
        f"journal_mode = {mode}, not wal: readers and writers wait for each other",
        "callindex switches a file to WAL when it connects, which fails on a filesystem "
        "without shared memory (a network share): keep the file on a local disk",
    )


def sqlite_synchronous_finding(pragmas: Mapping[str, str]) -> Finding:
    value = SQLITE_SYNCHRONOUS.get(str(pragmas["synchronous"]), str(pragmas["synchronous"]))
    if value in ("full", "extra"):
        return Finding("synchronous", OK, f"synchronous = {value} in callindex's connections")
    return Finding(
        "synchronous",
        CRITICAL,
        f"synchronous = {value} in callindex's connections: a power loss can take back "
        "acknowledged calls, and their indices would be handed out again",
        "set PRAGMA synchronous = FULL on every connection that writes the trail "
        "(callindex's own connections do)",
    )


def not_applicable_on_sqlite() -> list[Finding]:
    return [
        Finding(check, OK, "not applicable on SQLite (no server, standbys or roles)")
        for check in SERVER_CHECKS
    ]


def schema_finding(
    error: SchemaError | None,
    status: migrations.SchemaStatus | None,
    shipped: Collection[str] = (),
) -> Finding:
    """The schema's revision (``status``), or the error :func:`migrations.check`
    raised; ``shipped``, the revisions this library ships (a revision among
    them but not the head is behind it)."""
    if error is not None:
        found, _, fix = str(error).partition(": ")
        return Finding("schema", CRITICAL, found, fix or "run `callindex db check` for details")
    assert status is not None
    if status.up_to_date:
        return Finding("schema", OK, f"at {status.current}, the newest (head {status.head})")
    if status.current in shipped:
        return Finding(
            "schema",
            WARNING,
            f"at {status.current}, behind the head ({status.head}): callindex writes on it, "
            "but the commands that need a newer revision fail",
            "run `callindex db upgrade`",
        )
    return Finding(
        "schema",
        OK,
        f"at {status.current}, ahead of the head ({status.head}), a revision that still "
        "serves this callindex",
    )


def shipped_revisions() -> frozenset[str]:
    """Every revision this library ships."""
    scripts = ScriptDirectory.from_config(migrations.alembic_config())
    return frozenset(script.revision for script in scripts.walk_revisions())


def trail_findings(report: audit.Report) -> list[Finding]:
    """What ``verify`` found that needs a hand: counters behind their calls,
    one index held twice, pending calls older than the report's threshold."""
    return [counters_finding(report), duplicates_finding(report), pending_finding(report)]


def counters_finding(report: audit.Report) -> Finding:
    behind = report.counters_behind
    if not behind:
        return Finding("counters", OK, "every counter is past its state's calls")
    return Finding(
        "counters",
        CRITICAL,
        f"{len(behind)} counter(s) behind their calls (first: state {behind[0]['state_id']!r}): "
        "writes of those states fail with CounterBehindError",
        "run `callindex repair`",
    )


def duplicates_finding(report: audit.Report) -> Finding:
    duplicates = report.duplicates
    if not duplicates:
        return Finding("duplicates", OK, "no index is held by two calls")
    first = duplicates[0]
    return Finding(
        "duplicates",
        CRITICAL,
        f"{len(duplicates)} (state, index) pair(s) held by more than one call (first: state "
        f"{first['state_id']!r}, index {first['call_index']})",
        "restore the unique index on calls (state_id, call_index), then decide which call "
        "keeps each index (`callindex verify --json` lists them)",
    )


def pending_finding(report: audit.Report) -> Finding:
    age = duration_text(report.pending_threshold_seconds)
    stale = report.stale_pending
    if not stale:
        return Finding("pending", OK, f"no pending call older than {age}")
    return Finding(
        "pending",
        WARNING,
        f"{len(stale)} pending call(s) older than {age}: their workers may have died",
        f"run `callindex sweep --older-than {age}` once their workers are gone",
    )


def duration_text(seconds: float) -> str:
    """``seconds`` as ``callindex``'s duration options take it (``15m``, ``90s``)."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def not_checked(check: str, why: str, fix: str) -> Finding:
    return Finding(check, WARNING, f"not checked: {why}", fix)


# Reading the values


def diagnose(
    url_or_engine: str | URL | Engine,
    pending_threshold_seconds: float = audit.DEFAULT_PENDING_THRESHOLD_SECONDS,
    *,
    retry: DatabaseRetryPolicy | None = None,
) -> Diagnosis:
    """Check the deployment of one database. A database that cannot be
    reached raises :class:`~callindex.errors.DatabaseUnavailableError`."""
    seconds = audit.validate_seconds(pending_threshold_seconds, "pending_threshold_seconds")
    db = Database(url_or_engine, retry or DOCTOR_RETRY)
    try:
        return Diagnosis(tuple(_findings(db, seconds)))
    finally:
        db.dispose()


def _findings(db: Database, pending_threshold_seconds: float) -> list[Finding]:
    if db.name == "postgresql":
        found = [
            *server_findings(read_server_settings(db), read_standby_states(db)),
            role_finding(read_role(db)),
        ]
    elif db.backend.database_exists():
        found = [*not_applicable_on_sqlite(), *sqlite_findings(read_sqlite_pragmas(db))]
    else:
        why = "the file does not exist"
        fix = "run `callindex db upgrade`"
        found = [
            *not_applicable_on_sqlite(),
            not_checked("journal_mode", why, fix),
            not_checked("synchronous", why, fix),
        ]
    schema, confirmed = read_schema(db)
    found.append(schema)
    if not confirmed:
        fix = "fix the schema first, then run `callindex doctor` again"
        why = "the schema is not confirmed at a revision this callindex reads"
        return found + [not_checked(check, why, fix) for check in TRAIL_CHECKS]
    return found + read_trail(db, pending_threshold_seconds)


def in_library_session(db: Database, work: Callable[[Any], T]) -> T:
    """Run ``work`` on a driver connection of callindex's write path, set up
    as its writes find it (retried, errors translated)."""

    def attempt(backend: Backend) -> T:
        with backend.translated(), backend.pool.connection() as conn:
            return work(conn)

    return db.write(attempt)


_SETTINGS: Final = """
SELECT (SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit'),
       current_setting('synchronous_commit'),
       current_setting('synchronous_standby_names'),
       current_setting('fsync'),
       current_setting('full_page_writes')
"""


def read_server_settings(db: Database) -> dict[str, str]:
    def read(conn: Any) -> dict[str, str]:
        row = conn.execute(_SETTINGS).fetchone()
        # callindex's session sets synchronous_commit = on: the value its role's
        # other sessions start with is the one RESET goes back to.
        names = (
            "synchronous_commit",
            "synchronous_commit_in_callindex",
            "synchronous_standby_names",
            "fsync",
            "full_page_writes",
        )
        return dict(zip(names, (str(value) for value in row), strict=True))

    return in_library_session(db, read)


def read_standby_states(db: Database) -> list[str | None]:
    def read(conn: Any) -> list[str | None]:
        return [row[0] for row in conn.execute("SELECT sync_state FROM pg_stat_replication")]

    return in_library_session(db, read)


_ROLE: Final = f"""
SELECT current_user::text,
       role.rolsuper,
       app.oid IS NOT NULL,
       COALESCE(pg_has_role(current_user, app.oid, 'MEMBER'), false),
       pg_get_userbyid(calls.relowner)::text,
       COALESCE(pg_has_role(current_user, calls.relowner, 'MEMBER'), false)
FROM pg_roles AS role
LEFT JOIN pg_roles AS app ON app.rolname = '{APP_ROLE}'
LEFT JOIN pg_class AS calls ON calls.oid = to_regclass('calls')
WHERE role.rolname = current_user
"""


def read_role(db: Database) -> RoleFacts:
    def read(conn: Any) -> RoleFacts:
        name, superuser, app_role_exists, member, owner, owns = conn.execute(_ROLE).fetchone()
        return RoleFacts(
            str(name),
            bool(superuser),
            bool(app_role_exists),
            bool(member),
            None if owner is None else str(owner),
            bool(owns),
        )

    return in_library_session(db, read)


def read_sqlite_pragmas(db: Database) -> dict[str, str]:
    def read(conn: Any) -> dict[str, str]:
        return {
            "journal_mode": str(conn.execute("PRAGMA journal_mode").fetchone()[0]),
            "synchronous": str(conn.execute("PRAGMA synchronous").fetchone()[0]),
        }

    return in_library_session(db, read)


def read_schema(db: Database) -> tuple[Finding, bool]:
    """The schema's finding, and whether it is confirmed at a revision this
    callindex reads (then the trail is checked)."""
    try:
        status = migrations.check(db)
    except SchemaError as error:
        return schema_finding(error, None), False
    except PermissionDeniedError:
        finding = not_checked(
            "schema",
            "this role may not read the schema revision",
            "run `callindex doctor` as the owner or a role granted callindex_auditor",
        )
        return finding, False
    return schema_finding(None, status, shipped_revisions()), True


def read_trail(db: Database, pending_threshold_seconds: float) -> list[Finding]:
    try:
        report = audit.verify(db, pending_threshold_seconds)
    except PermissionDeniedError:
        fix = "run `callindex doctor` as the owner or a role granted callindex_auditor"
        return [
            not_checked(check, "this role may not read the trail", fix) for check in TRAIL_CHECKS
        ]
    return trail_findings(report)
