"""Retention: finished calls may be purged by the owner, and every purge is recorded.

``callindex purge`` deletes finished calls older than a bound and records
each purged range of indices in ``call_purges`` (state, first and last
index, how many calls, the seal chain's head after the range when the state
was sealed, the bound, when and by whom). Counters are never touched: a
purged index is never handed out again. A purge record is never changed or
deleted (``CX008``).

The append-only guard of ``calls`` lets a DELETE through only inside a purge:
on PostgreSQL while the transaction-local setting ``callindex.purging`` is
``on`` (the owner alone may DELETE from calls; sql/postgresql-roles.sql), on
SQLite while the purge's own transaction holds a row of ``callindex_purging``
(no other connection ever sees one). A pending call is never deleted.

An index whose call was purged stays taken: a writer that names it (a
pipeline role on PostgreSQL through ``callindex_vouch_index``, any writer on
SQLite) is refused with ``CX009``.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

PURGES = """
CREATE TABLE call_purges (
    state_id TEXT NOT NULL,
    first_index BIGINT NOT NULL,
    last_index BIGINT NOT NULL,
    calls BIGINT NOT NULL,
    head VARCHAR(64),
    purged_before {timestamp} NOT NULL,
    purged_at {timestamp} NOT NULL DEFAULT {now},
    purged_by TEXT NOT NULL,
    CONSTRAINT pk_call_purges PRIMARY KEY (state_id, first_index),
    CONSTRAINT ck_call_purges_range CHECK (0 <= first_index AND first_index <= last_index),
    CONSTRAINT ck_call_purges_calls CHECK (1 <= calls AND calls <= last_index - first_index + 1),
    CONSTRAINT ck_call_purges_head_sha256 CHECK (head IS NULL OR length(head) = 64)
)
"""
SERVED = "INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0012', 2)"

PG_GUARD_PURGES = (
    """
CREATE FUNCTION callindex_guard_purges() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a purge record is never changed or deleted (% on call_purges)',
        TG_OP USING ERRCODE = 'CX008';
END;
$$
""",
    "CREATE TRIGGER callindex_guard_purges BEFORE UPDATE OR DELETE ON call_purges "
    "FOR EACH ROW EXECUTE FUNCTION callindex_guard_purges()",
    "CREATE TRIGGER callindex_guard_purges_truncate BEFORE TRUNCATE ON call_purges "
    "FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_purges()",
)
PG_DELETE_GUARD = (
    "DROP TRIGGER callindex_guard_calls ON calls",
    "CREATE TRIGGER callindex_guard_calls BEFORE DELETE ON calls FOR EACH ROW "
    "WHEN (OLD.status = 'pending' "
    "OR current_setting('callindex.purging', true) IS DISTINCT FROM 'on') "
    "EXECUTE FUNCTION callindex_guard_calls()",
)
PG_PREVIOUS_DELETE_GUARD = (
    "DROP TRIGGER callindex_guard_calls ON calls",
    "CREATE TRIGGER callindex_guard_calls BEFORE DELETE ON calls FOR EACH ROW "
    "EXECUTE FUNCTION callindex_guard_calls()",
)
_VOUCH_INDEX = """
CREATE OR REPLACE FUNCTION callindex_vouch_index() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    -- The database, not the writer, says when a call was made and finished.
    NEW.created_at := now();
    NEW.completed_at := CASE WHEN NEW.status = 'pending' THEN NULL ELSE now() END;
    IF NEW.state_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id;
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX003';
    END IF;{purged}
    RETURN NEW;
END;
$$
"""
_PURGED_INDEX = """
    IF EXISTS (SELECT 1 FROM call_purges
               WHERE state_id = NEW.state_id
                 AND first_index <= NEW.call_index AND NEW.call_index <= last_index) THEN
        RAISE EXCEPTION 'callindex: call_index % of state % belonged to a purged call',
            NEW.call_index, NEW.state_id USING ERRCODE = 'CX009';
    END IF;"""
# CREATE OR REPLACE resets a function's settings: pin it to this schema again.
_PIN_VOUCH_INDEX = """
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_vouch_index() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$
"""
PG_VOUCH_INDEX = (_VOUCH_INDEX.format(purged=_PURGED_INDEX), _PIN_VOUCH_INDEX)
PG_PREVIOUS_VOUCH_INDEX = (_VOUCH_INDEX.format(purged=""), _PIN_VOUCH_INDEX)

# Whoever may read calls may read call_purges (verify explains purged ranges).
PG_GRANT_READERS = """
DO $$
DECLARE
    grantee name;
BEGIN
    FOR grantee IN
        SELECT DISTINCT pg_get_userbyid(acl.grantee)
        FROM pg_class, aclexplode(pg_class.relacl) AS acl
        WHERE pg_class.oid = 'calls'::regclass AND acl.privilege_type = 'SELECT'
          AND acl.grantee NOT IN (0, pg_class.relowner)
    LOOP
        EXECUTE format('GRANT SELECT ON call_purges TO %I', grantee);
    END LOOP;
END;
$$
"""

_SQLITE_PURGE_REFUSAL = (
    "SELECT RAISE(ABORT, 'callindex: [CX008] a purge record is never changed or deleted');"
)
_SQLITE_DELETE_REFUSAL = (
    "SELECT RAISE(ABORT, "
    "'callindex: [CX001] a call cannot be deleted: the audit trail is append-only');"
)
SQLITE_GUARDS = (
    *(
        f"""
CREATE TRIGGER callindex_guard_purges_{operation.lower()} BEFORE {operation} ON call_purges
BEGIN
    {_SQLITE_PURGE_REFUSAL}
END
"""
        for operation in ("UPDATE", "DELETE")
    ),
    f"""
CREATE TRIGGER callindex_guard_purges_replace BEFORE INSERT ON call_purges
WHEN EXISTS (SELECT 1 FROM call_purges
             WHERE state_id = NEW.state_id AND first_index = NEW.first_index)
BEGIN
    {_SQLITE_PURGE_REFUSAL}
END
""",
    """
CREATE TRIGGER callindex_guard_calls_purged_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM call_purges
             WHERE state_id = NEW.state_id
               AND first_index <= NEW.call_index AND NEW.call_index <= last_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX009] the call_index belonged to a purged call');
END
""",
    "CREATE TABLE callindex_purging (purge INTEGER NOT NULL)",
    "DROP TRIGGER callindex_guard_calls_delete",
    f"""
CREATE TRIGGER callindex_guard_calls_delete BEFORE DELETE ON calls
WHEN OLD.status = 'pending' OR NOT EXISTS (SELECT 1 FROM callindex_purging)
BEGIN
    {_SQLITE_DELETE_REFUSAL}
END
""",
)
SQLITE_PREVIOUS_DELETE_GUARD = (
    "DROP TRIGGER callindex_guard_calls_delete",
    f"""
CREATE TRIGGER callindex_guard_calls_delete BEFORE DELETE ON calls
BEGIN
    {_SQLITE_DELETE_REFUSAL}
END
""",
    "DROP TABLE callindex_purging",
    "DROP TRIGGER callindex_guard_calls_purged_index",
)


def upgrade() -> None:
    postgresql = op.get_context().dialect.name == "postgresql"
    op.execute(
        PURGES.format(
            timestamp="TIMESTAMP WITH TIME ZONE" if postgresql else "DATETIME",
            now="now()" if postgresql else "(strftime('%Y-%m-%d %H:%M:%f', 'now'))",
        )
    )
    op.execute(SERVED)
    for statement in (
        (*PG_GUARD_PURGES, *PG_DELETE_GUARD, *PG_VOUCH_INDEX, PG_GRANT_READERS)
        if postgresql
        else SQLITE_GUARDS
    ):
        op.execute(statement)


def downgrade() -> None:
    postgresql = op.get_context().dialect.name == "postgresql"
    op.execute("DELETE FROM callindex_schema_interfaces WHERE revision = '0012'")
    previous = (
        (*PG_PREVIOUS_DELETE_GUARD, *PG_PREVIOUS_VOUCH_INDEX)
        if postgresql
        else SQLITE_PREVIOUS_DELETE_GUARD
    )
    for statement in previous:
        op.execute(statement)
    op.execute("DROP TABLE call_purges")
    if postgresql:
        op.execute("DROP FUNCTION callindex_guard_purges()")
